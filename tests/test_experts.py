"""Mixtures of experts: each expert's hidden width narrows by itself; what a mean fold adds to
a grouped product reaches the rows of the expert it belongs to."""

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.analysis import analyze_graph
from fxcompress.analysis.plan import Use
from fxcompress.capture import capture
from fxcompress.rewrite import _add_expert_bias, _expert_shift, exact_transforms, rewrite

transformers = pytest.importorskip("transformers")
from transformers.integrations import moe  # noqa: E402,F401  (registers transformers.grouped_mm_fallback)


def _mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config).eval()


def _batches(count=2):
    return [{"input_ids": torch.randint(0, 64, (4, 12))} for _ in range(count)]


def test_each_experts_hidden_width_is_a_block_routed_by_the_offsets():
    model, batch = _mixtral(), _batches(1)[0]
    gm = capture(model, (), batch)
    plan = analyze_graph(gm)
    experts = [g for g in plan.groups if g.routing]
    assert len(experts) == 2 and all((g.blocks, g.block_size, g.exact) == (4, 24, ("selection",)) for g in experts)
    assert not any("grouped_mm" in r for g in plan.groups for r in g.frozen_by)  # the stream runs through them
    with torch.no_grad():
        out = rewrite(gm, plan, exact_transforms(plan, seed=2))(**batch).logits
        assert torch.allclose(out, model(**batch).logits, atol=1e-5)  # float32: the grouped product takes no float64


def test_experts_narrow_each_its_own_way_and_the_result_runs():
    model, batches = _mixtral(), _batches()
    result = fxcompress.compress(model, batches, fxcompress.CompressConfig(rule="fixed", ratio=0.5, round_to=1))
    weights = result.module.state_dict()
    assert weights["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 12, 16)  # stream 32 → 16
    assert weights["model.layers.0.mlp.experts.down_proj"].shape == (4, 16, 12)
    out = result.module(**batches[0]).logits
    assert out.shape == model(**batches[0]).logits.shape and bool(torch.isfinite(out).all())
    assert result.params_after < 0.5 * result.params_before


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 5))

    def forward(self, x, offs):
        return torch.ops.transformers.grouped_mm_fallback(x, self.w, offs)


def test_an_expert_bias_reaches_the_rows_of_its_expert_only():
    """Rows 0–2 are expert 0's, none expert 1's, rows 3–4 expert 2's, row 5 expert 3's."""
    x, offs = torch.randn(6, 3), torch.tensor([3, 3, 5, 6])
    gm = capture(Grouped(), (x, offs))
    node = next(n for n in gm.graph.nodes if "grouped_mm" in str(n.target))
    before = gm(x, offs)
    bias = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    _add_expert_bias(gm, node, "w", bias)
    gm.recompile()
    assert torch.allclose(gm(x, offs) - before, bias[[0, 0, 0, 2, 2, 3]], atol=1e-5)


def test_the_shift_of_each_expert_is_its_weight_times_what_it_lost():
    weight = torch.randn(4, 5, 3, dtype=torch.float64)  # (experts, out, in), read along axis 2
    lost = torch.randn(4 * 3, dtype=torch.float64)
    use = Use(param="w", axis=2, role="consumer", node="g", block_axis=0)
    expected = torch.stack([weight[e] @ lost[3 * e:3 * e + 3] for e in range(4)])
    assert torch.allclose(_expert_shift(weight, use, lost, 0), expected)
    shared = Use(param="w", axis=2, role="consumer", node="g")  # the stream: one loss for every expert
    assert torch.allclose(_expert_shift(weight, shared, lost[:3], 0), weight @ lost[:3])
