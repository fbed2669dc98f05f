"""FlashAttention-2's packed-input entry points: q, k and v (or k and v) stacked in one tensor,
as a fused qkv projection produces them.

Each function takes views of the packed tensor along its stacking axis (no copy) and calls
flash_attn_func or flash_attn_varlen_func, whose kernels take any row stride; the gradient of
the packed tensor is the three (or two) gradients in its layout. Arguments and results are
those of the unpacked functions (interface.py), in FlashAttention-2's order.
"""

from __future__ import annotations

import torch

from flashtile.interface import flash_attn_func, flash_attn_varlen_func


def _unpacked(name: str, packed, parts: int, layout: str) -> tuple[torch.Tensor, ...]:
    """packed's `parts` views along its stacking axis (dimension ndim − 3), after checking that
    it has the layout's dimensions and `parts` entries there."""
    ndim = layout.count(",") + 1
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    axis = ndim - 3
    if packed.dim() != ndim or packed.shape[axis] != parts:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(axis)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
):
    """flash_attn_func(q, k, v) for qkv (batch, seqlen, 3, nheads, headdim): q, k, v stacked
    on dimension 2. Returns out (batch, seqlen, nheads, headdim) and, as flash_attn_func, lse
    and probs when asked; qkv's gradient has its shape."""
    q, k, v = _unpacked("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, return_lse=return_lse)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
):
    """flash_attn_func(q, k, v) for q (batch, seqlen_q, nheads, headdim) and kv (batch,
    seqlen_k, 2, nheads_k, headdim): k, v stacked on dimension 2 (nheads % nheads_k == 0)."""
    k, v = _unpacked("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, return_lse=return_lse)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
):
    """flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen) for a
    packed batch qkv (total, 3, nheads, headdim): every sequence has as many keys as queries.
    Returns out (total, nheads, headdim), and lse (nheads, total) and probs when asked."""
    q, k, v = _unpacked("qkv", qkv, 3, "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    return_lse: bool = False,
):
    """flash_attn_varlen_func(q, k, v, ...) for q (total_q, nheads, headdim) and kv (total_k, 2,
    nheads_k, headdim): k, v stacked on dimension 1."""
    k, v = _unpacked("kv", kv, 2, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse)
