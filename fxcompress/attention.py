"""A head-explicit form of ``nn.MultiheadAttention``, swapped in before capture.

``nn.MultiheadAttention`` (and with it ``nn.TransformerEncoderLayer`` and torchvision's ViT)
computes self-attention with a packed in-projection that it unflattens into ``(3, E)`` and
selects from, and it folds the head axis into the batch axis (``(L, B·H, h)``). Neither is a
width the analysis can follow: the packed projection and the head dims would stay frozen.

:func:`make_headwise` gives the capture copy of every eligible module the class
:class:`HeadwiseAttention`, which computes the same function as BERT-style code does:
``linear → split into q, k, v → view (B, L, H, h) → SDPA → merge heads → out_proj``. The
parameters (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) keep their names, so state
dicts stay interchangeable. Eligible: packed projections (``kdim == vdim == embed_dim``),
no ``add_bias_kv`` or ``add_zero_attn``, batched inputs. At call time, anything but
self-attention (``query is key is value``) runs the original code, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadwiseAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed with an explicit head axis (same parameters, same outputs)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (query is key and key is value) or query.dim() != 3 or (is_causal and attn_mask is None):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, E)
        batch, length, embed = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2)
                   for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).split(embed, dim=-1))
        dropout = self.dropout if self.training else 0.0
        causal = is_causal and key_padding_mask is None and not need_weights  # attn_mask is then the causal mask
        mask = None if causal else _merged_mask(attn_mask, key_padding_mask, batch, heads, q.dtype)
        if need_weights:
            scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, dropout, self.training)  # returned after dropout, as torch does
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
            weights = None
        out = F.linear(out.transpose(1, 2).reshape(batch, length, embed), self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def make_headwise(model: nn.Module) -> int:
    """Give every eligible ``nn.MultiheadAttention`` in ``model`` (a capture copy: modified in
    place) the class :class:`HeadwiseAttention`; return how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim and module.bias_k is None \
                and not module.add_zero_attn:
            module.__class__ = HeadwiseAttention
            count += 1
    return count


def _merged_mask(attn_mask, key_padding_mask, batch: int, heads: int, dtype: torch.dtype):
    """``attn_mask`` ((L, S) or (B·H, L, S)) and ``key_padding_mask`` ((B, S)) as one additive
    mask broadcastable to (B, H, L, S); a boolean True marks a position that may not be attended."""
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.reshape(batch, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
