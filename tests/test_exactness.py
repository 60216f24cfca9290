"""No silent wrongness: each construct below once made the plan call a group exact while a
``k = d`` transform of it changed the output. Each is the smallest model that shows it; the
check is the rewrite with :func:`fxcompress.exact_transforms`, in float64."""

import dataclasses

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.analysis import analyze_graph
from fxcompress.capture import capture
from fxcompress.rewrite import exact_transforms, rewrite


def _transformed_error(model: nn.Module, *inputs) -> tuple[float, object]:
    """The largest output change, relative, after every exact group is rotated or permuted."""
    torch.manual_seed(0)
    model = model.double().eval()
    gm = capture(model, inputs)
    plan = analyze_graph(gm)
    with torch.no_grad():
        ref = model(*inputs)
        out = rewrite(gm, plan, exact_transforms(plan, seed=1))(*inputs)
    return float((out - ref).abs().max() / ref.abs().max()), plan


class TwoSplits(nn.Module):
    """One stream split twice the same way (SelectiveKernel's two ``torch.split``)."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.d, self.e, self.f = (nn.Linear(4, 8), nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3),
                                                  nn.Linear(4, 3))

    def forward(self, x):
        h = self.a(x)
        p, q = h.split(4, dim=-1)
        r, s = h.split(4, dim=-1)
        return self.c(r) + self.d(s) + self.e(torch.relu(p)) + self.f(q)


class TwoConcatenations(nn.Module):
    """Two concatenations added together (GhostNet's residual of two ghost modules)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.head = (nn.Linear(4, 3), nn.Linear(3, 5), nn.Linear(4, 3),
                                                     nn.Linear(3, 5), nn.Linear(8, 2))

    def forward(self, x):
        a, c = self.a(x), self.c(x)
        return self.head(torch.cat([a, self.b(a)], -1) + torch.cat([c, self.d(c)], -1))


class UnevenConcatenations(nn.Module):
    """Two concatenations of one axis cut in different places: their parts cannot narrow alone."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.head = (nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(4, 2),
                                                     nn.Linear(4, 6), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], -1) + torch.cat([self.c(x), self.d(x)], -1))


class TalkingHeads(nn.Module):
    """Linear over heads → softmax over tokens → linear over heads: the heads axis is nonlinear."""

    def __init__(self):
        super().__init__()
        self.proj_l, self.proj_w = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, scores):  # (B, N, N, heads)
        return self.proj_w(self.proj_l(scores).softmax(dim=1))


class ExpandedBuffer(nn.Module):
    """A constant expanded over the batch and fed to a layer (ConViT's ``rel_indices``): a value."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rel", torch.randn(1, 5, 5, 3))
        self.pos_proj = nn.Linear(3, 4)

    def forward(self, x):  # (B, 5, 5, 4)
        return self.pos_proj(self.rel.expand(x.shape[0], -1, -1, -1)) * x


class SpatialEmbedding(nn.Module):
    """A positional embedding (1, C, H, W) added to a feature map: its H and W are no widths."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 6, 6))

    def forward(self, x):
        return self.conv2(self.conv(x) + self.pos)


CASES = {
    "two splits": (TwoSplits, lambda: (torch.randn(5, 4, dtype=torch.float64),)),
    "two concatenations": (TwoConcatenations, lambda: (torch.randn(5, 4, dtype=torch.float64),)),
    "talking heads": (TalkingHeads, lambda: (torch.randn(2, 5, 5, 4, dtype=torch.float64),)),
    "expanded buffer": (ExpandedBuffer, lambda: (torch.randn(2, 5, 5, 4, dtype=torch.float64),)),
    "spatial embedding": (SpatialEmbedding, lambda: (torch.randn(2, 3, 6, 6, dtype=torch.float64),)),
}


class PartialResiduals(nn.Module):
    """Residuals into the first channels of a wider output, twice in a row (ReXNet): slices of a
    whole that holds narrowed groups, and the rests beside them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 1), nn.Conv2d(12, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.a(x)
        y = self.b(torch.relu(h))
        y = torch.cat([y[:, :8] + h, y[:, 8:]], 1)
        z = self.c(torch.relu(y))
        return self.out(torch.cat([z[:, :12] + y, z[:, 12:]], 1))


CASES["partial residuals"] = (PartialResiduals, lambda: (torch.randn(2, 3, 5, 5, dtype=torch.float64),))


def test_two_splits_of_one_axis_are_one_cut():
    _, plan = _transformed_error(TwoSplits(), torch.randn(5, 4, dtype=torch.float64))
    assert "c.in" not in [g.name for g in plan.groups]  # r is p: the first half of a's output


def test_an_axis_concatenated_in_different_places_narrows_piece_by_piece():
    """``cat([a(3), b(5)]) + cat([c(2), d(6)])``: the axis is cut at 2, 3 and 5; ``a`` is ``c``'s
    piece and a piece of its own, ``d`` that piece and ``b``'s."""
    model = UnevenConcatenations().double().eval()
    error, plan = _transformed_error(model, torch.randn(5, 4, dtype=torch.float64))
    assert error < 1e-10
    assert sorted(g.size for g in plan.compressible) == [1, 2, 5]
    x = torch.randn(64, 4, dtype=torch.float64)
    result = fxcompress.compress(model, [x], fxcompress.CompressConfig(rule="fixed", ratio=0.5, round_to=1))
    weights = result.module.state_dict()
    assert (weights["a.weight"].shape[0], weights["d.weight"].shape[0], weights["head.weight"].shape[1]) == (2, 3, 4)
    assert result.module(x).shape == (64, 2)


def test_softmax_acts_per_channel_on_its_other_axes():
    _, plan = _transformed_error(TalkingHeads(), torch.randn(2, 5, 5, 4, dtype=torch.float64))
    assert plan["proj_l"].exact == ("selection",)


def test_a_spatial_axis_of_a_feature_map_is_frozen():
    _, plan = _transformed_error(SpatialEmbedding(), torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert not [g for g in plan.compressible if g.size == 6]


class MeanOfTokens(nn.Module):
    """``float(n)`` fixes the sequence length in the graph: export specialises the axis."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).sum(1) / float(ids.shape[1]))


def test_an_axis_export_fixed_refuses_other_sizes_clearly():
    model = MeanOfTokens()
    ids = torch.randint(0, 50, (4, 16))
    gm = capture(model, (ids,))
    assert torch.allclose(gm(ids[:2]), model(ids[:2]))  # the batch axis stays free
    with pytest.raises(fxcompress.DataError, match="axis 1 of input 'ids' was fixed to 16 .* passes 24"):
        gm(torch.randint(0, 50, (4, 24)))


# -- constructs that once froze whole models ----------------------------------------------------------
class SameConv(nn.Module):
    """``padding="same"`` (ConvMixer, HF EfficientNet): ``aten.conv2d.padding``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding="same"), nn.Conv2d(8, 4, 3, padding="same")

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class LayerScale(nn.Module):
    """A layer scale written ``x * γ.reshape(1, -1, 1, 1)`` (ConvNeXt, EfficientFormer)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.b(self.a(x) * self.gamma.reshape(1, -1, 1, 1))


class TransposedWeight(nn.Module):
    """``x @ W.T`` with a weight stored (out, in), as Falcon writes its projections."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return torch.relu(x @ self.w1.T) @ self.w2.t()


NARROWABLE = {  # model, inputs, a group that must be compressible
    "padding same": (SameConv, lambda: (torch.randn(2, 3, 6, 6, dtype=torch.float64),), "a"),
    "layer scale": (LayerScale, lambda: (torch.randn(2, 3, 5, 5, dtype=torch.float64),), "a"),
    "x @ W.T": (TransposedWeight, lambda: (torch.randn(5, 8, dtype=torch.float64),), "w1"),
}


class Normalised(nn.Module):
    """``F.normalize`` over channels (XCiT), GRN's norms (ConvNeXt-V2), a channel norm as
    ``GroupNorm(1, C)`` (PoolFormer), ``addcmul`` (ResMLP), upsampling, ``stack``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.norm, self.alpha, self.beta = nn.GroupNorm(1, 8), nn.Parameter(torch.rand(8, 1, 1)), nn.Parameter(
            torch.randn(8, 1, 1))

    def forward(self, x):
        h = self.norm(self.a(x))
        g = torch.nn.functional.normalize(self.b(h), dim=1)
        g = torch.addcmul(self.beta, self.alpha, g) * torch.linalg.vector_norm(g, dim=(2, 3), keepdim=True)
        both = torch.stack([h, g], dim=1).mean(1)
        return self.c(torch.nn.functional.interpolate(both, scale_factor=2.0, mode="nearest"))


NARROWABLE["normalize, group norm, addcmul, stack"] = (
    Normalised, lambda: (torch.randn(2, 3, 4, 4, dtype=torch.float64),), "a")



# -- constructs that once crashed compress or its result -----------------------------------------------
class DepthwiseOnConcatenation(nn.Module):
    """A depthwise convolution over a concatenation of two narrowed groups (GhostNet, EdgeNeXt)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.dw, self.out = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.dw(torch.cat([self.a(x), self.b(x)], 1))))


RUNS = {  # model, inputs: compress narrows something, and the result runs and keeps its output shape
    "depthwise on a concatenation": (DepthwiseOnConcatenation, lambda n: (torch.randn(n, 3, 6, 6),)),
}



class SplitPartConcatenated(nn.Module):
    """A split whose first part is the other two concatenated again (MambaOut's gated convolution)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.conv, self.fc2 = nn.Linear(8, 32), nn.Conv1d(6, 6, 3, padding=1, groups=6), nn.Linear(16, 4)

    def forward(self, x):  # (B, L, 8)
        g, i, c = torch.split(self.fc1(x), [16, 10, 6], dim=-1)
        c = self.conv(c.transpose(1, 2)).transpose(1, 2)
        return self.fc2(torch.relu(g) * torch.cat((i, c), dim=-1))


RUNS["a split part concatenated again"] = (SplitPartConcatenated, lambda n: (torch.randn(n, 5, 8),))


class ComputedBias(nn.Module):
    """A consumer whose bias the graph computes, ``cat(q_bias, zeros, v_bias)`` (EVA-02, SwinV2):
    the mean a projection drops is folded into a bias added after it."""

    def __init__(self):
        super().__init__()
        self.stem, self.qkv, self.out = nn.Linear(4, 8), nn.Linear(8, 24, bias=False), nn.Linear(24, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.register_buffer("k_bias", torch.zeros(8))

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.out(torch.relu(nn.functional.linear(self.stem(x) + 3.0, self.qkv.weight, bias)))


RUNS["a computed bias"] = (ComputedBias, lambda n: (torch.randn(n, 4),))


def test_the_mean_a_projection_drops_is_folded_past_a_computed_bias():
    torch.manual_seed(0)
    model = ComputedBias().eval()
    data = [torch.randn(64, 4) for _ in range(2)]
    config = fxcompress.CompressConfig(rule="fixed", k=1, targets="stem", round_to=1, transform="projection")
    folded = fxcompress.compress(model, data, config).module
    unfolded = fxcompress.compress(model, data, dataclasses.replace(config, fold_mean=False)).module
    x = torch.randn(256, 4)
    error = lambda m: float((m(x) - model(x)).pow(2).mean().detach())  # noqa: E731
    assert error(folded) < error(unfolded)



class ChannelSlices(nn.Module):
    """Channel slices (DPN's dual paths, a packed projection cut by slices as Phi-3 does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 12), nn.Linear(5, 3), nn.Linear(7, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.b(h[:, :5]) + self.c(torch.relu(h[:, 5:])))


NARROWABLE["channel slices"] = (ChannelSlices, lambda: (torch.randn(6, 4, dtype=torch.float64),), "a#1")
RUNS["channel slices"] = (ChannelSlices, lambda n: (torch.randn(n, 4),))


@pytest.mark.parametrize("case", sorted(NARROWABLE))
def test_a_construct_real_zoos_use_narrows_exactly(case):
    model, inputs, name = NARROWABLE[case]
    error, plan = _transformed_error(model(), *inputs())
    assert plan[name] in plan.compressible, plan[name]
    assert error < 1e-10, f"{case}: {error:.2e}\n{plan}"


RUNS["partial residuals"] = (PartialResiduals, lambda n: (torch.randn(n, 3, 5, 5),))


class WrittenOutAttention(nn.Module):
    """Attention written out, query and key packed and taken apart by index (ConViT's GPSA,
    TNT's inner attention): ``qk.reshape(B, N, 2, H, h)``, ``q, k = qk[0], qk[1]``."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.qk, self.v, self.proj = heads, nn.Linear(dim, 2 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qk = self.qk(x).reshape(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        v = self.v(x).reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_heads_of_attention_written_out_are_blocks_and_a_rotation_of_each_is_exact():
    torch.manual_seed(0)
    model = WrittenOutAttention().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gm = capture(model, (x,))
    plan = analyze_graph(gm)
    group = plan["qk"]
    assert not group.frozen and group.blocks == 4 and group.size == 4 * 4, group
    blocks = [torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] for _ in range(4)]
    projection = fxcompress.Projection(torch.block_diag(*blocks))  # q and k turned alike, head by head
    with torch.no_grad():
        assert torch.allclose(rewrite(gm, plan, {"qk": projection})(x), model(x), atol=1e-12)


RUNS["attention written out"] = (WrittenOutAttention, lambda n: (torch.randn(n, 5, 16),))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class RotaryLayer(nn.Module):
    """Grouped-query attention with a rotary embedding, as Llama writes it (``rotate_half``)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * 8, bias=False)
        self.o = nn.Linear(heads * 8, dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, 8).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, repeat, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, repeat, s, 8).reshape(b, self.heads, s, 8)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return x + self.o(out.transpose(1, 2).reshape(b, s, -1))


class Rotary(nn.Module):
    """Two layers that read one rotary table: its frequencies ``inv_freq`` are a buffer."""

    def __init__(self, inv_freq: torch.Tensor | None = None, scale: float = 8 ** -0.5):
        super().__init__()
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8) if inv_freq is None else inv_freq
        self.register_buffer("inv_freq", inv_freq)
        self.layers = nn.ModuleList(RotaryLayer(16, 4, 2, 2 * len(inv_freq), scale) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        freqs = torch.arange(x.shape[1], dtype=x.dtype)[:, None] * self.inv_freq[None]
        table = torch.cat([freqs, freqs], dim=-1)
        cos, sin = table.cos(), table.sin()
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(x)


class PackedRotaryLayer(RotaryLayer):
    """Query, key and value packed in one projection and sliced apart (Phi-3); the rotary
    embedding covers the whole head, so the pass-through part it cuts off is empty."""

    def __init__(self, *args):
        super().__init__(*args)
        self.qkv = nn.Linear(16, self.q.out_features + self.k.out_features + self.v.out_features, bias=False)
        del self.q, self.k, self.v

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[..., :32], qkv[..., 32:48], qkv[..., 48:]
        q, k, v = (t.view(b, s, -1, 8).transpose(1, 2) for t in (q, k, v))
        rotated = [torch.cat([t[..., :8] * cos + _rotate_half(t[..., :8]) * sin, t[..., 8:]], dim=-1) for t in (q, k)]
        q, k = rotated
        k = k[:, :, None].expand(b, 2, 2, s, 8).reshape(b, 4, s, 8)
        v = v[:, :, None].expand(b, 2, 2, s, 8).reshape(b, 4, s, 8)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(out.transpose(1, 2).reshape(b, s, -1))


class PackedRotary(Rotary):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(PackedRotaryLayer(16, 4, 2, 8, 1.0) for _ in range(2))


CASES["rotary in a packed projection"] = (PackedRotary, lambda: (torch.randn(2, 6, 16, dtype=torch.float64),))
RUNS["rotary in a packed projection"] = (PackedRotary, lambda n: (torch.randn(n, 6, 16),))
CASES["rotary query and key"] = (Rotary, lambda: (torch.randn(2, 6, 16, dtype=torch.float64),))
RUNS["rotary query and key"] = (Rotary, lambda n: (torch.randn(n, 6, 16),))


def test_rotary_frequency_pairs_narrow_together_in_every_head_and_layer():
    """Keeping frequencies {0, 2} of 4 keeps dims (0, 4) and (2, 6) of every query and key head
    in both layers, and the table's frequencies 0 and 2: the module computes what attention
    over those dims alone computes, at the old softmax scale."""
    torch.manual_seed(0)
    model = Rotary().double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    gm = capture(model, (x,))
    plan = analyze_graph(gm)
    (group,) = [g for g in plan.compressible if g.channels]
    assert group.size == 4 and group.exact == ("selection",) and group.channels[0].param == "inv_freq", group
    assert len(group.producers) == 2 * (4 + 2) * 2  # two layers, six heads of query or key, two halves each
    keep = torch.tensor([0, 2])
    reference = Rotary(model.inv_freq[keep], scale=8 ** -0.5).double().eval()
    weights = model.state_dict()
    for name, heads in (("q", 4), ("k", 2)):
        rows = torch.cat([h * 8 + torch.cat([keep, keep + 4]) for h in range(heads)])
        for layer in range(2):
            weights[f"layers.{layer}.{name}.weight"] = weights[f"layers.{layer}.{name}.weight"][rows]
    weights["inv_freq"] = model.inv_freq[keep]
    reference.load_state_dict(weights)
    narrowed = rewrite(gm, plan, {group.name: fxcompress.Projection.select(keep.numpy(), 4)})
    with torch.no_grad():
        assert torch.allclose(narrowed(x), reference(x), atol=1e-12)
        assert not torch.allclose(narrowed(x), model(x), atol=1e-6)  # something was dropped
    assert narrowed.state_dict()["inv_freq"].shape == (2,)


class EinsumLayers(nn.Module):
    """A weight applied by einsum, and attention written as einsums (``...`` included)."""

    def __init__(self):
        super().__init__()
        self.w, self.q, self.k, self.o = nn.Parameter(torch.randn(8, 6)), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(torch.einsum("bsd,df->bsf", x, self.w))
        scores = torch.einsum("...qd,...kd->...qk", self.q(h), self.k(h)).softmax(-1)
        return self.o(torch.einsum("bqk,bkd->bqd", scores, self.q(h)))


CASES["einsum"] = (EinsumLayers, lambda: (torch.randn(2, 5, 8, dtype=torch.float64),))
RUNS["einsum"] = (EinsumLayers, lambda n: (torch.randn(n, 5, 8),))


def test_einsum_applies_a_weight_as_a_linear_layer_and_ties_letters():
    _, plan = _transformed_error(EinsumLayers(), torch.randn(2, 5, 8, dtype=torch.float64))
    assert plan["w"].exact == ("selection",) and [str(u) for u in plan["w"].producers] == ["w[1]"]
    assert {u.param for u in plan["q"].producers} == {"q.weight", "q.bias", "k.weight", "k.bias"}


class MultiQuery(nn.Module):
    """GPTBigCode's multi-query attention: one packed projection split into 4 query heads and
    one key and one value head, the query viewed from ``(B, 1, S, H·h)`` to ``(B, S, H, h)``."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj, self.head = nn.Linear(16, 16 + 2 * 4), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).unsqueeze(1).split([16, 4, 4], dim=3)
        q = q.view(b, s, 4, 4).transpose(1, 2)
        k, v = (t.unsqueeze(2).expand(b, 1, 4, s, 4).reshape(b, 4, s, 4) for t in (k, v))  # repeat_kv
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(x + self.c_proj(out.transpose(1, 2).reshape(b, s, 16)))


CASES["multi-query attention"] = (MultiQuery, lambda: (torch.randn(2, 5, 16, dtype=torch.float64),))
RUNS["multi-query attention"] = (MultiQuery, lambda n: (torch.randn(n, 5, 16),))


def test_a_packed_query_repeats_its_single_key_head():
    _, plan = _transformed_error(MultiQuery(), torch.randn(2, 5, 16, dtype=torch.float64))
    (group,) = [g for g in plan.compressible if any(u.repeat == 4 for u in g.producers)]
    assert group.size == 4 and group.exact == ("selection", "projection"), group


class FeatureMapAttention(nn.Module):
    """Attention on a feature map, heads split off the channel axis while the pixels merge
    (EfficientFormerV2): ``(B, H·h, 4, 4) → (B, H, h, 16)``."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Conv2d(8, 8, 1) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (conv(x).reshape(b, 2, 4, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return self.head((x + self.proj(out)).mean((2, 3)))


CASES["heads of a feature map"] = (FeatureMapAttention, lambda: (torch.randn(2, 8, 4, 4, dtype=torch.float64),))
RUNS["heads of a feature map"] = (FeatureMapAttention, lambda n: (torch.randn(n, 8, 4, 4),))


def test_heads_split_off_the_channels_of_a_feature_map_are_blocks():
    _, plan = _transformed_error(FeatureMapAttention(), torch.randn(2, 8, 4, 4, dtype=torch.float64))
    assert (plan["q"].blocks, plan["v"].blocks) == (2, 2) and not plan["q"].frozen and not plan["v"].frozen, plan


class RepeatedRows(nn.Module):
    """Each row repeated in place: the rows' axis keeps its size, the features narrow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).repeat_interleave(2, dim=0))


CASES["rows repeated in place"] = (RepeatedRows, lambda: (torch.randn(3, 4, dtype=torch.float64),))


class SelectiveKernel(nn.Module):
    """Two convolution paths stacked, weighted by an attention over the paths viewed from
    ``(B, P·C)`` to ``(B, P, C, 1, 1)``: each path's slice of it holds the same channels."""

    def __init__(self):
        super().__init__()
        self.paths = nn.ModuleList(nn.Conv2d(4, 6, k, padding=k // 2) for k in (1, 3))
        self.reduce, self.select, self.head = nn.Linear(6, 3), nn.Linear(3, 12), nn.Linear(6, 2)

    def forward(self, x):
        paths = torch.stack([path(x) for path in self.paths], dim=1)
        attn = self.select(torch.relu(self.reduce(paths.sum(1).mean((2, 3)))))
        attn = attn.view(x.shape[0], 2, 6, 1, 1).softmax(dim=1)
        return self.head((paths * attn).sum(1).mean((2, 3)))


CASES["selective kernel"] = (SelectiveKernel, lambda: (torch.randn(2, 4, 5, 5, dtype=torch.float64),))
RUNS["selective kernel"] = (SelectiveKernel, lambda n: (torch.randn(n, 4, 5, 5),))


def test_stacked_paths_share_their_channels_with_the_attention_over_them():
    _, plan = _transformed_error(SelectiveKernel(), torch.randn(2, 4, 5, 5, dtype=torch.float64))
    group = plan["paths.0"]
    assert not group.frozen and group.size == 6 and {str(u) for u in group.producers} >= {
        "select.weight[0] (each block ×2)", "paths.1.weight[0]"}, group


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_group_called_exact_is_exact(case):
    model, inputs = CASES[case]
    error, plan = _transformed_error(model(), *inputs())
    assert plan.compressible, "the case must leave something to transform"
    assert error < 1e-10, f"{case}: a k = d transform of the exact groups moved the output by {error:.2e}\n{plan}"


@pytest.mark.parametrize("case", sorted(RUNS))
def test_the_compressed_module_runs(case):
    model, inputs = RUNS[case]
    torch.manual_seed(0)
    model = model().eval()
    result = fxcompress.compress(model, [inputs(16) for _ in range(2)],
                                 fxcompress.CompressConfig(rule="fixed", ratio=0.5, round_to=1))
    assert result.compressed, str(result)
    x = inputs(3)
    out = result.module(*x)
    assert out.shape == model(*x).shape and bool(torch.isfinite(out).all())
