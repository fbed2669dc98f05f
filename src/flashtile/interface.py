"""Public functions: FlashAttention-2's `flash_attn_func` and a drop-in for torch's SDPA.

Both validate their inputs, then run one autograd Function over the kernels. Tensors reach the
kernels as (batch, seqlen, heads, headdim) views; SDPA's (batch, heads, seqlen, headdim) layout
becomes such a view by a transpose of strides, never a copy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from flashtile.kernels.backward import attention_backward
from flashtile.kernels.configs import interpreting
from flashtile.kernels.forward import attention_forward

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttnOptions:
    """What the kernels need beyond the tensors. diag_offset: query i sees key j <= i + offset
    when causal (seqlen_k - seqlen_q for FlashAttention's bottom-right, 0 for SDPA's top-left)."""

    softmax_scale: float
    causal: bool
    diag_offset: int


class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, opts: AttnOptions):
        out, lse = _forward(q, k, v, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.opts)
        return dq, dk, dv, None


def _nothing_to_launch(q, k) -> bool:
    """No query row, or no key: the kernels have nothing to do."""
    return q.numel() == 0 or k.numel() == 0


def _forward(q, k, v, opts: AttnOptions):
    batch, seqlen_q, nheads, _ = q.shape
    if _nothing_to_launch(q, k):
        # Nothing to launch. With no keys every row sees nothing: out = 0, lse = -inf.
        out = torch.zeros_like(q)
        lse = torch.full((batch, nheads, seqlen_q), float("-inf"), device=q.device)
        return out, lse
    return attention_forward(q, k, v, opts.softmax_scale, opts.causal, opts.diag_offset)


def _backward(dout, q, k, v, out, lse, opts: AttnOptions):
    if _nothing_to_launch(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return attention_backward(dout, q, k, v, out, lse, opts.softmax_scale, opts.causal,
                              opts.diag_offset)


# ---------------------------------------------------------------------------------------------
# Validation: every problem is named, with what was expected, before anything reaches Triton.


def _check_tensors(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], ndim: int,
                   layout: str) -> None:
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in zip(names, tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape "
                             f"{tuple(t.shape)}")
    first = names[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first} has {tensors[0].dtype}; "
                            "all inputs must share one dtype")
        if t.device != tensors[0].device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {tensors[0].device}; "
                             "all inputs must be on one device")
    device = tensors[0].device
    if device.type == "cpu" and not interpreting():
        raise ValueError("the inputs are CPU tensors: flashtile runs them only through the Triton "
                         "interpreter; set TRITON_INTERPRET=1 before importing flashtile")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the inputs are on {device}; flashtile runs on CUDA devices "
                         "(or the CPU through the Triton interpreter)")


def _check_qkv(q, k, v, names: tuple[str, str, str] = ("q", "k", "v")) -> None:
    """q: (B, Nq, H, D); k, v: (B, Nk, H_k, D), the FlashAttention layout. `names` are the
    caller's names for the three tensors, so that messages name what the user passed."""
    nq, nk, nv = names
    batch, _, nheads, head_dim = q.shape
    for name, t in ((nk, k), (nv, v)):
        if t.shape[0] != batch:
            raise ValueError(f"{name} has batch size {t.shape[0]} but {nq} has {batch}")
        if t.shape[3] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[3]} but {nq} has {head_dim}; "
                             f"{nq}, {nk} and {nv} must share one head dim")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{nv} has seqlen {v.shape[1]} but {nk} has {k.shape[1]}; "
                         "they must match")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{nv} has {v.shape[2]} heads but {nk} has {k.shape[2]}; "
                         "they must match")
    nheads_k = k.shape[2]
    if nheads_k != nheads:
        if nheads_k > 0 and nheads % nheads_k == 0:
            raise NotImplementedError(
                f"{nk} and {nv} have {nheads_k} heads and {nq} has {nheads}: grouped-query "
                "attention (fewer key/value heads) is not implemented yet")
        raise ValueError(f"{nq} has {nheads} heads, which is not a multiple of {nk}'s "
                         f"{nheads_k}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")


def _softmax_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"{name} must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _not_implemented(name: str, value, default) -> None:
    if value != default:
        raise NotImplementedError(f"{name}={value!r} is not implemented yet in flashtile "
                                  f"(only the default {default!r} is)")


# ---------------------------------------------------------------------------------------------
# Public API


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
    """Exact attention, softmax(q kᵀ · softmax_scale) v, fused, in FlashAttention-2's layout.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32.
        k: (batch, seqlen_k, nheads_k, headdim), same dtype and device.
        v: (batch, seqlen_k, nheads_k, headdim).
        dropout_p: must be 0.0 (dropout is not implemented yet).
        softmax_scale: scaling of q kᵀ before the softmax. Default 1 / sqrt(headdim).
        causal: causal mask, aligned to the bottom-right corner of the score matrix: query i
            sees key j when j <= i + seqlen_k - seqlen_q. For seqlen_q = 2, seqlen_k = 5:
                1 1 1 1 0
                1 1 1 1 1
            and for seqlen_q = 5, seqlen_k = 2:
                0 0
                0 0
                0 0
                1 0
                1 1
            A row that sees no key gives zeros in out (and -inf in lse), never NaN.
        window_size, softcap, alibi_slopes, return_attn_probs: only their defaults are
            implemented yet; any other value raises NotImplementedError.
        deterministic: accepted for compatibility; flashtile's backward is always
            deterministic (no atomics), so repeated backward passes are bitwise equal.
        return_lse: also return the log-sum-exp of each row of scaled scores.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), the dtype of q.
        lse (with return_lse=True): (batch, nheads, seqlen_q) float32, natural log:
            lse[b, h, i] = log Σ_j exp(softmax_scale · q_i · k_j) over the keys row i sees.
    """
    _check_tensors(("q", "k", "v"), (q, k, v), 4, "(batch, seqlen, nheads, headdim)")
    _check_qkv(q, k, v)
    _not_implemented("dropout_p", dropout_p, 0.0)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    _not_implemented("window_size", tuple(window_size), (-1, -1))
    _not_implemented("softcap", softcap, 0.0)
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not implemented yet in flashtile")
    _not_implemented("return_attn_probs", return_attn_probs, False)
    opts = AttnOptions(
        softmax_scale=_softmax_scale(softmax_scale, q.shape[-1]),
        causal=bool(causal),
        diag_offset=k.shape[1] - q.shape[1],
    )
    out, lse = _FlashAttnFunction.apply(q, k, v, opts)
    return (out, lse) if return_lse else out


_warned: set[str] = set()


def _fall_back(reason: str, query, key, value, attn_mask, dropout_p, is_causal, scale,
               enable_gqa):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"flashtile.scaled_dot_product_attention: {reason}; calling "
                      "torch.nn.functional.scaled_dot_product_attention instead", stacklevel=3)
    kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
        scale=scale, **kwargs)


def _sdpa_unsupported(query, key, value, attn_mask, dropout_p, enable_gqa) -> str | None:
    """Why flashtile's kernels cannot take this SDPA call, or None if they can."""
    if attn_mask is not None:
        return "attn_mask is not supported by flashtile's kernels yet"
    if dropout_p != 0.0:
        return "dropout_p > 0 is not supported by flashtile's kernels yet"
    tensors = (query, key, value)
    if any(t.dim() not in (3, 4) for t in tensors) or len({t.dim() for t in tensors}) != 1:
        return "inputs that are not all 3-D or all 4-D are not supported by flashtile's kernels"
    if query.dim() == 4 and (key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]):
        # torch broadcasts one key/value head, and with enable_gqa shares heads in groups
        if enable_gqa:
            return "enable_gqa (fewer key/value heads than query heads) is not supported yet"
        return "key and value with other head counts than query are not supported by flashtile"
    if value.shape[-1] != query.shape[-1] and key.shape[-1] == query.shape[-1]:
        return "a value head dim different from the query's is not supported by flashtile"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head dim over {MAX_HEAD_DIM} is not supported by flashtile's kernels yet"
    if query.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 for flashtile's kernels"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    query: (batch, heads, L, E); key, value: (batch, heads, S, E); 3-D inputs (batch, L, E)
    work too. As in torch, `is_causal` aligns the mask to the top-left corner: query i sees
    key j when j <= i. The kernels read these tensors through their strides (no copies).
    Arguments the kernels do not handle yet (attn_mask, dropout_p > 0, grouped-query heads)
    are passed to torch's own function, with a warning, once per argument, that names them.
    """
    names = ("query", "key", "value")
    for name, t in zip(names, (query, key, value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    reason = _sdpa_unsupported(query, key, value, attn_mask, dropout_p, enable_gqa)
    if reason is not None:
        return _fall_back(reason, query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa)
    _check_tensors(names, (query, key, value), query.dim(), "(batch, heads, seqlen, headdim)")
    squeeze = query.dim() == 3
    if squeeze:  # (batch, L, E) -> (batch, 1, L, E), a view
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, E) views
    _check_qkv(q, k, v, names)
    opts = AttnOptions(
        softmax_scale=_softmax_scale(scale, q.shape[-1], "scale"),
        causal=bool(is_causal),
        diag_offset=0,
    )
    out, _ = _FlashAttnFunction.apply(q, k, v, opts)
    out = out.transpose(1, 2)  # (B, H, L, E)
    return out.squeeze(1) if squeeze else out
