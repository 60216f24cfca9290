"""Sweep fxcompress.compress over real architectures (random weights, no downloads).

For each model and each rule (``fixed`` ratio 0.5 and the default), prints the groups
found / compressed / frozen, parameters before → after, seconds, and whether the output
kept its shape and stayed finite.

    python benchmarks/sweep_compress.py                     # the eight of the acceptance sweep, and Llama
    python benchmarks/sweep_compress.py --models resnet18,bert
    python benchmarks/sweep_compress.py --models more        # nine further torchvision architectures
    python benchmarks/sweep_compress.py --rules exact         # random exact transforms keep the function?
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch

import fxcompress


def vision(name: str, size: int = 64):
    import torchvision

    model = getattr(torchvision.models, name)(**({"image_size": size} if name.startswith("vit") else {}))
    if name.startswith("vit"):  # its classifier starts at zero, and so would every output
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model, [torch.randn(4, 3, size, size) for _ in range(2)]


def text(name: str):
    import transformers as tf

    small = dict(vocab_size=500, max_position_embeddings=64)
    if name == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                               intermediate_size=256, **small))
    elif name == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(dim=128, n_layers=2, n_heads=4, hidden_dim=256,
                                                                           **small))
    elif name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=500, n_positions=64))
    else:  # grouped-query attention (4 query heads, 2 key/value heads), RMSNorm, rotary embeddings, SwiGLU
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, **small))
    batches = [{"input_ids": torch.randint(0, 500, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
               for _ in range(2)]
    return model, batches


MODELS = {
    "resnet18": lambda: vision("resnet18"),
    "resnet50": lambda: vision("resnet50"),
    "mobilenet_v2": lambda: vision("mobilenet_v2"),
    "densenet121": lambda: vision("densenet121"),
    "vit_b_16": lambda: vision("vit_b_16", 64),
    "bert": lambda: text("bert"),
    "distilbert": lambda: text("distilbert"),
    "gpt2": lambda: text("gpt2"),
    "llama": lambda: text("llama"),
}
#: Further torchvision architectures, each with a construct the eight above lack: squeeze-excite
#: gates, channel shuffle, layer scale, grouped convolutions, shifted windows, inception branches.
MORE = ("mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "convnext_tiny", "regnet_y_400mf",
        "resnext50_32x4d", "googlenet", "squeezenet1_0", "swin_t")
SETS = {"default": ",".join(MODELS), "more": ",".join(MORE)}
MODELS.update({name: (lambda name=name: vision(name)) for name in MORE})


def output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if "logits" in out else next(iter(out.values()))


def run(name: str, rule: str) -> str:
    torch.manual_seed(0)
    model, batches = MODELS[name]()
    model.eval()
    config = fxcompress.CompressConfig(rule="fixed", ratio=0.5) if rule == "fixed" else fxcompress.CompressConfig()
    start = time.perf_counter()
    result = fxcompress.compress(model, batches, config)
    seconds = time.perf_counter() - start
    args, kwargs = fxcompress.calibrate.as_call(batches[0])
    with torch.no_grad():
        ref, out = output(model(*args, **kwargs)), output(result.module(*args, **kwargs))
    ok = out.shape == ref.shape and bool(torch.isfinite(out).all())
    frozen = sum(1 for g in result.plan.groups if g.frozen)
    return (f"| {name} | {rule} | {len(result.plan.groups)} | {len(result.compressed)} | {frozen} | "
            f"{result.params_before:,} → {result.params_after:,} ({1 - result.params_after / result.params_before:.1%}) | "
            f"{seconds:.1f} | {'ok' if ok else 'BAD OUTPUT'} |")


def exactness(name: str) -> str:
    """The largest relative output error, in float64, after a random ``k = d`` transform on
    every group the plan marks exact (rounding alone: ~1e-15; a wrong group: order 1)."""
    torch.manual_seed(0)
    model, batches = MODELS[name]()
    model = model.double().eval()
    args, kwargs = fxcompress.calibrate.as_call(batches[0])
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    gm = fxcompress.capture(model, args, kwargs)
    plan = fxcompress.analyze_graph(gm)
    projections = fxcompress.exact_transforms(plan)
    with torch.no_grad():
        ref, out = output(model(*args, **kwargs)), output(fxcompress.rewrite(gm, plan, projections)(*args, **kwargs))
    error = float((out - ref).abs().max() / ref.abs().max())
    return f"| {name} | exact | {len(plan.groups)} | {len(projections)} transformed | | | | {error:.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default", help="names, or 'default', 'more', 'all'")
    parser.add_argument("--rules", default="fixed,default", help="fixed, default, and exact (the check of "
                        "exactness(): random k = d transforms on every exact group, float64)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | rule | groups | compressed | frozen | params before → after | seconds | output |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    names = ",".join(SETS.values()) if args.models == "all" else SETS.get(args.models, args.models)
    for name in names.split(","):
        for rule in args.rules.split(","):
            try:
                print(exactness(name) if rule == "exact" else run(name, rule), flush=True)
            except Exception as exc:  # a sweep reports failures and goes on
                print(f"| {name} | {rule} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:150]} |", flush=True)
                traceback.print_exc(limit=3, file=open(f"/tmp/sweep_{name}_{rule}.log", "w"))


if __name__ == "__main__":
    main()
