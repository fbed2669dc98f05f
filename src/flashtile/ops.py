"""flashtile's forward, backward and KV-cache forward as torch custom ops, so that torch.compile
and torch.export see one opaque node per pass instead of tracing into the Triton launchers.

    flashtile::fwd(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, <scalars>)
        -> (out, lse)
    flashtile::bwd(dout, q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed,
                   <scalars>) -> (dq, dk, dv)
    flashtile::fwd_kvcache(q, k_cache, v_cache, seqlens_k, batch_idx, block_table,
                           alibi_slopes, softmax_scale, window_left, window_right, softcap,
                           page_size, num_splits) -> (out, lse)

<scalars>: softmax_scale, diag_offset, window_left, window_right, softcap, dropout_p,
max_seqlen_q, max_seqlen_k: the fields of AttnOptions (kernels/params.py) that a schema can
carry. What each op registers:

- schema: only tensors, ints and floats cross it. A mask predicate (a @triton.jit function
  and its block lists) cannot, so calls with mask_mod stay on interface._FlashAttnFunction,
  in eager mode only.
- impl: rebuilds the AttnOptions and calls interface._forward / interface._backward (and
  fwd_kvcache the forward launcher), the launch path (empty inputs included) that the eager
  functions use too.
- fake: shapes, dtypes and strides of the results without running anything, as the impl makes
  them: out and dq, dk, dv are empty_like(q, k, v) (memory layout of the input; fwd_kvcache's
  out with num_splits > 1 is contiguous), lse is a contiguous (B, H, Nq) float32.
- autograd: fwd saves q, k, v, out, lse and calls bwd; lse is not differentiable.
  fwd_kvcache is inference only (flash_attn_with_kvcache calls it under no_grad); the cache
  append before it stays in the caller, as in-place ATen ops the compiler sees.

Layouts are the kernels': q (B, Nq, H, D), k, v (B, Nk, H_k, D), any strides; with varlen
(cu_seqlens_q given) the packed (1, total, H, D) views. The dropout seed is a 0-d int64 CPU
tensor drawn from torch's generator by the caller; the impl reads it with .item(), where the
compiler does not look, so a compiled graph draws a fresh seed on every call without a host
read in traced code.
"""

from __future__ import annotations

import torch
from torch import Tensor

# interface imports this module and the impls call back into it at run time: one launch path
from flashtile import interface
from flashtile.kernels.params import AttnOptions


def attention(q: Tensor, k: Tensor, v: Tensor, opts: AttnOptions,
              seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """out, lse of flashtile::fwd for validated options without a mask predicate or KV cache.
    seed: the dropout seed (a 0-d int64 tensor), None without dropout."""
    if opts.mask_mod is not None or opts.kvcache is not None:
        raise ValueError("mask_mod and kvcache options do not cross the flashtile ops")
    return fwd(q, k, v, opts.alibi_slopes, *_varlen_tensors(opts), seed, **_scalars(opts))


def _varlen_tensors(opts: AttnOptions) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if opts.varlen is None else (opts.varlen[0], opts.varlen[1])


def _scalars(opts: AttnOptions) -> dict:
    max_seqlen_q, max_seqlen_k = (0, 0) if opts.varlen is None else opts.varlen[2:]
    return dict(softmax_scale=opts.softmax_scale, diag_offset=opts.diag_offset,
                window_left=opts.window_left, window_right=opts.window_right,
                softcap=opts.softcap, dropout_p=opts.dropout_p,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _options(alibi_slopes: Tensor | None, cu_seqlens_q: Tensor | None,
             cu_seqlens_k: Tensor | None, seed: Tensor | None, softmax_scale: float,
             diag_offset: int, window_left: int, window_right: int, softcap: float,
             dropout_p: float, max_seqlen_q: int, max_seqlen_k: int) -> AttnOptions:
    """The AttnOptions the schema's arguments stand for (inside an impl: seed read here)."""
    varlen = (None if cu_seqlens_q is None
              else (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return AttnOptions(softmax_scale=softmax_scale, diag_offset=diag_offset,
                       window_left=window_left, window_right=window_right, softcap=softcap,
                       alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                       seed=int(seed.item()) if seed is not None else 0, varlen=varlen)


@torch.library.custom_op("flashtile::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None,
        cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, seed: Tensor | None,
        softmax_scale: float, diag_offset: int, window_left: int, window_right: int,
        softcap: float, dropout_p: float, max_seqlen_q: int,
        max_seqlen_k: int) -> tuple[Tensor, Tensor]:
    """out (B, Nq, H, D) in q's dtype and layout, lse (B, H, Nq) float32, natural log."""
    opts = _options(alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, softmax_scale, diag_offset,
                    window_left, window_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    return interface._forward(q, k, v, opts)


@fwd.register_fake
def _fwd_fake(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, nheads, _ = q.shape
    return (torch.empty_like(q),
            q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32))


@torch.library.custom_op("flashtile::bwd", mutates_args=())
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        alibi_slopes: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
        seed: Tensor | None, softmax_scale: float, diag_offset: int, window_left: int,
        window_right: int, softcap: float, dropout_p: float, max_seqlen_q: int,
        max_seqlen_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the dtypes and layouts of q, k, v (dk, dv with k's heads)."""
    opts = _options(alibi_slopes, cu_seqlens_q, cu_seqlens_k, seed, softmax_scale, diag_offset,
                    window_left, window_right, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    return interface._backward(dout, q, k, v, out, lse, opts)


@bwd.register_fake
def _bwd_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, ...]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# the schema's arguments after q, k, v: three optional tensors, the seed, eight scalars
_OPTION_TENSORS = ("alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "seed")
_OPTION_SCALARS = ("softmax_scale", "diag_offset", "window_left", "window_right", "softcap",
                   "dropout_p", "max_seqlen_q", "max_seqlen_k")


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *options[:len(_OPTION_TENSORS)])
    ctx.scalars = options[len(_OPTION_TENSORS):]
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout: Tensor, dlse: Tensor | None) -> tuple:
    q, k, v, out, lse, *option_tensors = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, *option_tensors, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (len(_OPTION_TENSORS) + len(_OPTION_SCALARS))


fwd.register_autograd(_fwd_backward, setup_context=_setup_context)


def attention_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, opts: AttnOptions,
                      num_splits: int) -> tuple[Tensor, Tensor]:
    """out, lse of flashtile::fwd_kvcache for validated options with a KV cache (opts.kvcache);
    k_cache, v_cache as the forward kernel reads them (a paged cache as (1, slots, H_k, D))."""
    seqlens_k, batch_idx, block_table, page_size = opts.kvcache
    return fwd_kvcache(q, k_cache, v_cache, seqlens_k, batch_idx, block_table, opts.alibi_slopes,
                       opts.softmax_scale, opts.window_left, opts.window_right, opts.softcap,
                       page_size, num_splits)


@torch.library.custom_op("flashtile::fwd_kvcache", mutates_args=())
def fwd_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor,
                batch_idx: Tensor, block_table: Tensor | None, alibi_slopes: Tensor | None,
                softmax_scale: float, window_left: int, window_right: int, softcap: float,
                page_size: int, num_splits: int) -> tuple[Tensor, Tensor]:
    """out (B, Nq, H, D) in q's dtype, lse (B, H, Nq) float32: each entry attends to the first
    seqlens_k keys of its cache row batch_idx (or of its pages in block_table)."""
    opts = AttnOptions(softmax_scale=softmax_scale, diag_offset=0, window_left=window_left,
                       window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
                       kvcache=(seqlens_k, batch_idx, block_table, page_size))
    return interface.attention_forward(q, k_cache, v_cache, opts, num_splits=num_splits)


@fwd_kvcache.register_fake
def _fwd_kvcache_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor,
                      batch_idx: Tensor, block_table: Tensor | None,
                      alibi_slopes: Tensor | None, softmax_scale: float, window_left: int,
                      window_right: int, softcap: float, page_size: int,
                      num_splits: int) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, nheads, _ = q.shape
    # split-KV combines the partial results into a new, contiguous tensor
    out = torch.empty_like(q) if num_splits <= 1 else q.new_empty(q.shape)
    return out, q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
