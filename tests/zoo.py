"""Small models whose width groups are known by hand: the oracles of the analysis tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(32, 64), "fc2": nn.Linear(64, 32)}) for _ in range(2))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc_in(x)
        for block in self.blocks:
            h = h + block["fc2"](F.relu(block["fc1"](h)))
        return self.head(h)


class ConvBNResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        h = self.mix(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))
        return self.fc(h.mean(dim=(2, 3)))


class DenseBlock(nn.Module):
    """DenseNet's layout: every layer reads the concatenation of all earlier features
    through BatchNorm and ReLU, and a transition reads them all."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1)
        self.bn3, self.transition = nn.BatchNorm2d(16), nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x0 = self.stem(x)
        f1 = self.conv1(F.relu(self.bn1(x0)))
        f2 = self.conv2(F.relu(self.bn2(torch.cat([x0, f1], 1))))
        h = self.transition(F.relu(self.bn3(torch.cat([torch.cat([x0, f1], 1), f2], 1))))  # nested
        return self.fc(h.mean(dim=(2, 3)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.expand(x)))
        h = F.relu(self.bn2(self.dw(h)))
        return self.fc(F.adaptive_avg_pool2d(self.project(h), 1).flatten(1))


class GroupedConv(nn.Module):
    """ResNeXt's bottleneck (a 1×1 reduction, a 3×3 convolution in 4 groups, a 1×1 expansion,
    BatchNorm and ReLU between) on a stream that two convolutions in 2 groups then read, with
    nothing between them: each output group reads its input group only, so every width on
    the way is cut into blocks that narrow alike."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.reduce, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.grouped, self.bn2 = nn.Conv2d(16, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12)
        self.expand = nn.Conv2d(12, 8, 1)
        self.pair_a, self.pair_b = nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.Conv2d(12, 6, 1, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.expand(F.relu(self.bn2(self.grouped(F.relu(self.bn1(self.reduce(h)))))))
        return self.fc(self.pair_b(self.pair_a(h)).mean(dim=(2, 3)))


class PostLNTransformer(nn.Module):
    """Two post-LN encoder layers (BERT's layout) over token ids, mean-pooled to 2 classes."""

    def __init__(self, vocab=50, d=32, heads=4, ffn=64, layers=2):
        super().__init__()
        self.heads = heads
        self.embed, self.embed_norm = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d), "o": nn.Linear(d, d),
            "norm1": nn.LayerNorm(d), "ffn1": nn.Linear(d, ffn), "ffn2": nn.Linear(ffn, d), "norm2": nn.LayerNorm(d),
        }) for _ in range(layers))
        self.classifier = nn.Linear(d, 2)

    def forward(self, ids):
        h = self.embed_norm(self.embed(ids))
        b, s, d = h.shape
        for layer in self.layers:
            q, k, v = (layer[n](h).view(b, s, self.heads, -1).transpose(1, 2) for n in "qkv")
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
            h = layer["norm1"](h + layer["o"](attn))
            h = layer["norm2"](h + layer["ffn2"](F.gelu(layer["ffn1"](h))))
        return self.classifier(h.mean(dim=1))


class WrittenRMSNorm(nn.Module):
    """RMSNorm as transformers writes it out: a mean over the features, not one op."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GroupedQueryAttention(nn.Module):
    """Llama's attention without rotary embeddings: 4 query heads share 2 key/value heads,
    repeated by expand and reshape (``repeat_kv``) in the first layer and by SDPA's
    ``enable_gqa`` in the second; pre-norm with a written-out RMSNorm."""

    def __init__(self, vocab=50, d=32, heads=4, kv_heads=2, layers=2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        kv = d // heads * kv_heads
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm": WrittenRMSNorm(d), "q": nn.Linear(d, d, bias=False), "k": nn.Linear(d, kv, bias=False),
            "v": nn.Linear(d, kv, bias=False), "o": nn.Linear(d, d, bias=False),
        }) for _ in range(layers))
        self.norm, self.classifier = WrittenRMSNorm(d), nn.Linear(d, 2)

    def forward(self, ids):
        h = self.embed(ids)
        b, s, d = h.shape
        size, repeat = d // self.heads, self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            x = layer["norm"](h)
            q = layer["q"](x).view(b, s, self.heads, size).transpose(1, 2)
            k, v = (layer[n](x).view(b, s, self.kv_heads, size).transpose(1, 2) for n in "kv")
            if i == 0:
                k, v = (t[:, :, None].expand(b, self.kv_heads, repeat, s, size).reshape(b, self.heads, s, size)
                        for t in (k, v))
                attn = F.scaled_dot_product_attention(q, k, v)
            else:
                attn = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            h = h + layer["o"](attn.transpose(1, 2).reshape(b, s, d))
        return self.classifier(self.norm(h).mean(dim=1))


class PackedAttention(nn.Module):
    """One projection writes query, key and value (GPT-2's layout), split into three, then heads."""

    def __init__(self, vocab=50, d=16, heads=2):
        super().__init__()
        self.d, self.heads = d, heads
        self.embed, self.qkv, self.o = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.classifier = nn.Linear(d, 2)

    def forward(self, ids):
        h = self.embed(ids)
        b, s, _ = h.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(h).split(self.d, dim=-1))
        h = h + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, self.d))
        return self.classifier(h.mean(dim=1))


class WindowAttention(nn.Module):
    """Swin's window attention: one projection packs query, key and value, reshaped at once
    into (parts, heads, head dim) and indexed apart; attention by explicit matrix products.
    The packed projection has no bias: a mean fold gives it one, to be narrowed slice by slice."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.qkv, self.proj = nn.Linear(8, d), nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        b, n, d = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (d // self.heads) ** -0.5).matmul(k.transpose(-2, -1)).softmax(dim=-1)
        h = h + self.proj(attn.matmul(v).transpose(1, 2).reshape(b, n, d))
        return self.fc(h.mean(dim=1))


class InterleavedHeads(nn.Module):
    """A packed projection laid out head by head, ``[q₀ k₀ v₀ q₁ k₁ v₁ …]``: GPT-NeoX views it
    ``(…, H, 3h)`` and chunks the last axis (first layer); BLOOM views it ``(…, H, 3, h)`` and
    indexes the 3 (second layer)."""

    def __init__(self, d=16, heads=2, layers=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, d)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        b, n, d = h.shape
        for i, (qkv, o) in enumerate(zip(self.qkv, self.o)):
            if i == 0:
                q, k, v = qkv(h).view(b, n, self.heads, 3 * d // self.heads).chunk(3, dim=-1)
            else:
                packed = qkv(h).view(b, n, self.heads, 3, d // self.heads)
                q, k, v = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
            attn = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            h = h + o(attn.transpose(1, 2).reshape(b, n, d))
        return self.fc(h.mean(dim=1))


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention`` inside), sequence-first, as
    torch's own transformer layers and torchvision's ViT use it."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.embed, self.fc = nn.Linear(8, d), nn.Linear(d, 3)
        self.layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0)

    def forward(self, x):
        return self.fc(self.layer(self.embed(x).transpose(0, 1)).mean(dim=0))


class TiedLM(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)

    def forward(self, ids):
        return F.linear(torch.tanh(self.fc(self.embed(ids))), self.embed.weight)


class ChannelShuffle(nn.Module):
    """ShuffleNetV2's unit: two branches concatenated, their channels interleaved by a
    view–transpose–view, and split in two again. Interleaving mixes the parts: all freeze."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.d = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        b, c, height, width = h.shape
        h = h.view(b, 2, c // 2, height, width).transpose(1, 2).reshape(b, c, height, width)
        left, right = h.chunk(2, dim=1)
        return self.fc((self.c(left) + self.d(right)).mean(dim=(2, 3)))


class Assorted(nn.Module):
    """Ways transformers models apply weights: a scale stored as an offset from one and cast
    first (Gemma's RMSNorm), a weight stored (in, out) and applied by matmul, a weight
    normalised on the fly (wav2vec2's positional convolution), and pooling by advanced
    indexing (CLIP's end-of-text token)."""

    def __init__(self):
        super().__init__()
        self.embed, self.scale = nn.Linear(8, 16), nn.Parameter(torch.zeros(16))
        self.w = nn.Parameter(torch.randn(16, 24) * 0.2)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(24, 12))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.embed(x) * (1.0 + self.scale.float()) @ self.w)
        h = self.normed(h)
        return self.fc(h[torch.arange(h.shape[0]), x[..., 0].argmax(dim=-1)])


class Unsupported(nn.Module):
    """A cumulative sum over features: an op the analysis has no rule for."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.cumsum(self.fc1(x), dim=-1))))


def image(batch=2):
    return (torch.randn(batch, 3, 8, 8),)


def tokens(batch=2, length=6, vocab=50):
    return (torch.randint(0, vocab, (batch, length)),)


ORACLES = {
    "residual_mlp": (ResidualMLP, lambda batch=3: (torch.randn(batch, 16),)),
    "conv_bn_residual": (ConvBNResidual, image),
    "concat": (Concat, image),
    "dense_block": (DenseBlock, image),
    "depthwise": (Depthwise, image),
    "grouped_conv": (GroupedConv, image),
    "post_ln_transformer": (PostLNTransformer, tokens),
    "packed_attention": (PackedAttention, tokens),
    "grouped_query_attention": (GroupedQueryAttention, tokens),
    "tied_embeddings": (TiedLM, tokens),
    "torch_encoder": (TorchEncoder, lambda batch=3: (torch.randn(batch, 5, 8),)),
    "window_attention": (WindowAttention, lambda batch=3: (torch.randn(batch, 5, 8),)),
    "interleaved_heads": (InterleavedHeads, lambda batch=3: (torch.randn(batch, 5, 8),)),
    "channel_shuffle": (ChannelShuffle, image),
    "assorted": (Assorted, lambda batch=3: (torch.randn(batch, 5, 8),)),
    "unsupported_op": (Unsupported, lambda batch=3: (torch.randn(batch, 8),)),
}
