"""Width analysis against hand-declared oracles (tests/zoo.py)."""

import json

import pytest
import torch

from fxcompress.analysis import analyze, analyze_graph
from fxcompress.analysis.ops import MODULE_RULES, OP_RULES
from fxcompress.capture import capture
from fxcompress.rewrite import Projection, exact_transforms, rewrite
from zoo import ORACLES

FROZEN = "frozen"

# name: (size, producers, consumers, per-channel, exact transforms or FROZEN)
EXPECTED = {
    "residual_mlp": {
        "fc_in.in": (16, [], ["fc_in.weight[1]"], [], FROZEN),
        "fc_in": (32, ["fc_in.weight[0]", "fc_in.bias[0]", "blocks.0.fc2.weight[0]", "blocks.0.fc2.bias[0]",
                       "blocks.1.fc2.weight[0]", "blocks.1.fc2.bias[0]"],
                  ["blocks.0.fc1.weight[1]", "blocks.1.fc1.weight[1]", "head.weight[1]"], [], ("selection", "projection")),
        "blocks.0.fc1": (64, ["blocks.0.fc1.weight[0]", "blocks.0.fc1.bias[0]"], ["blocks.0.fc2.weight[1]"], [], ("selection",)),
        "blocks.1.fc1": (64, ["blocks.1.fc1.weight[0]", "blocks.1.fc1.bias[0]"], ["blocks.1.fc2.weight[1]"], [], ("selection",)),
        "head": (4, ["head.weight[0]", "head.bias[0]"], [], [], FROZEN),
    },
    "conv_bn_residual": {
        "stem.in": (3, [], ["stem.weight[1]"], [], FROZEN),
        "stem": (8, ["stem.weight[0]", "conv2.weight[0]"], ["conv1.weight[1]", "fc.weight[1]"], ["bn0[0]", "bn2[0]"], ("selection",)),
        "conv1": (12, ["conv1.weight[0]"], ["conv2.weight[1]"], ["bn1[0]"], ("selection",)),
        "fc": (10, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "concat": {  # each input of the concatenation is its own group; the mixer reads each in a slice
        "a.in": (3, [], ["a.weight[1]", "b.weight[1]"], [], FROZEN),
        "a": (4, ["a.weight[0]", "a.bias[0]"], ["mix.weight[1][0:4]"], [], ("selection",)),
        "b": (6, ["b.weight[0]", "b.bias[0]"], ["mix.weight[1][4:10]"], [], ("selection",)),
        "mix": (5, ["mix.weight[0]", "mix.bias[0]"], ["fc.weight[1]"], [], ("selection", "projection")),
        "fc": (2, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "dense_block": {
        "stem.in": (3, [], ["stem.weight[1]"], [], FROZEN),
        "stem": (8, ["stem.weight[0]", "stem.bias[0]"],
                 ["conv1.weight[1]", "conv2.weight[1][0:8]", "transition.weight[1][0:8]"],
                 ["bn1[0]", "bn2[0][0:8]", "bn3[0][0:8]"], ("selection",)),
        "conv1": (4, ["conv1.weight[0]", "conv1.bias[0]"], ["conv2.weight[1][8:12]", "transition.weight[1][8:12]"],
                  ["bn2[0][8:12]", "bn3[0][8:12]"], ("selection",)),
        "conv2": (4, ["conv2.weight[0]", "conv2.bias[0]"], ["transition.weight[1][12:16]"], ["bn3[0][12:16]"],
                  ("selection",)),
        "transition": (6, ["transition.weight[0]", "transition.bias[0]"], ["fc.weight[1]"], [], ("selection", "projection")),
        "fc": (3, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "depthwise": {
        "expand.in": (3, [], ["expand.weight[1]"], [], FROZEN),
        "expand": (8, ["expand.weight[0]"], ["project.weight[1]"], ["bn1[0]", "dw.weight[0]", "bn2[0]"], ("selection",)),
        "project": (16, ["project.weight[0]", "project.bias[0]"], ["fc.weight[1]"], [], ("selection", "projection")),
        "fc": (3, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "grouped_conv": {  # a grouped convolution's input axis is read per block of its outputs
        "stem.in": (3, [], ["stem.weight[1]"], [], FROZEN),
        "stem": (8, ["stem.weight[0]", "stem.bias[0]", "expand.weight[0]", "expand.bias[0]"],
                 ["reduce.weight[1]", "pair_a.weight[1] per block of [0]"], [], ("selection",)),
        "reduce": (16, ["reduce.weight[0]"], ["grouped.weight[1] per block of [0]"], ["bn1[0]"], ("selection",)),
        "grouped": (12, ["grouped.weight[0]"], ["expand.weight[1]"], ["bn2[0]"], ("selection",)),
        "pair_a": (12, ["pair_a.weight[0]", "pair_a.bias[0]"], ["pair_b.weight[1] per block of [0]"], [],
                   ("selection", "projection")),
        "pair_b": (6, ["pair_b.weight[0]", "pair_b.bias[0]"], ["fc.weight[1]"], [], ("selection", "projection")),
        "fc": (2, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "tied_embeddings": {
        "embed": (16, ["embed.weight[1]", "fc.weight[0]", "fc.bias[0]"], ["fc.weight[1]", "embed.weight[1]"], [], ("selection",)),
        "embed#1": (50, ["embed.weight[0]"], [], [], FROZEN),
    },
    "torch_encoder": {  # nn.MultiheadAttention, captured head-explicit: packed q/k/v split, two heads
        "embed.in": (8, [], ["embed.weight[1]"], [], FROZEN),
        "embed": (16, ["embed.weight[0]", "embed.bias[0]", "layer.self_attn.out_proj.weight[0]",
                       "layer.self_attn.out_proj.bias[0]", "layer.norm1.bias[0]", "layer.linear2.weight[0]",
                       "layer.linear2.bias[0]", "layer.norm2.bias[0]"],
                  ["layer.self_attn.in_proj_weight[1]", "layer.linear1.weight[1]", "fc.weight[1]"],
                  ["layer.norm1.weight[0]", "layer.norm2.weight[0]"], ()),
        "layer.self_attn": (16, ["layer.self_attn.in_proj_weight[0][32:48]", "layer.self_attn.in_proj_bias[0][32:48]"],
                            ["layer.self_attn.out_proj.weight[1]"], [], ("selection", "projection")),
        "layer.self_attn#1": (16, ["layer.self_attn.in_proj_weight[0][0:16]", "layer.self_attn.in_proj_bias[0][0:16]",
                                   "layer.self_attn.in_proj_weight[0][16:32]", "layer.self_attn.in_proj_bias[0][16:32]"],
                              [], [], ("selection", "projection")),  # query and key turned alike: the scores stay
        "layer.linear1": (32, ["layer.linear1.weight[0]", "layer.linear1.bias[0]"], ["layer.linear2.weight[1]"], [],
                          ("selection",)),
        "fc": (3, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "grouped_query_attention": {  # 4 query heads read 2 key/value heads: the groups are the 2, the query side repeats them
        "embed": (32, ["embed.weight[1]", "layers.0.o.weight[0]", "layers.1.o.weight[0]"],
                  [f"layers.{i}.{n}.weight[1]" for i in range(2) for n in "qkv"] + ["classifier.weight[1]"],
                  ["layers.0.norm.weight[0]", "layers.1.norm.weight[0]", "norm.weight[0]"], ()),  # RMSNorm: approximate
        **{f"layers.{i}.q": (16, [f"layers.{i}.q.weight[0] (each block ×2)", f"layers.{i}.k.weight[0]"], [], [],
                             ("selection", "projection")) for i in range(2)},
        **{f"layers.{i}.v": (16, [f"layers.{i}.v.weight[0]"], [f"layers.{i}.o.weight[1] (each block ×2)"], [],
                             ("selection", "projection")) for i in range(2)},
        "classifier": (2, ["classifier.weight[0]", "classifier.bias[0]"], [], [], FROZEN),
    },
    "window_attention": {  # query, key and value in one group: indexed apart from one (3, heads, head dim) view
        "embed.in": (8, [], ["embed.weight[1]"], [], FROZEN),
        "embed": (16, ["embed.weight[0]", "embed.bias[0]", "proj.weight[0]", "proj.bias[0]"],
                  ["qkv.weight[1]", "fc.weight[1]"], [], ("selection", "projection")),
        "qkv": (16, ["qkv.weight[0][0:16]", "qkv.weight[0][16:32]", "qkv.weight[0][32:48]"], ["proj.weight[1]"], [],
                ("selection",)),
        "fc": (3, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "interleaved_heads": {  # [q₀ k₀ v₀ q₁ k₁ v₁]: each part's group takes one slice per head
        "embed.in": (8, [], ["embed.weight[1]"], [], FROZEN),
        "embed": (16, ["embed.weight[0]", "embed.bias[0]", "o.0.weight[0]", "o.0.bias[0]", "o.1.weight[0]", "o.1.bias[0]"],
                  ["qkv.0.weight[1]", "qkv.1.weight[1]", "fc.weight[1]"], [], ("selection", "projection")),
        "qkv.0": (16, [f"qkv.0.{w}[0][{s}] (block {g})" for s, g in (("16:24", 0), ("40:48", 1)) for w in ("weight", "bias")],
                  ["o.0.weight[1]"], [], ("selection", "projection")),  # GPT-NeoX's view (…, H, 3h), chunked: the value
        "qkv.0#1": (16, [f"qkv.0.{w}[0][{s}] (block {g})" for s, g in (("0:8", 0), ("24:32", 1), ("8:16", 0), ("32:40", 1))
                         for w in ("weight", "bias")], [], [], ("selection", "projection")),  # query and key
        "qkv.1": (16, [f"qkv.1.{w}[0][{s}] (block {g})" for s, g in (("0:8", 0), ("24:32", 1), ("8:16", 0), ("32:40", 1),
                                                                     ("16:24", 0), ("40:48", 1)) for w in ("weight", "bias")],
                  ["o.1.weight[1]"], [], ("selection", "projection")),  # BLOOM's (…, H, 3, h), indexed: q, k and v
        "fc": (3, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "channel_shuffle": {  # the view that interleaves the concatenated parts freezes them, and the halves split off
        "a.in": (3, [], ["a.weight[1]", "b.weight[1]"], [], FROZEN),
        "a": (4, ["a.weight[0]", "a.bias[0]"], [], [], FROZEN),
        "b": (4, ["b.weight[0]", "b.bias[0]"], [], [], FROZEN),
        "c.in": (4, [], ["c.weight[1]"], [], FROZEN),
        "d.in": (4, [], ["d.weight[1]"], [], FROZEN),
        "c": (6, ["c.weight[0]", "c.bias[0]", "d.weight[0]", "d.bias[0]"], ["fc.weight[1]"], [], ("selection", "projection")),
        "fc": (2, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "assorted": {  # a cast parameter is still the parameter; a computed weight freezes what it touches
        "embed.in": (8, [], ["embed.weight[1]"], [], FROZEN),
        "embed": (16, ["embed.weight[0]", "embed.bias[0]", "scale[0]"], ["w[0]"], [], ("selection",)),
        "w": (24, ["w[1]"], [], [], FROZEN),
        "normed": (12, ["normed.bias[0]"], ["fc.weight[1]"], [], FROZEN),
        "fc": (3, ["fc.weight[0]", "fc.bias[0]"], [], [], FROZEN),
    },
    "unsupported_op": {
        "fc1.in": (8, [], ["fc1.weight[1]"], [], FROZEN),
        "fc1": (24, ["fc1.weight[0]", "fc1.bias[0]"], [], [], FROZEN),
        "fc2.in": (24, [], ["fc2.weight[1]"], [], FROZEN),
        "fc2": (24, ["fc2.weight[0]", "fc2.bias[0]"], ["fc3.weight[1]"], [], ("selection",)),
        "fc3": (3, ["fc3.weight[0]", "fc3.bias[0]"], [], [], FROZEN),
    },
}


def _plan(name):
    cls, inputs = ORACLES[name]
    torch.manual_seed(0)
    return analyze(cls().eval(), inputs())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_analysis_yields_exactly_the_declared_groups(name):
    plan = _plan(name)
    found = {
        g.name: (g.size, [str(u) for u in g.producers], [str(u) for u in g.consumers], [str(u) for u in g.channels],
                 FROZEN if g.frozen else g.exact)
        for g in plan.groups
    }
    assert found == EXPECTED[name]


def test_post_ln_transformer_groups():
    plan = _plan("post_ln_transformer")
    stream = plan["embed"]
    assert stream.size == 32 and not stream.frozen
    assert stream.exact == ()  # post-LN: LayerNorm breaks rotation, so approximate
    assert "normalizing" in stream.effects
    assert len(stream.producers) == 14 and len(stream.consumers) == 9 and len(stream.channels) == 5  # LN: scale, shift
    assert {c.param for c in stream.consumers} >= {"layers.0.q.weight", "layers.1.ffn1.weight", "classifier.weight"}
    for i in range(2):
        assert plan[f"layers.{i}.ffn1"].exact == ("selection",)
        # split into 4 heads by a view: query and key share one group (SDPA contracts them),
        # value and the output projection another; each is 4 blocks of 8, narrowed alike
        qk, vo = plan[f"layers.{i}.q"], plan[f"layers.{i}.v"]
        assert (qk.size, qk.blocks, qk.block_size) == (32, 4, 8) and (vo.size, vo.blocks) == (32, 4)
        assert [str(u) for u in qk.producers] == [f"layers.{i}.{n}.{w}[0]" for n in "qk" for w in ("weight", "bias")]
        assert qk.consumers == () and qk.probe is not None  # probed at the query projection's output
        assert "attention" in qk.effects and qk.exact == ("selection", "projection")  # turned alike, it cancels
        assert [str(u) for u in vo.consumers] == [f"layers.{i}.o.weight[1]"]
        assert vo.exact == ("selection", "projection")
    assert not any(g.name.endswith(".o.in") or g.name.endswith(".k") for g in plan.groups)
    assert plan["classifier"].frozen_by == ("model output linear_12",)


def test_a_packed_qkv_projection_splits_into_its_parts():
    plan = _plan("packed_attention")
    qk, vo = plan["qkv#1"], plan["qkv"]  # named after their producer; query+key come second in graph order
    assert [str(u) for u in qk.producers] == ["qkv.weight[0][0:16]", "qkv.bias[0][0:16]", "qkv.weight[0][16:32]",
                                              "qkv.bias[0][16:32]"]
    assert (qk.size, qk.blocks) == (16, 2) and "attention" in qk.effects and not qk.frozen
    assert [str(u) for u in vo.producers] == ["qkv.weight[0][32:48]", "qkv.bias[0][32:48]"]
    assert [str(u) for u in vo.consumers] == ["o.weight[1]"] and vo.exact == ("selection", "projection")
    assert sorted(index for _, index in qk.splits) == [0, 1] and [i for _, i in vo.splits] == [2]
    assert [str(u) for u in plan["embed"].consumers] == ["qkv.weight[1]", "classifier.weight[1]"]


def test_a_head_split_that_does_not_divide_evenly_is_no_head_split():
    """(…, 12) → (…, 4, 3) is a head split; (…, 12) → (…, 2, 3, 2), a grid no attention reads, freezes."""

    class Reshapes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 12), torch.nn.Linear(6, 12)
            self.out_a, self.out_b = torch.nn.Linear(12, 2), torch.nn.Linear(12, 2)

        def forward(self, x):
            heads = self.a(x).view(x.shape[0], 4, 3).relu().reshape(x.shape[0], 12)
            odd = self.b(x).view(x.shape[0], 2, 3, 2).relu().reshape(x.shape[0], 12)
            return self.out_a(heads) + self.out_b(odd)

    plan = analyze(Reshapes(), (torch.randn(5, 6),))
    a = plan["a"]
    assert not a.frozen and (a.blocks, a.block_size) == (4, 3) and a.exact == ("selection",)
    assert [str(u) for u in a.consumers] == ["out_a.weight[1]"]
    assert any("grid, and no attention says which axis holds heads" in r for r in plan["b"].frozen_by)


def test_unknown_op_names_the_node_and_op():
    plan = _plan("unsupported_op")
    assert plan["fc1"].frozen_by == ("cumsum (aten.cumsum.default) has no width rule",)


def test_a_computed_weight_freezes_its_groups_and_says_so():
    plan = _plan("assorted")
    assert plan["w"].frozen_by[0] == "linear_1 takes a computed consumer weight (_weight_norm): only parameters are narrowed"


def test_a_parameter_reached_by_an_unrecorded_way_freezes_its_group():
    """``W @ x`` with the parameter first: no rule records it, so its group keeps its size."""

    class LeftWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w, self.b = torch.nn.Linear(4, 6), torch.nn.Parameter(torch.randn(6, 6)), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.b((self.w @ self.a(x).T).T)

    plan = analyze(LeftWeight(), (torch.randn(3, 4),))
    assert "parameter w reaches this dim (its axis 1) by a way no width rule records" in plan["a"].frozen_by


def test_probe_points_are_the_activations_feeding_consumers():
    plan = _plan("residual_mlp")
    assert plan["blocks.0.fc1"].probe == "relu"
    assert plan["fc_in"].probe == "linear"  # the stream as it enters the first block
    assert _plan("conv_bn_residual")["stem"].probe == "relu"


def test_plan_prints_and_serialises():
    plan = _plan("conv_bn_residual")
    text = str(plan)
    assert "4 width groups, 2 compressible" in text and "stem" in text
    blob = json.loads(plan.to_json())
    assert [g["name"] for g in blob["groups"]] == ["stem.in", "stem", "conv1", "fc"]
    assert blob["groups"][1]["exact"] == ["selection"]
    with pytest.raises(KeyError, match="no width group named 'nope'"):
        plan["nope"]


def test_analysis_is_pure():
    cls, inputs = ORACLES["conv_bn_residual"]
    gm = capture(cls().eval(), inputs())
    before = gm.code
    analyze_graph(gm)
    assert gm.code == before


def test_registry_has_rules_for_the_core_ops():
    names = {str(t) for t in OP_RULES}
    for op in ("aten.linear.default", "aten.conv2d.default", "aten.layer_norm.default", "aten.embedding.default",
               "aten.add.Tensor", "aten.scaled_dot_product_attention.default", "aten.view.default", "aten.cat.default"):
        assert op in names
    assert torch.nn.BatchNorm2d in MODULE_RULES and torch.nn.Dropout in MODULE_RULES


class _Padded(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.a, self.b, self.value = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 3), value

    def forward(self, x):
        return self.b(torch.nn.functional.pad(self.a(x), (1, 1, 2, 0), value=self.value))


@pytest.mark.parametrize("value, exact", [(0.0, ("selection", "projection")), (2.0, ("selection",))])
def test_padding_passes_channels_and_a_constant_is_a_per_channel_offset(value, exact):
    torch.manual_seed(0)
    model = _Padded(value).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    gm = capture(model, (x,))
    plan = analyze_graph(gm)
    assert plan["a"].size == 8 and plan["a"].exact == exact and not plan["a"].frozen
    rotation = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    projection = Projection(rotation) if "projection" in exact else Projection.select(torch.randperm(8), 8)
    assert torch.allclose(rewrite(gm, plan, {"a": projection})(x), model(x), atol=1e-12)


def test_rolling_spatial_axes_passes_channels_and_rolling_channels_freezes_them():
    class Rolled(torch.nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.a, self.b, self.dims = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1), dims

        def forward(self, x):
            return self.b(torch.roll(self.a(x), shifts=(1,) * len(self.dims), dims=self.dims))

    x = torch.randn(2, 3, 5, 5)
    assert analyze(Rolled((2, 3)), (x,))["a"].exact == ("selection", "projection")
    assert "roll rolls this axis" in analyze(Rolled((1,)), (x,))["a"].frozen_by


def test_masks_built_from_activations_act_per_channel():
    """Comparisons, their logical combinations, ``where`` with a scalar and ``masked_fill`` keep
    every dim and act element by element: a permutation of the channels passes through them."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.where((h > 0) & (h < 5), h, 0.0).masked_fill(h > 3, 1.0))

    model = Masked().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = capture(model, (x,))
    plan = analyze_graph(gm)
    assert plan["a"].exact == ("selection",) and not plan["a"].frozen
    assert torch.allclose(rewrite(gm, plan, exact_transforms(plan))(x), model(x), atol=1e-12)


def test_an_attention_bias_lies_on_the_attention_heads():
    """A learned bias per head passed to SDPA as its mask (T5's relative positions) has the
    attention's head axis: the number of heads stays, so the bias's width is frozen."""

    class HeadBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.bias, self.o = torch.nn.Linear(8, 24), torch.nn.Embedding(10, 2), torch.nn.Linear(8, 3)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (t.view(b, n, 2, 4).transpose(1, 2) for t in self.qkv(x).split(8, dim=-1))
            position = torch.arange(n)
            bias = self.bias((position[:, None] - position[None, :]).abs().clamp(max=9)).permute(2, 0, 1)[None]
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.o(attn.transpose(1, 2).reshape(b, n, 8))

    model = HeadBias().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    gm = capture(model, (x,))
    plan = analyze_graph(gm)
    assert any("splits heads: the number of heads stays" in r for r in plan["bias"].frozen_by)
    assert torch.allclose(rewrite(gm, plan, exact_transforms(plan))(x), model(x), atol=1e-12)


def test_a_no_grad_or_autocast_block_freezes_what_crosses_it_and_says_so():
    class Region(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            with torch.no_grad():
                g = self.b(h)
            return self.c(g + h)

    plan = analyze(Region(), (torch.randn(4, 8),))
    assert any("torch.no_grad()/autocast block" in r for r in plan["a"].frozen_by)


def test_weight_standardisation_is_no_batch_norm_module():
    """NF-ResNet standardises its convolution weights with ``F.batch_norm`` on a computed
    tensor: capture keeps that call as it is (no nn.BatchNorm), and the convolution, which
    takes a computed weight, freezes its groups."""

    class StdConv(torch.nn.Conv2d):
        def forward(self, x):
            weight = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                                    training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
            return torch.nn.functional.conv2d(x, weight, self.bias, padding=1)

    model = torch.nn.Sequential(StdConv(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    gm = capture(model, (x,))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    plan = analyze_graph(gm)
    assert [g.name for g in plan.compressible] == []  # the standardised weight is computed: nothing narrows
