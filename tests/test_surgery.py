"""to_module: the narrowed widths on the user's own class, checked against the compressed graph."""

import pytest
import torch
import torchvision
import transformers
from torch import nn

import fxcompress
from fxcompress import CompressConfig
from fxcompress.errors import SurgeryError
from planted import task, trained

HALF = CompressConfig(rule="fixed", ratio=0.5, round_to=1)


def _batches(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("build", [lambda: torchvision.models.resnet18(num_classes=10),
                                   lambda: torchvision.models.mobilenet_v3_small(num_classes=10)],
                         ids=["resnet18", "mobilenet_v3_small"])
def test_a_torchvision_model_keeps_its_class_and_computes_what_the_graph_does(build):
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxcompress.compress(model, _batches((4, 3, 32, 32)), HALF)
    narrowed = result.to_module()
    assert type(narrowed) is type(model) and narrowed is not model
    x = _batches((3, 3, 32, 32), n=1, seed=1)[0]  # another batch, another batch size
    torch.testing.assert_close(narrowed(x), result.module(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in narrowed.parameters()) == result.params_after
    for module in narrowed.modules():  # the attributes that name a width follow the weights
        if isinstance(module, nn.Conv2d):
            assert (module.out_channels, module.in_channels // module.groups) == tuple(module.weight.shape[:2])
        elif isinstance(module, nn.BatchNorm2d):
            assert module.num_features == module.weight.shape[0] == module.running_mean.shape[0]
        elif isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert all(isinstance(p, nn.Parameter) for p in narrowed.parameters())


def _greedy(graph, prefix, steps):
    """Greedy tokens by re-running the compressed graph on the whole prefix (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            prefix = torch.cat([prefix, graph(prefix).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return prefix


LANGUAGE_MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
}


@pytest.mark.parametrize("name", sorted(LANGUAGE_MODELS))
def test_generate_with_the_kv_cache_gives_the_graphs_greedy_tokens(name):
    torch.manual_seed(0)
    model = LANGUAGE_MODELS[name]().eval()
    ids = [torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = fxcompress.compress(model, ids, HALF)
    assert len(result.compressed) >= 4  # the stream, the heads and the MLPs narrowed
    narrowed = result.to_module()
    prefix = ids[1][:, :7]
    out = narrowed.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=8, do_sample=False,
                            min_new_tokens=8)
    assert torch.equal(out, _greedy(result.module, prefix, 8))


def test_query_and_value_heads_of_different_widths_name_the_attention_module():
    model = LANGUAGE_MODELS["llama"]().eval()
    ids = [torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = fxcompress.compress(model, ids, CompressConfig(rule="fixed", ratio=0.5))  # round_to 8: q/k 16, v 8
    with pytest.raises(SurgeryError, match=r"model\.layers\.0\.self_attn \(LlamaAttention\) reshapes by one "
                                           r"head_dim, but its heads are now .*'v_proj': 8"):
        result.to_module()


class HardCoded(nn.Module):
    """A forward that reshapes by a width of its own."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.width = nn.Linear(16, 32), nn.Linear(32, 4), 32

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).reshape(-1, self.width))


def test_a_width_the_code_fixes_itself_is_an_error_that_names_it():
    result = fxcompress.compress(HardCoded(), _batches((64, 16)), HALF)
    assert result.compressed
    with pytest.raises(SurgeryError, match=r"fails in down \(Linear\).*HardCoded\.width = 32.*result\.module"):
        result.to_module()


def test_the_rmtkd_result_keeps_the_class_too():
    net = trained()
    train, val = task()
    config = fxcompress.RMTKDConfig(compress=CompressConfig(rule="mp-robust", round_to=1),
                                    distill=fxcompress.DistillConfig(epochs=1, progress=False), max_drop=0.05)
    result = fxcompress.rmtkd(net, train, val, config)
    narrowed = result.to_module()
    assert type(narrowed) is type(net) and narrowed.hidden[0].out_features < 48
    x = val[0][0]
    torch.testing.assert_close(narrowed(x), result.module(x), rtol=1e-5, atol=1e-5)


def test_a_graph_module_has_no_class_to_keep():
    gm = fxcompress.capture(HardCoded(), (torch.randn(4, 16),))
    result = fxcompress.compress(gm, _batches((64, 16)), HALF)
    with pytest.raises(SurgeryError, match="needs the original nn.Module"):
        result.to_module()


def test_uniform_widths_save_as_a_folder_stock_from_pretrained_loads(tmp_path):
    model = LANGUAGE_MODELS["llama"]().eval()
    ids = [torch.randint(2, 97, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = CompressConfig(rule="mp-robust", round_to=4, uniform=True, fold_mean=False, agreement=None,
                            targets=("*mlp*", "model.embed_tokens"))  # the rule's own widths: random weights
    result = fxcompress.compress(model, ids, config)
    mlp = {r.k for r in result.report if ".mlp." in r.name}
    assert len(mlp) == 1 and mlp.pop() < 128  # every layer's MLP at one width
    folder = result.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(model)
    assert loaded.config.hidden_size == result.report[0].k < 64 and loaded.config.intermediate_size < 128
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[2]).logits, result.module(ids[2]).logits, rtol=1e-5, atol=1e-5)


def test_gpt2s_unset_inner_width_is_written_too(tmp_path):
    model = LANGUAGE_MODELS["gpt2"]().eval()
    ids = [torch.randint(2, 97, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = fxcompress.compress(model, ids, CompressConfig(rule="fixed", ratio=0.5, uniform=True, targets="*mlp*"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(result.save_pretrained(tmp_path / "hf")).eval()
    assert loaded.config.n_inner == 128 and model.config.n_inner is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids[1]).logits, result.module(ids[1]).logits, rtol=1e-5, atol=1e-5)


def test_widths_a_config_cannot_say_are_a_clear_error_and_write_nothing(tmp_path):
    model = LANGUAGE_MODELS["llama"]().eval()
    ids = [torch.randint(2, 97, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = fxcompress.compress(model, ids, CompressConfig(rule="fixed", ratio=0.5, targets="*mlp*"))  # mean fold: biases
    with pytest.raises(SurgeryError, match=r"no LlamaConfig says these widths.*fold_mean=False"):
        result.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    vision = fxcompress.compress(HardCoded(), _batches((64, 16)), CompressConfig(rule="fixed", ratio=0.5, targets="up"))
    with pytest.raises(SurgeryError, match="save_pretrained is for transformers models"):
        vision.save_pretrained(tmp_path / "hf")
