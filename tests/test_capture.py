"""Capture: one ATen graph for any model, a drop-in module, the user's model untouched."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from fxcompress.analysis import analyze_graph
from fxcompress.attention import HeadwiseAttention, make_headwise
from fxcompress.capture import capture, own_weights
from fxcompress.errors import CaptureError, FxCompressError
from fxcompress.rewrite import Projection, fold_batch_norms, rewrite
from zoo import ORACLES, ConvBNResidual, TiedLM


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchvision_model_captures_as_a_drop_in():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = _snapshot(model)
    gm = capture(model, (torch.randn(2, 3, 32, 32),))
    x = torch.randn(5, 3, 32, 32)  # another batch size
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert _same(before, _snapshot(model))
    assert gm.state_dict().keys() == model.state_dict().keys()


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def _weights(module):
    return list(module.parameters()) + list(module.buffers())


@pytest.mark.parametrize("exported", [False, True], ids=["module", "program"])
def test_shared_weights_are_the_models_until_owned_and_ties_survive(exported):
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 5))
    source = torch.export.export(model, (ids,)) if exported else model
    theirs = _storages(source.state_dict.values() if exported else _weights(model))
    before = _snapshot(model)
    assert not _storages(_weights(capture(source, (ids,)))) & theirs  # the default: a copy
    gm = capture(source, (ids,), share_weights=True)
    assert _storages(_weights(gm)) <= theirs
    own_weights(gm, source)
    assert not _storages(_weights(gm)) & theirs
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())  # still tied
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)  # the module is now free to change
    assert _same(before, _snapshot(model))


def test_symbolic_trace_graph_module_is_accepted():
    model = ConvBNResidual().eval()
    traced = torch.fx.symbolic_trace(model)
    gm = capture(traced, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_exported_program_is_accepted_without_inputs():
    model = ConvBNResidual().eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    gm = capture(program)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(gm(x), model(x), atol=1e-6)


@pytest.mark.parametrize("batch", [2, 1])  # a batch of one must not be baked into the graph's reshapes
def test_transformers_model_keeps_its_call_signature_and_output_type(batch):
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (batch, 12))
    gm = capture(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    ids2 = torch.randint(0, 100, (3, 7))  # other batch and sequence lengths
    out = gm(input_ids=ids2, attention_mask=torch.ones_like(ids2))
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert torch.allclose(out.logits, model(input_ids=ids2, attention_mask=torch.ones_like(ids2)).logits, atol=1e-5)


def test_train_and_eval_modes_are_followed():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    gm = capture(model, (torch.randn(4, 8),))
    x = torch.randn(16, 8)
    gm.train()
    torch.manual_seed(0)
    a, b = gm(x), gm(x)
    assert not torch.allclose(a, b)  # dropout is active
    stats = gm.get_submodule("1").running_mean.clone()
    gm(x).sum().backward()  # trainable
    assert not torch.equal(stats, gm.get_submodule("1").running_mean)  # BatchNorm updates its statistics
    gm.eval()
    assert torch.equal(gm(x), gm(x))


@pytest.mark.parametrize("dropout", [nn.Dropout(0.5, inplace=True), nn.Dropout2d(0.5), nn.Dropout2d(0.5, inplace=True),
                                     nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5)], ids=repr)
def test_every_dropout_follows_the_mode_and_has_a_width_rule(dropout):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), dropout, nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(4, 3, 5, 5)
    gm = capture(model, (x,))
    assert torch.equal(gm(x), model(x))
    gm.train()
    assert not torch.allclose(gm(x), gm(x))
    assert not any(g.frozen for g in analyze_graph(gm).groups if g.name == "0")  # dropout does not freeze the group


@pytest.mark.parametrize(
    "model, args, match",
    [
        ("not a model", (torch.randn(2),), "expected an nn.Module"),
        (nn.Linear(4, 2), (), "needs example inputs"),
        (nn.Linear(4, 2), (torch.randn(2, 5),), "could not capture Linear"),
    ],
)
def test_capture_errors_are_clear(model, args, match):
    with pytest.raises(CaptureError, match=match) as info:
        capture(model, args)
    assert isinstance(info.value, FxCompressError)


def test_failed_capture_leaves_the_model_untouched():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return h[h > 0].sum()  # a data-dependent shape

    model = DataDependent()
    before = _snapshot(model)
    try:
        capture(model, (torch.randn(2, 4),))
    except CaptureError as exc:
        assert "DataDependent" in str(exc)
    assert _same(before, _snapshot(model)) and model.training


def _masks(case, batch=3, length=5, heads=2):
    """``(attn_mask, key_padding_mask)`` for one masking case."""
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return {"none": (None, None), "padding": (None, padding), "padding-float": (None, padding.double() * -1e4),
            "causal": (causal, None), "causal+padding": (causal, padding),
            "per-head": (torch.randn(batch * heads, length, length, dtype=torch.float64), None)}[case]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["none", "padding", "padding-float", "causal", "causal+padding", "per-head"])
@pytest.mark.parametrize("weights", ["none", "average", "per-head"])
def test_headwise_attention_computes_what_multihead_attention_does(batch_first, case, weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, bias=case != "none", batch_first=batch_first).double().eval()
    headwise = copy.deepcopy(mha)
    assert make_headwise(headwise) == 1 and type(headwise) is HeadwiseAttention
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    attn_mask, padding = _masks(case)
    options = dict(key_padding_mask=padding, attn_mask=attn_mask, need_weights=weights != "none",
                   average_attn_weights=weights == "average", is_causal=case.startswith("causal"))
    expected, expected_weights = mha(x, x, x, **options)
    out, out_weights = headwise(x, x, x, **options)
    assert torch.allclose(out, expected, atol=1e-12)
    assert (out_weights is None) == (expected_weights is None)
    if expected_weights is not None:
        assert torch.allclose(out_weights, expected_weights, atol=1e-12)


def test_cross_attention_and_unpacked_projections_keep_multihead_attention():
    torch.manual_seed(0)
    unpacked = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=6))
    assert make_headwise(unpacked) == 0 and type(unpacked[0]) is nn.MultiheadAttention
    mha = nn.MultiheadAttention(8, 2).eval()
    headwise = copy.deepcopy(mha)
    make_headwise(headwise)
    q, kv = torch.randn(4, 2, 8), torch.randn(6, 2, 8)  # cross-attention runs the original code
    assert torch.equal(headwise(q, kv, kv)[0], mha(q, kv, kv)[0])


def test_multihead_attention_heads_are_width_groups_and_the_user_model_keeps_its_class():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()
    x = torch.randn(2, 7, 16)
    gm = capture(model, (x,))
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in model.layers)
    y = torch.randn(5, 7, 16)  # another batch size (float inputs keep their other sizes)
    assert torch.allclose(gm(y), model(y), atol=1e-5)
    plan = analyze_graph(gm)
    heads = [(g.name, g.blocks, bool(g.frozen)) for g in plan.groups if g.blocks > 1]
    assert heads == [(f"layers.{i}.self_attn{part}", 4, False) for i in range(2) for part in ("", "#1")]


def _random_batch_norms(model):
    """Running statistics and affine parameters other than 0 and 1, so a fold has work to do."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


# DenseNet's BatchNorms follow concatenations, not convolutions: they stay
@pytest.mark.parametrize("name, kept", [("conv_bn_residual", 0), ("depthwise", 0), ("dense_block", 3)])
def test_folding_batch_norms_keeps_the_function_and_leaves_the_input_alone(name, kept):
    cls, inputs = ORACLES[name]
    torch.manual_seed(0)
    model = _random_batch_norms(cls().double()).eval()
    x = tuple(t.double() for t in inputs())
    gm = capture(model, x)
    before = _snapshot(gm)
    folded = fold_batch_norms(gm)
    assert _same(before, _snapshot(gm)) and any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == kept
    assert torch.allclose(folded(*x), model(*x), rtol=1e-10, atol=1e-10)


def test_folding_makes_rotations_exact_across_mobilenet_bottlenecks():
    torch.manual_seed(0)
    model = _random_batch_norms(torchvision.models.mobilenet_v2(num_classes=10).double()).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm = capture(model, (x,))
    folded = fold_batch_norms(gm)
    plan = analyze_graph(folded)
    rotatable = [g for g in plan.compressible if "projection" in g.exact]
    assert len(rotatable) > sum("projection" in g.exact for g in analyze_graph(gm).compressible)
    # the linear bottlenecks (conv → BatchNorm → residual add, no ReLU) now take any rotation
    rotations = {g.name: Projection(torch.linalg.qr(torch.randn(g.size, g.size, dtype=torch.float64))[0])
                 for g in rotatable}
    torch.testing.assert_close(rewrite(folded, plan, rotations)(x), model(x), rtol=1e-9, atol=1e-12)
