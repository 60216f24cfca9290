"""A SliceGPT-style baseline for Llama-family models, written from the paper's description
(Ashkboos et al., 2024), to measure fxcompress against on the residual stream.

1. Each RMSNorm's scale is folded into the linear layers that read it, so every norm is
   weightless and commutes with an orthogonal ``Q``; the norm keeps dividing by the original
   width after slicing (``sum(x²)/d``).
2. Layer by layer, on the calibration data passed through the already-sliced layers before
   it, the PCA (uncentred ``XᵀX``) of the stream where the attention and the MLP read it gives
   ``Q_attn`` and ``Q_mlp``; the readers take ``W·Q[:, :k]``, the writers ``Q[:, :k]ᵀ·W``, and each
   residual connection carries the ``k × k`` change of basis between them (SliceGPT's
   shortcut matrices: their parameters count).
3. One width ``k`` for the whole stream. The tied embedding stays tied: the embedding is
   sliced with the first basis, and the head reads the last one through one more ``k × k``
   matrix that also holds the final norm's scale (SliceGPT itself unties, which adds a
   vocabulary-sized matrix).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def pca(signals: list[torch.Tensor]) -> torch.Tensor:
    """Eigenvectors (columns, by decreasing eigenvalue) of the uncentred ``Σ xᵀx`` over ``signals``."""
    gram = sum(s.reshape(-1, s.shape[-1]).double().T @ s.reshape(-1, s.shape[-1]).double() for s in signals)
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, values.argsort(descending=True)]


def rms(x: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / width + eps)


class SlicedLayer(nn.Module):
    def __init__(self, layer, config, q_in: torch.Tensor, k: int):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        w_in, w_post = layer.input_layernorm.weight.double(), layer.post_attention_layernorm.weight.double()
        reads = lambda linear, scale: nn.Parameter((linear.weight.double() * scale @ q_in[:, :k]).float())  # noqa: E731
        self.q, self.k, self.v = (reads(p, w_in) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = attn.o_proj.weight.detach().clone()
        self.gate, self.up = (mlp.gate_proj.weight.double() * w_post, mlp.up_proj.weight.double() * w_post)
        self.down = mlp.down_proj.weight.detach().clone()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        self.eps, self.width, self.scale = config.rms_norm_eps, config.hidden_size, attn.scaling

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The attention's output in the original basis (before ``o`` is sliced) or the new one."""
        b, t, _ = x.shape
        h = rms(x, self.width, self.eps)
        q = (h @ self.q.T).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        key = (h @ self.k.T).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = (h @ self.v.T).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, key = apply_rotary_pos_emb(q, key, cos, sin)
        out = F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1) @ self.o.T

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = rms(x, self.width, self.eps)
        return (F.silu(h @ self.gate.T) * (h @ self.up.T)) @ self.down.T

    def forward(self, x, cos, sin):
        x = x @ self.attn_shortcut + self.attention(x, cos, sin)
        return x @ self.mlp_shortcut + self.mlp(x)


class SlicedLlama(nn.Module):
    """``input_ids → logits`` of a Llama model sliced to stream width ``k``."""

    def __init__(self, model, calibration: torch.Tensor, k: int):
        super().__init__()
        config, inner = model.config, model.model
        self.rotary = inner.rotary_emb
        embed = inner.embed_tokens.weight.detach().double()
        x = [embed[ids] for ids in calibration.split(4)]
        basis = first = pca(x)
        self.embed = nn.Parameter((embed @ basis[:, :k]).float())
        x = [(s @ basis[:, :k]).float() for s in x]
        cos_sin = [self._rotary(ids) for ids in calibration.split(4)]
        self.layers = nn.ModuleList()
        with torch.no_grad():
            for layer in inner.layers:
                sliced = SlicedLayer(layer, config, basis, k)
                # attention: its output written in the basis of the MLP's input
                out = [sliced.attention(s, *cs) for s, cs in zip(x, cos_sin)]
                mid = pca([s @ basis[:, :k].T.float() + o for s, o in zip(x, out)])
                sliced.o = nn.Parameter(mid[:, :k].T.float() @ sliced.o)
                sliced.attn_shortcut = nn.Parameter((basis[:, :k].T @ mid[:, :k]).float())
                x = [s @ sliced.attn_shortcut + o @ mid[:, :k].float() for s, o in zip(x, out)]
                sliced.gate = nn.Parameter((sliced.gate @ mid[:, :k]).float())
                sliced.up = nn.Parameter((sliced.up @ mid[:, :k]).float())
                out = [sliced.mlp(s) for s in x]
                following = pca([s @ mid[:, :k].T.float() + o for s, o in zip(x, out)])
                sliced.down = nn.Parameter(following[:, :k].T.float() @ sliced.down)
                sliced.mlp_shortcut = nn.Parameter((mid[:, :k].T @ following[:, :k]).float())
                x = [s @ sliced.mlp_shortcut + o @ following[:, :k].float() for s, o in zip(x, out)]
                self.layers.append(sliced)
                basis = following
        # the head reads the last basis; the tied table holds the first: one k × k matrix between,
        # with the final norm's scale
        final = inner.norm.weight.detach().double()
        self.head = nn.Parameter(((basis[:, :k].T * final) @ first[:, :k]).float())
        self.eps, self.width = config.rms_norm_eps, config.hidden_size

    def _rotary(self, ids: torch.Tensor):
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        return self.rotary(torch.zeros(1, dtype=torch.float32), positions)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self._rotary(input_ids)
        x = self.embed[input_ids]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return rms(x, self.width, self.eps) @ self.head @ self.embed.T


def non_embedding_parameters(sliced: SlicedLlama) -> int:
    return sum(p.numel() for name, p in sliced.named_parameters() if name != "embed")


def width_for(model, parameters: int, multiple: int = 8) -> int:
    """The widest ``k`` (a multiple of ``multiple``) whose sliced model has at most ``parameters``
    parameters outside the embedding."""
    c = model.config
    q, kv, mlp = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size

    def count(k: int) -> int:
        per_layer = k * (q + 2 * kv) + q * k + 3 * k * mlp + 2 * k * k
        return c.num_hidden_layers * per_layer + k * k

    fitting = [k for k in range(multiple, c.hidden_size + 1, multiple) if count(k) <= parameters]
    if not fitting:
        raise ValueError(f"no stream width gives ≤ {parameters:,} parameters outside the embedding")
    return max(fitting)
