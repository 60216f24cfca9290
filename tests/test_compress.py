"""Rewrite exactness and fxcompress.compress on the oracle zoo."""

import dataclasses
import math
import sys

import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import CompressConfig, ConfigError, DataError, FxCompressError, Projection, RewriteError
from fxcompress.analysis import analyze_graph
from fxcompress.analysis.ops import arg
from fxcompress.capture import capture
from fxcompress.rewrite import exact_transforms, rewrite
from fxcompress.spectral.selection import MIN_EIGENVALUES
from zoo import ORACLES


def _double(inputs):
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


def _rel(a, b):
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_exact_transforms_preserve_the_function(name):
    """A random orthogonal k = d projection on every projection-exact group, and a random
    permutation on every selection-exact group, compute the same function (float64)."""
    cls, inputs = ORACLES[name]
    torch.manual_seed(1)
    model = cls().double().eval()
    x = _double(inputs())
    gm = capture(model, x)
    plan = analyze_graph(gm)
    projections = exact_transforms(plan, seed=1)  # blocks (heads, convolution groups) each get their own
    assert projections and set(projections) == {g.name for g in plan.compressible if g.exact}  # every oracle has one
    out = rewrite(gm, plan, projections)
    assert _rel(out(*x), model(*x)) <= 1e-5


class _MatmulHead(nn.Module):
    """``x @ W`` with no bias: a mean fold adds one after the product."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 3))

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("head", [lambda: nn.Linear(16, 3), _MatmulHead], ids=["linear", "matmul"])
def test_projection_with_mean_folding_is_exact_on_the_signal_subspace(head):
    """Activations that live in a k-dim affine subspace: projecting onto it (and folding the
    mean into the consumer's bias) loses nothing."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), head()).double().eval()
    with torch.no_grad():  # the 16-wide hidden activation spans only 4 directions around an offset
        basis = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))[0]
        model[0].weight.copy_(basis @ torch.randn(4, 6, dtype=torch.float64))
        model[0].bias.copy_(torch.randn(16, dtype=torch.float64) * 3)
    x = torch.randn(64, 6, dtype=torch.float64)
    result = fxcompress.compress(model, [x], CompressConfig(rule="fixed", k=4, round_to=1, transform="projection"))
    assert [r.k for r in result.report if r.name == "0"] == [4]
    assert _rel(result.module(x), model(x)) <= 1e-9


def _attention_model():
    cls, inputs = ORACLES["post_ln_transformer"]
    torch.manual_seed(4)
    model = cls().double().eval()
    x = inputs()
    gm = capture(model, x)
    return model, x, gm, analyze_graph(gm)


def test_narrowing_query_and_key_heads_keeps_the_attention_scale():
    """Query and key are zero on 3 of each head's 8 dims: dropping those dims leaves every
    score the same, provided SDPA keeps its 1/√8 scale (its default would become 1/√5)."""
    model, x, gm, plan = _attention_model()
    group = plan["layers.0.q"]
    with torch.no_grad():
        for name in ("q", "k"):
            for h in range(group.blocks):
                model.layers[0][name].weight[h * 8 + 5:(h + 1) * 8] = 0
                model.layers[0][name].bias[h * 8 + 5:(h + 1) * 8] = 0
    gm = capture(model, x)
    keep = [h * 8 + i for h in range(group.blocks) for i in range(5)]
    out = rewrite(gm, plan, {group.name: Projection.select(keep, group.size)})
    assert out.get_parameter("layers.0.q.weight").shape == (20, 32)
    assert gm.get_parameter("layers.0.q.weight").shape == (32, 32)  # a copy was narrowed
    assert _rel(out(*x), model(*x)) <= 1e-9
    assert rewrite(gm, plan, {group.name: Projection.select(keep, group.size)}, inplace=True) is gm
    assert gm.get_parameter("layers.0.q.weight").shape == (20, 32) and _rel(gm(*x), model(*x)) <= 1e-9


def _with_dead_rows(name, seed, dead):
    """The oracle ``name`` in float64 with the rows ``dead[param]`` of each parameter set to zero,
    captured and analysed: ``(model, inputs, capture, plan)``."""
    cls, inputs = ORACLES[name]
    torch.manual_seed(seed)
    model = cls().double().eval()
    with torch.no_grad():
        for param, rows in dead.items():
            model.get_parameter(param)[rows] = 0
    x = _double(inputs())
    gm = capture(model, x)
    return model, x, gm, analyze_graph(gm)


def test_narrowing_the_parts_of_nested_concatenations_is_exact_on_dead_channels():
    """Channels the stem and conv1 never use (zero weights; BatchNorm at its defaults keeps
    zero at zero) can go: every later layer reads the concatenations in slices that move as
    the parts before them narrow."""
    model, x, gm, plan = _with_dead_rows("dense_block", 5, {f"{conv}.{w}": rows for conv, rows in
                                                            (("stem", [1, 6]), ("conv1", [2])) for w in ("weight", "bias")})
    keep = {"conv1": [0, 1, 3], "stem": [0, 2, 3, 4, 5, 7]}  # the later part first: offsets must still line up
    out = rewrite(gm, plan, {name: Projection.select(k, plan[name].size) for name, k in keep.items()})
    assert out.get_parameter("transition.weight").shape == (6, 13, 1, 1)
    assert out.get_parameter("conv2.weight").shape == (4, 9, 3, 3)
    assert out.get_submodule("bn3").running_mean.shape == (13,) and out.get_submodule("bn3").num_features == 13
    assert _rel(out(*x), model(*x)) <= 1e-9
    rebuilt = fxcompress.rebuild(model, x, [{"widths": {"conv1": 3, "stem": 6}, "fold_mean": False}], out.state_dict())
    assert _rel(rebuilt(*x), model(*x)) <= 1e-9


def test_narrowing_the_parts_of_a_packed_projection_resizes_the_split():
    """Query, key and value all zero on the last dim of each head: dropping it from every part
    keeps the function, with the split resized and the value's slice moved up by the four rows
    the query and key lost."""
    dead = [part * 16 + head * 8 + 7 for part in range(3) for head in range(2)]
    model, x, gm, plan = _with_dead_rows("packed_attention", 6, {"qkv.weight": dead, "qkv.bias": dead})
    keep = [head * 8 + i for head in range(2) for i in range(7)]
    out = rewrite(gm, plan, {name: Projection.select(keep, 16) for name in ("qkv#1", "qkv")})  # query+key first
    assert out.get_parameter("qkv.weight").shape == (42, 16) and out.get_parameter("o.weight").shape == (16, 14)
    splits = [list(n.args[1]) for n in out.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default]
    assert splits == [[14, 14, 14]]
    assert _rel(out(*x), model(*x)) <= 1e-9


@pytest.mark.parametrize("layer", [0, 1], ids=["repeat_kv", "enable_gqa"])
def test_narrowing_grouped_query_heads_narrows_every_query_head_of_a_key_value_head_alike(layer):
    """Key and value are zero on the last dim of each of their 2 heads: dropping it from them,
    and from the 4 query heads and the output projection's 4 head slices that repeat them,
    keeps the function (with SDPA's 1/√8 scale kept)."""
    model, x, gm, plan = _with_dead_rows("grouped_query_attention", 9,
                                         {f"layers.{layer}.{name}.weight": [7, 15] for name in "kv"})
    keep = Projection.select([h * 8 + i for h in range(2) for i in range(7)], 16)
    out = rewrite(gm, plan, {f"layers.{layer}.q": keep, f"layers.{layer}.v": keep})
    assert out.get_parameter(f"layers.{layer}.q.weight").shape == (28, 32)
    assert out.get_parameter(f"layers.{layer}.k.weight").shape == (14, 32)
    assert out.get_parameter(f"layers.{layer}.o.weight").shape == (32, 28)
    assert _rel(out(*x), model(*x)) <= 1e-9


def test_magnitude_scores_each_slice_and_repeat_of_a_channel():
    """A channel's magnitude score sums its rows wherever the group's producers hold it: in
    each slice of a packed projection, and in every query head that repeats a key/value head."""
    weight_norms = sys.modules["fxcompress.compress"]._weight_norms
    for name, group, rows in (("window_attention", "qkv", lambda c: [("qkv", c), ("qkv", 16 + c), ("qkv", 32 + c)]),
                              ("grouped_query_attention", "layers.0.q",
                               lambda c: [("k", c), ("q", c // 8 * 16 + c % 8), ("q", c // 8 * 16 + 8 + c % 8)]),
                              ("interleaved_heads", "qkv.1", lambda c: [("qkv", c // 8 * 24 + j * 8 + c % 8) for j in range(3)])):
        cls, inputs = ORACLES[name]
        model = cls().double().eval()
        gm = capture(model, inputs())
        plan = analyze_graph(gm)
        params = {"qkv": model.qkv} if name == "window_attention" else {"qkv": model.qkv[1]} \
            if name == "interleaved_heads" else {n: model.layers[0][n] for n in "qk"}
        expected = torch.stack([sum(sum(t[r].pow(2).sum() for t in (params[p].weight, params[p].bias) if t is not None)
                                    for p, r in rows(c)) for c in range(16)])  # weights and biases alike
        torch.testing.assert_close(weight_norms(gm, plan[group]), expected.detach())


def test_one_key_value_head_that_every_query_head_repeats_takes_exact_transforms():
    """Multi-query attention: one key/value head is no cut into heads, yet the 4 query heads
    (and the output projection's 4 slices) repeat it; rotations of it stay exact."""
    cls, inputs = ORACLES["grouped_query_attention"]
    torch.manual_seed(10)
    model = cls(kv_heads=1).double().eval()
    x = inputs()
    gm = capture(model, x)
    plan = analyze_graph(gm)
    for layer in range(2):
        values = plan[f"layers.{layer}.v"]
        assert (values.size, values.blocks) == (8, 1) and values.exact == ("selection", "projection")
        assert [str(u) for u in values.consumers] == [f"layers.{layer}.o.weight[1] (each block ×4)"]
    out = rewrite(gm, plan, exact_transforms(plan, seed=3))
    assert _rel(out(*x), model(*x)) <= 1e-9


def test_narrowing_packed_window_attention_resizes_the_head_dim():
    """Query, key and value all zero on the last dim of each head: dropping it keeps the
    function; the packed projection loses a row per head in each of its three slices, and
    the (3, heads, head dim) view follows."""
    dead = [part * 16 + head * 8 + 7 for part in range(3) for head in range(2)]
    model, x, gm, plan = _with_dead_rows("window_attention", 8, {"qkv.weight": dead})
    assert (plan["qkv"].blocks, plan["qkv"].block_size) == (2, 8)
    out = rewrite(gm, plan, {"qkv": Projection.select([h * 8 + i for h in range(2) for i in range(7)], 16)})
    assert out.get_parameter("qkv.weight").shape == (42, 16) and out.get_parameter("proj.weight").shape == (16, 14)
    views = [list(n.args[1])[2:] for n in out.graph.nodes if n.target == torch.ops.aten.reshape.default
             and len(n.args[1]) == 5]
    assert views == [[3, 2, 7]]
    assert _rel(out(*x), model(*x)) <= 1e-9


def test_narrowing_a_projection_packed_head_by_head_moves_every_slice():
    """Query, key and value zero on the last dim of each head, packed [q₀ k₀ v₀ q₁ k₁ v₁]:
    dropping it keeps the function; GPT-NeoX's (…, H, 3h) view and chunk, and BLOOM's
    (…, H, 3, h) view, follow."""
    dead = [head * 24 + part * 8 + 7 for head in range(2) for part in range(3)]
    model, x, gm, plan = _with_dead_rows("interleaved_heads", 11,
                                         {f"qkv.{i}.{w}": dead for i in range(2) for w in ("weight", "bias")})
    keep = Projection.select([h * 8 + i for h in range(2) for i in range(7)], 16)
    out = rewrite(gm, plan, {name: keep for name in ("qkv.0#1", "qkv.0", "qkv.1")})
    assert [out.get_parameter(f"qkv.{i}.weight").shape for i in range(2)] == [(42, 16)] * 2
    views = [list(n.args[1])[2:] for n in out.graph.nodes if n.target == torch.ops.aten.view.default]
    splits = [list(n.args[1]) for n in out.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default]
    assert views[:2] == [[2, 21], [2, 3, 7]] and splits == [[7, 7, 7]]
    assert _rel(out(*x), model(*x)) <= 1e-9


def test_narrowing_a_grouped_convolution_block_by_block_is_exact_on_dead_and_constant_channels():
    """One dead channel in each of the 4 groups of ``reduce`` (and of ``grouped``'s outputs)
    can go, block by block; ``pair_a``'s outputs 4, 5, 10 and 11 are constant, so dropping
    them with their mean folded into ``pair_b``'s bias (group by group) loses nothing."""
    dead = {"reduce": [1, 6, 9, 14], "grouped": [0, 5, 7, 11], "pair_a": [4, 5, 10, 11]}
    # BatchNorm at its defaults and ReLU keep zero at zero
    model, x, gm, plan = _with_dead_rows("grouped_conv", 7, {f"{name}.weight": rows for name, rows in dead.items()})
    projections = {name: Projection.select([i for i in range(plan[name].size) if i not in off], plan[name].size)
                   for name, off in dead.items()}
    projections["pair_a"] = dataclasses.replace(projections["pair_a"], mean=model.pair_a.bias.detach().clone())
    out = rewrite(gm, plan, projections)
    assert out.get_parameter("grouped.weight").shape == (8, 3, 3, 3)  # 4 groups of 2 outputs reading 3 inputs each
    assert out.get_parameter("pair_b.weight").shape == (6, 4, 1, 1)
    groups = [arg(n, "groups") for n in out.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert groups == [1, 1, 4, 1, 2, 2]  # the convolutions keep their group counts
    assert _rel(out(*x), model(*x)) <= 1e-9
    with pytest.raises(RewriteError, match="4 blocks of 4: its projection must be block-diagonal"):
        rewrite(gm, plan, {"reduce": Projection.select(range(12), 16)})  # groups 0-2 whole, group 3 gone


def test_groups_keep_their_names_as_their_blocks_narrow_to_one_channel():
    """Narrowing a convolution's groups to one input channel each (a depthwise channel
    multiplier) leaves a group with nothing to narrow, under its name: the RMT-KD loop targets
    groups by name from round to round."""
    cls, inputs = ORACLES["grouped_conv"]
    torch.manual_seed(12)
    model = cls().eval()
    batches = [inputs(8) for _ in range(2)]
    names = [g.name for g in fxcompress.analyze(model, batches[0]).groups]
    config = CompressConfig(rule="fixed", ratio=0.5, round_to=1)
    module = model
    for _ in range(2):  # 4 groups of 4 → of 2 → of 1
        module = fxcompress.compress(module, batches, dataclasses.replace(config, targets="reduce")).module
    plan = fxcompress.analyze(module, batches[0])
    assert [g.name for g in plan.groups] == names and (plan["reduce"].size, plan["reduce"].blocks) == (4, 4)
    report = {r.name: r for r in fxcompress.compress(module, batches, config).report}
    assert report["reduce"].frozen_by == ("one channel per block: nothing to narrow",)
    assert report["grouped"].k < report["grouped"].d  # the multiplier's outputs, 3 per group, still narrow


def test_a_head_group_takes_only_block_diagonal_projections():
    _, _, gm, plan = _attention_model()
    with pytest.raises(RewriteError, match="4 blocks of 8: its projection must be block-diagonal"):
        rewrite(gm, plan, {"layers.0.v": Projection.select(range(16), 32)})  # heads 0-1 kept whole, 2-3 dropped


def test_a_selection_copies_the_kept_entries_and_a_rotation_contracts_them():
    along = sys.modules["fxcompress.rewrite"]._along
    w = torch.randn(3, 10, 5)  # axis 1 holds a concatenation; the group is its slice [3, 7)
    picked = along(w, Projection.select([2, 0, 3], 4).matrix, axis=1, start=3, length=4)
    assert picked.dtype == w.dtype and torch.equal(picked, w[:, [0, 1, 2, 5, 3, 6, 7, 8, 9]])
    rotation = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0][:3]
    rotated = along(w, rotation, axis=1, start=3, length=4)
    assert rotated.shape == (3, 9, 5) and torch.equal(rotated[:, 6:], w[:, 7:])
    assert torch.allclose(rotated[:, 3:6], torch.einsum("kd,adb->akb", rotation.float(), w[:, 3:7]), atol=1e-6)


def test_keep_all_returns_the_same_function():
    cls, inputs = ORACLES["conv_bn_residual"]
    model = cls().eval()
    data = [inputs(4) for _ in range(2)]
    result = fxcompress.compress(model, data, CompressConfig(rule="keep-all"))
    assert result.params_after == result.params_before and not result.compressed
    assert "nothing was compressible" in str(result)
    assert torch.allclose(result.module(*data[0]), model(*data[0]), atol=1e-6)


def test_a_group_without_a_usable_spectrum_is_kept_whole_and_reported():
    cls, inputs = ORACLES["residual_mlp"]
    model = cls().eval()
    (x,) = inputs(1)
    data = [(x.expand(8, -1),) for _ in range(2)]  # 16 copies of one sample: every activation is constant
    result = fxcompress.compress(model, data)
    assert not result.compressed and "nothing was compressible" in str(result)
    kept = [r for r in result.report if r.frozen_by and r.frozen_by[0].startswith("calibration:")]
    assert {r.name for r in kept} == {"fc_in", "blocks.0.fc1", "blocks.1.fc1"}
    assert all("constant" in r.frozen_by[0] and r.k == r.d for r in kept)
    assert not set(result.selections) & {r.name for r in kept}


@pytest.mark.parametrize("name", sorted(ORACLES))
# the zoo's widths are 4-64: round_to=1, or rounding up to 8 would keep the smallest whole
@pytest.mark.parametrize("config", [CompressConfig(rule="fixed", ratio=0.5, round_to=1), CompressConfig(round_to=1)],
                         ids=["fixed", "default"])
def test_compress_runs_on_the_zoo(name, config):
    cls, inputs = ORACLES[name]
    torch.manual_seed(3)
    model = cls().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [inputs(8) for _ in range(3)]
    result = fxcompress.compress(model, data, config)
    out, ref = result.module(*data[0]), model(*data[0])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    spectral = [r for r in result.report if r.rule is not None]
    few = {r.name for r in spectral if result.plan[r.name].block_size < MIN_EIGENVALUES}  # eigenvalues per block
    if config.rule != "fixed":  # with fewer than MIN_EIGENVALUES eigenvalues there is no noise bulk to fit
        assert all(r.k == r.d and "too few" in r.warnings[0] for r in spectral if r.name in few)
    if config.rule == "fixed" or any(r.name not in few for r in spectral):
        assert result.params_after < result.params_before
        assert result.compressed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    result.module.train()
    result.module(*data[1]).float().sum().backward()  # trainable
    torch.optim.SGD(result.module.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # and its own: training it
    blob = result.to_dict()
    assert blob["params_after"] == result.params_after and len(blob["groups"]) == len(result.plan.groups)


def test_a_group_one_channel_wide_is_kept_and_reported():
    """A waveform gains its channel axis by ``x[:, None]`` (wav2vec2's feature extractor): a
    width of one that no input freezes, and nothing to narrow."""

    class Waveform(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(1, 16, 5), nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x[:, None])).mean(dim=-1))

    result = fxcompress.compress(Waveform(), [torch.randn(8, 40) for _ in range(2)],
                                 CompressConfig(rule="fixed", ratio=0.5, round_to=1))
    assert {r.name: r.frozen_by for r in result.report}["conv.in"] == ("one channel per block: nothing to narrow",)
    assert {r.name: r.k for r in result.report}["conv"] == 8


def test_report_has_the_spectral_figures():
    cls, inputs = ORACLES["residual_mlp"]
    result = fxcompress.compress(cls().eval(), [inputs(16) for _ in range(4)], CompressConfig(rule="mp-robust"))
    narrowed = {r.name: r for r in result.report if r.rule is not None}
    assert set(narrowed) == {"fc_in", "blocks.0.fc1", "blocks.1.fc1"}
    for r in narrowed.values():
        assert r.sigma2 > 0 and r.lambda_plus > r.sigma2 and 1 <= r.k <= r.d
    assert narrowed["blocks.0.fc1"].transform == "selection" and narrowed["fc_in"].transform == "projection"


def test_targets_choose_groups():
    cls, inputs = ORACLES["residual_mlp"]
    data = [inputs() for _ in range(2)]
    result = fxcompress.compress(cls().eval(), data, CompressConfig(rule="fixed", ratio=0.5, targets=("blocks.*",)))
    assert {r.name for r in result.compressed} == {"blocks.0.fc1", "blocks.1.fc1"}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, d: fxcompress.compress("model", d), FxCompressError, "expected an nn.Module"),
        (lambda m, d: fxcompress.compress(m, []), DataError, "calib_data is empty"),
        (lambda m, d: fxcompress.compress(m, d[0][0]), ConfigError, "not a single batch"),
        (lambda m, d: fxcompress.compress(m, [d[0], {"x": d[1][0]}]), DataError, "same inputs"),
        (lambda m, d: fxcompress.compress(m, d, CompressConfig(targets=("nope",))), ConfigError, "matches no width group"),
        (lambda m, d: fxcompress.compress(m, d, CompressConfig(rule="fixed", k=1000)), ConfigError, "k must be"),
        (lambda m, d: CompressConfig(rule="median"), ConfigError, "unknown rule"),
        (lambda m, d: CompressConfig(rule="fixed"), ConfigError, "exactly one"),
        (lambda m, d: CompressConfig(transform="prune"), ConfigError, "transform"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_untouched(call, error, match):
    cls, inputs = ORACLES["residual_mlp"]
    model = cls().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(model, [inputs(), inputs()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_float_inputs_to_a_token_model_fail_clearly():
    cls, _ = ORACLES["post_ln_transformer"]
    with pytest.raises(FxCompressError, match="could not capture"):
        fxcompress.compress(cls().eval(), [torch.randn(2, 6)])


def test_rewrite_refuses_frozen_groups_and_bad_widths():
    cls, inputs = ORACLES["residual_mlp"]
    gm = capture(cls().eval(), inputs())
    plan = analyze_graph(gm)
    with pytest.raises(RewriteError, match="frozen"):
        rewrite(gm, plan, {"head": Projection(torch.eye(4)[:2])})
    with pytest.raises(RewriteError, match="has width 64"):
        rewrite(gm, plan, {"blocks.0.fc1": Projection(torch.eye(32))})
    with pytest.raises(RewriteError, match="no width group"):
        rewrite(gm, plan, {"nope": Projection(torch.eye(4))})


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_transformers_models_compress(family):
    import transformers as tf

    torch.manual_seed(4)
    if family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=128,
                                                               max_position_embeddings=32))
    elif family == "gpt2":  # Conv1D layers (addmm), a tied LM head, a KV cache capture must switch off
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=200, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    elif family == "llama":  # grouped-query attention, written-out RMSNorm, rotary embeddings, SwiGLU
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=32))
    else:  # an encoder-decoder whose decoder stack has a config (and a KV cache) of its own
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=200, d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                                          num_heads=4))
    model.eval()
    caching = lambda: [m.config.use_cache for m in model.modules() if hasattr(m, "config")]  # noqa: E731
    cached = caching()
    decoder = {"decoder_input_ids": torch.randint(0, 200, (4, 6))} if family == "t5" else {}
    batches = [{"input_ids": torch.randint(0, 200, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
                **decoder} for _ in range(2)]
    result = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5))
    out = result.module(**batches[0]).logits
    assert out.shape == model(**batches[0]).logits.shape and torch.isfinite(out).all()
    assert result.params_after < 0.7 * result.params_before
    assert caching() == cached and cached[0] is True  # capture switched caching off in its own copy only
    if family == "llama":  # values and output projections narrow exactly, per key/value head; rotary query/key
        values = [r for r in result.report if r.name.endswith("v_proj")]  # by frequency pairs, shared by the layers
        assert len(values) == 2 and all(r.k < r.d and r.exact for r in values)
        (rotary,) = [r for r in result.report if r.name.endswith("q_proj")]
        assert rotary.d == 8 and not rotary.frozen_by  # 8 pairs: rounded to 8 they stay; round_to=1 narrows them
        narrower = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5, round_to=1,
                                                                      targets=(rotary.name,)))
        weights = narrower.module.state_dict()
        assert weights["model.rotary_emb.inv_freq"].shape == (4,)
        assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 8, 64)  # 2 heads × 4 pairs × 2 halves
        assert torch.isfinite(narrower.module(**batches[0]).logits).all()


def test_fixed_ratio_is_honoured_with_fewer_samples_than_features():
    """n < d: only n - 1 directions carry variance; a fixed width still gets its k."""
    cls, inputs = ORACLES["residual_mlp"]
    result = fxcompress.compress(cls().eval(), [inputs(4)], CompressConfig(rule="fixed", ratio=0.5, round_to=1,
                                                                          transform="projection"))
    widths = {r.name: r.k for r in result.report if r.rule is not None}
    assert widths == {"fc_in": 16, "blocks.0.fc1": 32, "blocks.1.fc1": 32}
    x = inputs(5)[0]
    assert result.module(x).shape == (5, 4)


@pytest.mark.parametrize("name", ["conv_bn_residual", "post_ln_transformer", "grouped_conv"])
def test_rebuild_from_steps_and_state_dict(name):
    """Two compress calls in a row; the original model, the two steps and the final state
    dict give back the same function, and the steps survive a JSON round trip."""
    import json

    cls, inputs = ORACLES[name]
    torch.manual_seed(5)
    model = cls().eval()
    batches = [inputs(8) for _ in range(2)]
    groups = [g.name for g in fxcompress.analyze(model, batches[0]).compressible]
    first = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5, round_to=1, targets=groups[0]))
    second = fxcompress.compress(first.module, batches, CompressConfig(rule="fixed", ratio=0.5, round_to=1, targets=groups[-1]))
    steps = json.loads(json.dumps([first.step, second.step]))
    assert steps[0]["widths"] and steps[1]["widths"]
    rebuilt = fxcompress.rebuild(model, batches[0], steps, second.module.state_dict()).eval()
    x = inputs(3)
    torch.testing.assert_close(rebuilt(*x), second.module.eval()(*x), rtol=0, atol=0)


def test_folded_batch_norms_make_bottlenecks_rotatable_and_rebuild():
    """MobileNetV2 with BatchNorm folded: its linear bottlenecks take exact rotations (the
    projection transform under "auto"), and the fold is a step that rebuild replays."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    result = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5, fold_batchnorm=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    assert any(r.transform == "projection" and r.exact for r in result.report)
    assert result.step["fold_batchnorm"] is True
    rebuilt = fxcompress.rebuild(model, batches[0], [result.step], result.module.state_dict()).eval()
    torch.testing.assert_close(rebuilt(batches[1]), result.module(batches[1]), rtol=0, atol=0)


def test_rebuild_rejects_a_state_dict_of_another_model():
    cls, inputs = ORACLES["residual_mlp"]
    model = cls().eval()
    result = fxcompress.compress(model, [inputs(8)], CompressConfig(rule="fixed", ratio=0.5))
    with pytest.raises(ConfigError, match="does not fit"):
        fxcompress.rebuild(model, inputs(2), [result.step], model.state_dict())
    with pytest.raises(ConfigError, match="another model"):
        fxcompress.rebuild(model, inputs(2), [{"widths": {"nope": 3}}])
    with pytest.raises(ConfigError, match="must lie in"):
        fxcompress.rebuild(model, inputs(2), [{"widths": {"fc_in": 10_000}}])


def test_widths_narrow_only_the_named_groups_and_magnitude_keeps_the_heaviest_channels():
    cls, inputs = ORACLES["residual_mlp"]
    torch.manual_seed(6)
    model = cls().eval()
    heavy = [3, 10, 17, 40, 41, 50, 60, 63]
    with torch.no_grad():
        model.blocks[0]["fc1"].weight[heavy] *= 10
    config = CompressConfig(rule="fixed", widths={"blocks.0.fc1": 8}, transform="magnitude")
    result = fxcompress.compress(model, [inputs(16) for _ in range(2)], config)
    widths = {r.name: r.k for r in result.report if r.k < r.d}
    assert widths == {"blocks.0.fc1": 8}
    kept = result.module.state_dict()["blocks.0.fc1.weight"]
    torch.testing.assert_close(kept, model.blocks[0]["fc1"].weight[heavy].detach())
    with pytest.raises(ConfigError, match="not a width group"):
        fxcompress.compress(model, [inputs(4)], CompressConfig(rule="fixed", widths={"nope": 2}))
    with pytest.raises(ConfigError, match="exactly one of"):
        CompressConfig(rule="fixed", ratio=0.5, widths={"fc_in": 2})


@pytest.mark.parametrize("rule", ["keep-all", "fixed"])
def test_tied_weights_keep_every_name_and_stay_one_tensor(rule):
    """An embedding tied to its language-model head: export keeps one name of the tensor; the
    result has the user's every key, one tensor behind them, and no dead full-size copy."""
    import operator

    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batch = {"input_ids": torch.randint(0, 300, (2, 8))}
    result = fxcompress.compress(model, [batch, batch], CompressConfig(rule=rule, **({"ratio": 0.5} if rule == "fixed" else {})))
    state = result.module.state_dict()
    assert set(model.state_dict()) <= set(state)
    assert state["model.embed_tokens.weight"].data_ptr() == state["lm_head.weight"].data_ptr()
    used = {id(operator.attrgetter(n.target)(result.module)) for n in result.module.graph.nodes if n.op == "get_attr"}
    assert result.params_after == sum(p.numel() for p in result.module.parameters() if id(p) in used)


def test_outputs_the_user_does_not_need_stop_pinning_widths():
    """BART for classification returns the encoder's hidden states beside the logits: kept,
    they pin the shared stream; with outputs=("logits",) it narrows, and rebuild replays it."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BartForSequenceClassification(tf.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
        num_labels=3)).eval()
    ids = torch.randint(3, 100, (4, 10))
    ids[:, -1] = model.config.eos_token_id
    batches = [{"input_ids": ids}]
    stream = "model.decoder.embed_tokens"
    kept = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5))
    assert any("model output" in r for r in kept.plan[stream].frozen_by)
    result = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5, outputs=["logits"]))
    assert not result.plan[stream].frozen and result.step["outputs"] == ["logits"]
    out = result.module(**batches[0])
    assert out.encoder_last_hidden_state is None and out.logits.shape == (4, 3)
    rebuilt = fxcompress.rebuild(model, batches[0], [result.step], result.module.state_dict())
    assert torch.allclose(rebuilt(**batches[0]).logits, out.logits)
    with pytest.raises(fxcompress.ConfigError, match="not outputs of the model"):
        fxcompress.compress(model, batches, CompressConfig(outputs=("scores",)))


def test_the_report_says_how_far_the_output_moved():
    """"exact at k = d" is about the transform; the narrowed output moves, and the report says by how much."""
    cls, inputs = ORACLES["residual_mlp"]
    torch.manual_seed(0)
    model = cls().eval()
    batches = [inputs(16) for _ in range(2)]
    result = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5, round_to=1))
    with torch.no_grad():
        ref, out = model(*batches[0]), result.module(*batches[0])
    assert result.output_change == pytest.approx(float((out - ref).abs().max() / ref.abs().max()), rel=1e-6)
    assert result.output_change > 0 and "exact at k = d" in str(result) and "output change" in str(result)
    assert result.to_dict()["output_change"] == result.output_change
    whole = fxcompress.compress(model, batches, CompressConfig(rule="keep-all"))
    assert whole.output_change == 0.0


def test_labelled_batches_lose_their_target():
    """A training DataLoader's (images, labels): forward takes one input, so the labels go."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    result = fxcompress.compress(model, data, CompressConfig(rule="fixed", ratio=0.5))
    assert result.compressed and result.module(data[0][0]).shape == (4, 10)


class _Twins(nn.Module):
    """A residual MLP whose stream (and hidden layer) holds every channel twice: channel 8 + i is
    a positive multiple of channel i after every op, so half the channels predict the rest."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.res, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        twice = torch.tensor([1.0] * 8 + [2.5] * 8)
        with torch.no_grad():
            for layer in (self.inp, self.mid, self.res):
                layer.weight[8:] = layer.weight[:8]
                layer.bias[8:] = layer.bias[:8]
                layer.weight.mul_(twice[:, None])
                layer.bias.mul_(twice)

    def forward(self, x):
        s1 = torch.relu(self.inp(x))
        s2 = s1 + self.res(torch.relu(self.mid(s1)))  # the stream's consumers read s1 and s2
        return self.out(s2)


@pytest.mark.parametrize("rule, fold_mean", [("fixed", True), ("mp-robust", True), ("fixed", False)])
def test_a_selection_reads_the_dropped_channels_back_from_the_kept_ones(rule, fold_mean):
    """Least squares on the calibration covariance predicts each dropped channel from the kept
    ones at every activation a consumer reads (from the second moment, without an intercept,
    where no mean is folded): exact on new data where they determine it, while dropping them
    (reconstruct=False) is far off."""
    torch.manual_seed(0)
    model = _Twins().eval()
    calib = [torch.randn(64, 6) for _ in range(8)]
    options = dict(ratio=0.5) if rule == "fixed" else dict(agreement=None)  # the rule's own widths
    fresh = torch.randn(256, 6)
    with torch.no_grad():
        ref = model(fresh)
    errors = {}
    for reconstruct in (True, False):
        config = CompressConfig(rule=rule, round_to=1, reconstruct=reconstruct, fold_mean=fold_mean, **options)
        result = fxcompress.compress(model, calib, config)
        assert {r.k for r in result.compressed} == {8} and all(r.transform == "selection" for r in result.compressed)
        with torch.no_grad():
            errors[reconstruct] = _rel(result.module(fresh), ref)
    assert errors[True] < 1e-4 < 1e-2 < errors[False]


def test_a_lift_of_the_wrong_shape_is_refused():
    model = _Twins().eval()
    gm = capture(model, (torch.randn(4, 6),))
    plan = analyze_graph(gm)
    group = next(g for g in plan.compressible if g.size == 16)
    bad = dataclasses.replace(Projection.select(range(8), 16), lifts={group.probe: torch.zeros(16, 7)})
    with pytest.raises(RewriteError, match="lift"):
        rewrite(gm, plan, {group.name: bad})


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 24),
                         nn.ReLU(), nn.Linear(24, 10)).eval()


def test_agreement_scales_the_rule_widths_to_the_smallest_model_that_agrees_enough():
    model = _small_cnn()
    calib = [torch.randn(32, 3, 8, 8) for _ in range(4)]
    results = {t: fxcompress.compress(model, calib, CompressConfig(rule="fixed", ratio=0.25, round_to=1, agreement=t,
                                                                     reconstruct=False))
               for t in (0.6, 0.95)}
    for target, result in results.items():
        factor, agreement = result.level
        with torch.no_grad():
            hits = torch.cat([model(x).argmax(-1) == result.module(x).argmax(-1) for x in calib])
        assert agreement == pytest.approx(float(hits.float().mean())) and agreement >= target
        assert {r.k for r in result.report if r.rule} == {min(r.d, max(1, math.ceil(factor * (r.d // 4) - 1e-9)))
                                                         for r in result.report if r.rule}
        assert f"× {factor:.3f}" in str(result) and result.to_dict()["level"] == result.level
    assert results[0.6].params_after <= results[0.95].params_after


@pytest.mark.parametrize("make, config, match", [
    (lambda: _small_cnn().train(), dict(rule="mp-robust", agreement=0.9), "eval"),
    (lambda: nn.Sequential(*_small_cnn()[:-1], nn.Linear(24, 1)).eval(), dict(rule="mp-robust", agreement=0.9),
     "two or more classes"),
])
def test_agreement_needs_a_deterministic_model_with_logits(make, config, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        fxcompress.compress(model, [torch.randn(8, 3, 8, 8)], CompressConfig(**config))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_default_level_is_for_the_spectral_rules_and_not_for_budgets():
    assert CompressConfig().agreement == "auto" and CompressConfig().target_agreement == 0.8
    assert CompressConfig(rule="mp-robust").target_agreement == 0.8
    assert CompressConfig(rule="fixed", ratio=0.5).target_agreement is None
    assert CompressConfig(rule="keep-all").target_agreement is None
    assert CompressConfig(agreement=None).target_agreement is None
    assert CompressConfig(rule="fixed", ratio=0.5, agreement=0.9).target_agreement == 0.9
    with pytest.raises(ConfigError, match="'auto'"):
        CompressConfig(agreement="0.8")
    model = _small_cnn()
    calib = [torch.randn(32, 3, 8, 8) for _ in range(4)]
    default, own = (fxcompress.compress(model, calib, CompressConfig(round_to=1, **extra))
                    for extra in ({}, {"agreement": None}))
    assert default.level is not None and default.level[1] >= 0.8 and own.level is None


def test_agreement_is_refused_with_explicit_widths():
    with pytest.raises(ConfigError, match="agreement"):
        CompressConfig(rule="fixed", widths={"a": 2}, agreement=0.9)
    with pytest.raises(ConfigError, match="agreement"):
        CompressConfig(agreement=1.5)
