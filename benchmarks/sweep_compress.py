"""Sweep fxcompress.compress over real architectures (random weights, no downloads).

For each model and each rule (``fixed`` ratio 0.5, and ``default``: ``mp-hist`` at its own widths), prints the groups
found / compressed / frozen, parameters before → after, seconds, and whether the output
kept its shape and stayed finite.

    python benchmarks/sweep_compress.py                     # the eight of the acceptance sweep, and Llama
    python benchmarks/sweep_compress.py --models resnet18,bert
    python benchmarks/sweep_compress.py --models more        # nine further torchvision architectures
    python benchmarks/sweep_compress.py --models transformers  # eighteen further transformers families
    python benchmarks/sweep_compress.py --models transformers2 # twenty-four more: MoE, state-space, recurrent, …
    python benchmarks/sweep_compress.py --models timm          # timm architectures nobody here wrote
    python benchmarks/sweep_compress.py --rules exact         # random exact transforms keep the function?
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch

import fxcompress
from fxcompress.capture import keep_outputs


def vision(name: str, size: int = 64):
    import torchvision

    model = getattr(torchvision.models, name)(**({"image_size": size} if name.startswith("vit") else {}))
    if name.startswith("vit"):  # its classifier starts at zero, and so would every output
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model, [torch.randn(4, 3, size, size) for _ in range(2)]


#: transformers models from small configs: (model class, config class, config, inputs). The
#: first four are the acceptance sweep's; the rest (``--models transformers``) each bring a
#: construct of their own: grouped-query or multi-query attention, rotary embeddings, ALiBi,
#: relative position biases, encoder-decoder stacks, convolutional front ends, weight norm.
VOCAB = 500
TEXT = dict(vocab_size=VOCAB, max_position_embeddings=64)
DECODER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, **TEXT)
TRANSFORMERS = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(hidden_size=128, num_hidden_layers=2,
                                                               num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(dim=128, n_layers=2, n_heads=4, hidden_dim=256, **TEXT), "ids"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=128, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64), "ids"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2, **DECODER), "ids"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig",
                dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig", dict(embedding_size=64, hidden_size=128,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                   dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_key_value_heads=2, **DECODER), "ids"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=2, **DECODER), "ids"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(num_key_value_heads=1, head_dim=32, **DECODER), "ids"),
    "phi": ("PhiForCausalLM", "PhiConfig", DECODER, "ids"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", DECODER, "ids"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                                word_embed_proj_dim=128, **TEXT), "ids"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=128, n_layer=2, n_head=4, vocab_size=VOCAB), "ids"),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(d_model=128, d_ff=256, d_kv=32, num_layers=2, num_heads=4,
                                                          vocab_size=VOCAB), "seq2seq"),
    "clip_text": ("CLIPTextModelWithProjection", "CLIPTextConfig", dict(hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=64, bos_token_id=0, eos_token_id=1,
                  **TEXT), "ids"),
    "vit_hf": ("ViTForImageClassification", "ViTConfig", dict(hidden_size=128, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=256, image_size=64, patch_size=8), "pixels"),
    "swin_hf": ("SwinForImageClassification", "SwinConfig", dict(image_size=64, patch_size=4, embed_dim=32,
                depths=[1, 1], num_heads=[2, 4], window_size=4), "pixels"),
    "convnext_hf": ("ConvNextForImageClassification", "ConvNextConfig", dict(hidden_sizes=[16, 32, 64, 128],
                    depths=[1, 1, 1, 1]), "pixels"),
    "mobilevit": ("MobileViTForImageClassification", "MobileViTConfig", dict(image_size=64, hidden_sizes=[32, 48, 64],
                  neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]), "pixels"),
    "wav2vec2": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", dict(hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=256, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), "audio"),
    "whisper": ("WhisperForAudioClassification", "WhisperConfig", dict(d_model=128, encoder_layers=2,
                encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=16, max_source_positions=50), "mel"),
}
#: Further transformers families (``--models transformers2``), each a construct the above lack:
#: multi-query and parallel attention, packed projections cut by slices, state-space and
#: recurrent mixers, funnel pooling, mixtures of experts, encoder-decoders returning the encoder.
GQA = dict(num_key_value_heads=2, **DECODER)
TRANSFORMERS_2 = {
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                         vocab_size=VOCAB), "ids"),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(n_embd=128, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                                      n_positions=64), "ids"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(pad_token_id=0, **GQA), "ids"),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertConfig", dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), "ids"),
    "bart": ("BartForSequenceClassification", "BartConfig", dict(d_model=128, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
             **TEXT), "ids_eos"),
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(hidden_size=64, state_size=8, num_hidden_layers=2,
                                                      vocab_size=VOCAB), "ids"),
    "rwkv": ("RwkvForCausalLM", "RwkvConfig", dict(hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                                   intermediate_size=128, vocab_size=VOCAB, context_length=64), "ids"),
    "funnel": ("FunnelForSequenceClassification", "FunnelConfig", dict(d_model=128, n_head=4, d_head=32, d_inner=256,
               block_sizes=[1, 1], vocab_size=VOCAB), "ids"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, **GQA), "ids"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64, shared_expert_intermediate_size=128, **GQA), "ids"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(head_dim=32, **GQA), "ids"),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", GQA, "ids"),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", GQA, "ids"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", GQA, "ids"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32, **GQA), "ids"),
    "granite": ("GraniteForCausalLM", "GraniteConfig", GQA, "ids"),
    "cohere": ("CohereForCausalLM", "CohereConfig", GQA, "ids"),
    "xlm_roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaConfig", dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(embedding_size=64, hidden_size=128,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", dict(hidden_size=128, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=256, **TEXT), "ids"),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(n_embd=128, n_layer=2, n_head=4, rotary_dim=16, vocab_size=VOCAB,
                                                   n_positions=64), "ids"),
    "codegen": ("CodeGenForCausalLM", "CodeGenConfig", dict(n_embd=128, n_layer=2, n_head=4, rotary_dim=16,
                                                            vocab_size=VOCAB, n_positions=64, n_ctx=64), "ids"),
    "mobilebert": ("MobileBertForSequenceClassification", "MobileBertConfig", dict(
        hidden_size=128, embedding_size=64, intra_bottleneck_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, true_hidden_size=64, **TEXT), "ids"),
    "biogpt": ("BioGptForCausalLM", "BioGptConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=256, **TEXT), "ids"),
}
TRANSFORMERS.update(TRANSFORMERS_2)
INPUTS = {
    "ids": lambda: {"input_ids": torch.randint(0, VOCAB, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)},
    "ids_eos": lambda: {"input_ids": torch.cat([torch.randint(3, VOCAB, (4, 15)), torch.full((4, 1), 2)], 1),
                        "attention_mask": torch.ones(4, 16, dtype=torch.long)},  # BART classifies at its last </s>
    "seq2seq": lambda: {**INPUTS["ids"](), "decoder_input_ids": torch.randint(0, VOCAB, (4, 8))},
    "pixels": lambda: {"pixel_values": torch.randn(4, 3, 64, 64)},
    "audio": lambda: {"input_values": torch.randn(4, 4000)},
    "mel": lambda: {"input_features": torch.randn(4, 16, 100)},
}


def transformers_model(name: str):
    import transformers as tf

    model_class, config_class, config, inputs = TRANSFORMERS[name]
    model = getattr(tf, model_class)(getattr(tf, config_class)(**config))
    return model, [INPUTS[inputs]() for _ in range(2)]


#: timm architectures (random weights, 64 px where the model allows another size), each with
#: constructs of its own: selective kernels, ghost modules, talking heads, gated positional
#: attention, ``padding="same"``, layer scale, global response norm, cross-covariance attention,
#: channel slices, weight standardisation, mixers, pooling token mixers, hybrid stems.
TIMM = {
    **{name: {} for name in (
        "resnet18", "resnet26d", "skresnet18", "ghostnet_100", "efficientnet_b0", "mobilenetv3_small_100",
        "regnetx_002", "dpn68", "rexnet_100", "densenet121", "convnext_atto", "poolformer_s12", "mobilevit_xxs",
        "edgenext_xx_small", "efficientvit_b0", "mambaout_femto", "nf_resnet26", "tinynet_a", "dla34",
        "ese_vovnet19b_dw", "cspresnet50", "repvgg_a0", "res2net50_14w_8s", "lambda_resnet26t", "repvit_m0_9",
        "hgnetv2_b0", "fastvit_t8", "mobileone_s0", "gcresnext26ts", "seresnext26d_32x4d", "resnest14d",
        "convmixer_768_32", "inception_v3", "hrnet_w18_small", "ecaresnet26t", "selecsls42b", "xception41",
        "mixnet_s", "lcnet_050", "ghostnetv2_100", "convnextv2_atto", "efficientformerv2_s0", "tresnet_m",
        "vgg11_bn", "rdnet_tiny", "starnet_s1", "mobilenetv4_conv_small", "pvt_v2_b0", "davit_tiny")},
    **{name: {"img_size": 64} for name in (
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "cait_xxs24_224", "convit_tiny", "mixer_b16_224",
        "resmlp_12_224", "xcit_nano_12_p16_224", "eva02_tiny_patch14_224", "coat_lite_tiny",
        "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "crossvit_tiny_240", "pit_ti_224", "tnt_s_patch16_224",
        "visformer_tiny", "gcvit_xxtiny", "maxvit_tiny_rw_224", "levit_128s", "beit_base_patch16_224",
        "volo_d1_224", "twins_svt_small", "sequencer2d_s", "efficientformer_l1", "nest_tiny", "vit_small_patch16_rope_224")},
}


#: Input sizes other than 64 px: windows, grids and fixed attention biases need their own.
TIMM_SIZES = {"swin_tiny_patch4_window7_224": 224, "swinv2_cr_tiny_ns_224": 224, "crossvit_tiny_240": 240,
              "maxvit_tiny_rw_224": 224, "davit_tiny": 224, "gcvit_xxtiny": 224, "nest_tiny": 224, "volo_d1_224": 224,
              "efficientformerv2_s0": 224, "efficientformer_l1": 224, "inception_v3": 96}


def timm_model(name: str, size: int = 64):
    import timm

    kwargs = dict(TIMM[name])
    size = TIMM_SIZES.get(name, size)
    if "img_size" in kwargs:
        kwargs["img_size"] = size
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    for module in model.modules():  # a classifier that starts at zero would make every output zero
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    return model, [torch.randn(2, 3, size, size) for _ in range(2)]


MODELS = {
    "resnet18": lambda: vision("resnet18"),
    "resnet50": lambda: vision("resnet50"),
    "mobilenet_v2": lambda: vision("mobilenet_v2"),
    "densenet121": lambda: vision("densenet121"),
    "vit_b_16": lambda: vision("vit_b_16", 64),
    **{name: (lambda name=name: transformers_model(name)) for name in ("bert", "distilbert", "gpt2", "llama")},
}
#: Further torchvision architectures, each with a construct the eight above lack: squeeze-excite
#: gates, channel shuffle, layer scale, grouped convolutions, shifted windows, inception branches.
MORE = ("mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "convnext_tiny", "regnet_y_400mf",
        "resnext50_32x4d", "googlenet", "squeezenet1_0", "swin_t")
HF_MORE = tuple(name for name in TRANSFORMERS if name not in MODELS and name not in TRANSFORMERS_2)
SETS = {"default": ",".join(MODELS), "more": ",".join(MORE), "transformers": ",".join(HF_MORE),
        "transformers2": ",".join(TRANSFORMERS_2),
        "timm": ",".join(f"timm/{name}" for name in TIMM)}
MODELS.update({name: (lambda name=name: vision(name)) for name in MORE})
MODELS.update({name: (lambda name=name: transformers_model(name)) for name in (*HF_MORE, *TRANSFORMERS_2)})
MODELS.update({f"timm/{name}": (lambda name=name: timm_model(name)) for name in TIMM})


def output(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "text_embeds"):
        if key in out:
            return out[key]
    return next(iter(out.values()))


def run(name: str, rule: str) -> str:
    torch.manual_seed(0)
    model, batches = MODELS[name]()
    model.eval()
    outputs = OUTPUTS.get(name, "all")
    config = fxcompress.CompressConfig(rule="fixed", ratio=0.5, outputs=outputs) if rule == "fixed" else \
        fxcompress.CompressConfig(outputs=outputs, agreement=None)  # the rule's own widths: random weights
                                                                     # make an agreement level meaningless
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
    every group the plan marks exact (rounding alone: ~1e-15; a wrong group: order 1); for
    token models, also at another sequence length than capture saw (or that it is refused)."""
    torch.manual_seed(0)
    model, batches = MODELS[name]()
    dtype = torch.float32 if name in FLOAT32_ONLY else torch.float64
    model = model.to(dtype).eval()
    args, kwargs = _cast(batches[0], dtype)
    gm = fxcompress.capture(model, args, kwargs)
    if name in OUTPUTS:
        keep_outputs(gm, OUTPUTS[name])
    plan = fxcompress.analyze_graph(gm)
    projections = fxcompress.exact_transforms(plan)
    rewritten = fxcompress.rewrite(gm, plan, projections)
    error = _relative_error(model, rewritten, args, kwargs)
    other = ""
    if "input_ids" in kwargs:
        longer = {k: torch.cat([v, v[:, :8]], dim=1) for k, v in kwargs.items()}  # 24 tokens, where capture saw 16
        try:
            other = f"; 24 tokens {_relative_error(model, rewritten, (), longer):.1e}"
        except fxcompress.DataError as exc:
            other = f"; 24 tokens refused ({str(exc)[:40]}…)"
    precision = " (float32)" if dtype == torch.float32 else ""
    return f"| {name} | exact | {len(plan.groups)} | {len(projections)} transformed | | | | {error:.1e}{precision}{other} |"


#: Models whose other outputs the sweep drops (``CompressConfig(outputs=…)``): BART's classifier
#: returns the encoder's hidden states too, which would pin the stream.
OUTPUTS = {"bart": ("logits",)}

#: Models whose kernels take no float64 (grouped expert matmuls): checked in float32 (rounding ~1e-7).
FLOAT32_ONLY = {"mixtral", "qwen2_moe"}


def _cast(batch, dtype):
    args, kwargs = fxcompress.calibrate.as_call(batch)
    return (tuple(a.to(dtype) if a.is_floating_point() else a for a in args),
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()})


def _relative_error(model, rewritten, args, kwargs) -> float:
    with torch.no_grad():
        ref, out = output(model(*args, **kwargs)), output(rewritten(*args, **kwargs))
    return float((out - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default",
                        help="names, or 'default', 'more', 'transformers', 'transformers2', 'timm', 'all'")
    parser.add_argument("--rules", default="fixed,default", help="fixed, default, and exact (the check of "
                        "exactness(): random k = d transforms on every exact group, float64)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | rule | groups | compressed | frozen | params before → after | seconds | output |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    parts = SETS if args.models == "all" else args.models.split(",")  # set names and model names, mixed
    for name in (name for part in parts for name in SETS.get(part, part).split(",")):
        for rule in args.rules.split(","):
            try:
                print(exactness(name) if rule == "exact" else run(name, rule), flush=True)
            except Exception as exc:  # a sweep reports failures and goes on
                print(f"| {name} | {rule} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:150]} |", flush=True)
                with open(f"/tmp/sweep_{name.replace('/', '_')}_{rule}.log", "w") as log:
                    traceback.print_exc(limit=3, file=log)


if __name__ == "__main__":
    main()
