"""Capture: one ATen graph for any model, a drop-in module, the user's model untouched."""

import pytest
import torch
import torchvision
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from fxcompress.capture import capture
from fxcompress.errors import CaptureError, FxCompressError
from zoo import ConvBNResidual


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


def test_transformers_model_keeps_its_call_signature_and_output_type():
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
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
