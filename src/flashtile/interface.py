"""Public functions: FlashAttention-2's `flash_attn_func` and a drop-in for torch's SDPA.

Both validate their inputs, then run one autograd Function over the kernels. Tensors reach the
kernels as (batch, seqlen, heads, headdim) views; SDPA's (batch, heads, seqlen, headdim) layout
becomes such a view by a transpose of strides, never a copy.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref

import torch

from flashtile import masks, ops
from flashtile.kernels.backward import attention_backward
from flashtile.kernels.blockmap import block_lists
from flashtile.kernels.configs import interpreting
from flashtile.kernels.forward import attention_forward
from flashtile.kernels.params import AttnOptions
from flashtile.kernels.probs import attention_probs

MAX_HEAD_DIM = 512
# The kernels' grids put heads and batch entries on CUDA grid axes 1 and 2 (as FlashAttention's
# do), each at most 65,535 programs long.
MAX_GRID_AXIS = 65535
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _FlashAttnFunction(torch.autograd.Function):
    """The eager path: every call in eager mode (see _attention), and calls with a mask
    predicate, which cannot cross the schema of the flashtile ops (ops.py)."""

    @staticmethod
    def forward(ctx, q, k, v, opts: AttnOptions):
        out, lse = _forward(q, k, v, opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        # lse has no gradient: without this autograd would fill a zeros tensor for it on every
        # backward (an allocation and a memset launch) only for us to ignore it
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:  # out was not used (lse alone takes no gradient)
            return None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.opts)
        return dq, dk, dv, None


def _attention(q, k, v, opts: AttnOptions, seed: torch.Tensor | None):
    """out, lse. Under torch.compile and torch.export: the custom op flashtile::fwd (ops.py),
    which the compiler sees as one node. In eager mode: the same launches through
    _FlashAttnFunction, whose dispatch costs a fifth of the op's (host Python per forward with
    gradients, launch excluded: ~23 against ~108 µs on a CI core), and on the GPU's host that
    time is as long as a small problem's kernels."""
    if torch.compiler.is_compiling():
        return ops.attention(q, k, v, opts, seed)
    return _FlashAttnFunction.apply(q, k, v, _seeded(opts, seed))


def _nothing_to_launch(q, k) -> bool:
    """No query row, or no key: the kernels have nothing to do."""
    return q.numel() == 0 or k.numel() == 0


def _forward(q, k, v, opts: AttnOptions, out_dtype: torch.dtype | None = None):
    """out (in out_dtype, default q's) and lse; see attention_forward."""
    batch, seqlen_q, nheads, _ = q.shape
    if _nothing_to_launch(q, k):
        # Nothing to launch. With no keys every row sees nothing: out = 0, lse = -inf.
        out = torch.zeros_like(q, dtype=out_dtype)
        lse = torch.full((batch, nheads, seqlen_q), float("-inf"), device=q.device)
        return out, lse
    return attention_forward(q, k, v, opts, out_dtype=out_dtype)


def _backward(dout, q, k, v, out, lse, opts: AttnOptions):
    if _nothing_to_launch(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if _row_span(dout, dout.shape[1]) > 2**31:
        # a gradient laid out more sparsely than out (a view of something larger) takes one
        # sequence past the kernels' 32-bit row offsets: copied into out's layout, which q's
        # checks cover
        dout = torch.empty_like(out).copy_(dout)
    return attention_backward(dout, q, k, v, out, lse, opts)


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


def _row_span(t: torch.Tensor, rows: int) -> int:
    """Elements from the first to the last of `rows` rows (dim 1) of one sequence and head."""
    return (rows - 1) * t.stride(1) + (t.shape[-1] - 1) * t.stride(-1) + 1 if rows > 0 else 0


def _check_row_offsets(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...],
                       rows: tuple[int, ...]) -> None:
    """The kernels offset batch entries and heads in 64 bits but rows within one sequence in
    32: from a sequence's first row to its last (`rows` long, along dim 1) must be fewer than
    2^31 elements. FlashAttention-style tensors reach it at about 1M tokens in one sequence
    with nheads · headdim = 2048."""
    for name, t, n in zip(names, tensors, rows):
        span = _row_span(t, n)
        if span > 2**31:
            raise ValueError(
                f"{name}: one sequence spans {span} elements ({n} rows of stride "
                f"{t.stride(1)}), more than 2^31; flashtile indexes the rows of one sequence in "
                "32 bits (batch entries and heads in 64): split the sequence, as ring attention "
                "does, or pack it with fewer heads per call")


def _check_qkv(q, k, v, names: tuple[str, str, str] = ("q", "k", "v"),
               rows: tuple[int, int] | None = None) -> None:
    """q: (B, Nq, H, D); k, v: (B, Nk, H_k, D), the FlashAttention layout. `names` are the
    caller's names for the three tensors, so that messages name what the user passed; `rows`
    the longest query and key sequences (default Nq, Nk; packed batches pass max_seqlen)."""
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
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"{nq} has {nheads} heads, which is not a multiple of {nk}'s "
                         f"{nheads_k} (grouped-query attention needs nheads % nheads_k == 0)")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    rows_q, rows_k = rows or (q.shape[1], k.shape[1])
    _check_row_offsets(names, (q, k, v), (rows_q, rows_k, rows_k))


def _softmax_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"{name} must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _dropout_p(dropout_p, name: str = "dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _window(window_size) -> tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size {side} must be >= 0, or -1 for no limit; got {w}")
    return int(window_size[0]), int(window_size[1])


def _softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0 is off), got {softcap}")
    return float(softcap)


def _alibi(alibi_slopes, batch: int, nheads: int, device) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got "
                        f"{type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    shape = tuple(alibi_slopes.shape)
    if shape != (nheads,) and shape != (batch, nheads):  # `in` misses symbolic sizes (dynamo)
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    return alibi_slopes if alibi_slopes.stride(-1) == 1 else alibi_slopes.contiguous()


def _options(batch: int, nheads: int, head_dim: int, device, *, softmax_scale, causal,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
             scale_name: str = "softmax_scale", **layout) -> AttnOptions:
    """The options every entry point shares, validated; causal folds into the window's right
    side (0). The dropout seed is the caller's (_dropout_seed). `layout`: diag_offset, varlen
    or kvcache."""
    for what, n in (("the batch size (with cu_seqlens, the number of sequences)", batch),
                    ("the number of heads", nheads)):
        if n > MAX_GRID_AXIS:
            raise ValueError(f"{what} must be at most {MAX_GRID_AXIS} (a CUDA grid axis holds "
                             f"one program per entry), got {n}; split the call")
    dropout_p = _dropout_p(dropout_p)
    window_left, window_right = _window(window_size)
    return AttnOptions(
        softmax_scale=_softmax_scale(softmax_scale, head_dim, scale_name),
        window_left=window_left,
        window_right=0 if causal else window_right,
        softcap=_softcap(softcap),
        alibi_slopes=_alibi(alibi_slopes, batch, nheads, device),
        dropout_p=dropout_p,
        **{"diag_offset": 0, **layout},
    )


@torch.compiler.disable(reason="return_attn_probs runs in eager mode only: the probabilities "
                        "kernel is launched outside the flashtile ops")
def _probs(q, k, lse, opts: AttnOptions, seed: torch.Tensor | None) -> torch.Tensor:
    """return_attn_probs: the probabilities kernel, or zeros when there is nothing to launch.
    Under torch.compile, behind a graph break (fullgraph=True: an error)."""
    opts = _seeded(opts, seed)
    if not _nothing_to_launch(q, k):
        return attention_probs(q.detach(), k.detach(), lse, opts)
    batch, seqlen_q, seqlen_k = opts.problem(q, k)
    return torch.zeros(batch, q.shape[2], seqlen_q, seqlen_k, device=q.device)


def _with_mask(opts: AttnOptions, mask_mod, q: torch.Tensor, k: torch.Tensor) -> AttnOptions:
    """The options with a mask predicate and its block lists for this shape."""
    mask = masks.as_mask_mod(mask_mod)
    batch, seqlen_q, nheads, _ = q.shape
    if mask.data is not None and mask.data.device != q.device:
        if mask.data.device.type == "meta":
            raise ValueError(f"mask_mod's data is on {mask.data.device} but q is on {q.device}")
        mask = mask.to(q.device)  # small index data: copied once, cached on the mask
    if mask.check is not None:
        mask.check(batch, seqlen_q, k.shape[1])
    if _nothing_to_launch(q, k):
        return dataclasses.replace(opts, mask_mod=mask)
    lists = block_lists(mask, batch, nheads, seqlen_q, k.shape[1], opts, q.device)
    return dataclasses.replace(opts, mask_mod=mask, lists=lists)


_EAGER_ONLY = ("flash_attn_func with mask_mod runs in eager mode only: a mask predicate (a "
               "@triton.jit function) cannot cross the flashtile ops that torch.compile and "
               "torch.export see")


@torch.compiler.disable(reason=_EAGER_ONLY)
def _masked_attention(q, k, v, opts: AttnOptions, mask_mod, seed: torch.Tensor | None):
    """out, lse and the options of a call with a mask predicate, on _FlashAttnFunction. Under
    torch.compile a graph break (fullgraph=True: an error) runs it eagerly; torch.export, which
    runs Python with fake tensors, gets a NotImplementedError."""
    if torch.compiler.is_compiling():
        raise NotImplementedError(_EAGER_ONLY)
    opts = _with_mask(opts, mask_mod, q, k)
    out, lse = _FlashAttnFunction.apply(q, k, v, _seeded(opts, seed))
    return out, lse, opts


def _dropout_seed(dropout_p: float) -> torch.Tensor | None:
    """A Philox seed drawn from torch's default generator, None without dropout: torch.manual_seed
    makes dropout reproducible. A 0-d int64 CPU tensor, read by the flashtile ops (no device
    synchronization, and no host read in a compiled graph)."""
    if dropout_p == 0:
        return None
    if (not torch.compiler.is_compiling() and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing()):
        raise NotImplementedError(
            "dropout_p > 0 while a CUDA graph is captured: the dropout seed is drawn on the "
            "host, so every replay would apply the same dropout mask; capture without dropout "
            "or run this call outside the graph")
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _seeded(opts: AttnOptions, seed: torch.Tensor | None) -> AttnOptions:
    """The options with the seed as the kernels take it, for the launches outside the ops."""
    return opts if seed is None else dataclasses.replace(opts, seed=int(seed.item()))


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
    mask_mod=None,
):
    """Exact attention, softmax(q kᵀ · softmax_scale) v, fused, in FlashAttention-2's layout.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16, bfloat16 or float32; headdim <= 512.
        k: (batch, seqlen_k, nheads_k, headdim), same dtype and device; nheads % nheads_k == 0
            (grouped-query / multi-query attention: query head h uses key head
            h // (nheads // nheads_k); its gradients are summed over the group).
        v: (batch, seqlen_k, nheads_k, headdim).
        dropout_p: dropout probability on the attention probabilities, in [0, 1). Kept entries
            are scaled by 1 / (1 - dropout_p). The random numbers come from a Philox seed drawn
            from torch's generator, so torch.manual_seed makes a run reproducible; the
            backward regenerates the same mask (none is stored).
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
        window_size: (left, right) sliding window, bottom-right aligned as causal: query i
            sees keys j with i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q +
            right; -1 leaves that side unlimited. With causal=True, right is 0. Key blocks
            outside every row's window are skipped, so the cost grows with the window.
        softcap: if > 0, scores become softcap · tanh(scores / softcap) before the softmax.
        alibi_slopes: (nheads,) or (batch, nheads) float32; adds
            -slope · |i + seqlen_k - seqlen_q - j| to the scaled scores (after the softcap).
        deterministic: accepted for compatibility; flashtile's backward is always
            deterministic (no atomics), so repeated backward passes are bitwise equal.
        return_attn_probs: also return lse and the probabilities the forward used,
            (batch, nheads, seqlen_q, seqlen_k) float32: zero where masked or dropped, kept
            entries scaled by 1 / (1 - dropout_p), so that out = probs @ v. This writes an
            N×N matrix: for tests and visualization at small sizes. No gradient flows through
            probs. Eager only: torch.compile runs it behind a graph break.
        return_lse: also return the log-sum-exp of each row of scaled scores.
        mask_mod: a mask predicate (flashtile.masks): a @triton.jit function
            (b, h, q_idx, kv_idx) -> keep, or a masks.MaskMod with the data it reads, such as
            masks.document(doc_ids). ANDed with causal and window_size. A block map of it is
            built once per mask and shape and cached on the mask; tiles it leaves empty are
            skipped, so sparse masks run faster in proportion. Eager only: a predicate cannot
            cross the flashtile ops (ops.py), so torch.compile runs such a call behind a graph
            break (an error with fullgraph=True) and torch.export refuses it.

    Under torch.compile and torch.export the call is the custom ops flashtile::fwd and
    flashtile::bwd (flashtile/ops.py): no graph break. In eager mode the same kernels run
    through an autograd Function, whose dispatch costs less host time.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), the dtype of q.
        lse (with return_lse=True or return_attn_probs=True): (batch, nheads, seqlen_q)
            float32, natural log: lse[b, h, i] = log Σ_j exp(s_ij) over the keys row i sees,
            s the scores after scale, softcap and ALiBi (dropout does not enter it).
        probs (with return_attn_probs=True): as described above.
    """
    _check_tensors(("q", "k", "v"), (q, k, v), 4, "(batch, seqlen, nheads, headdim)")
    _check_qkv(q, k, v)
    opts = _options(q.shape[0], q.shape[2], q.shape[3], q.device, softmax_scale=softmax_scale,
                    causal=causal, window_size=window_size, softcap=softcap,
                    alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                    diag_offset=k.shape[1] - q.shape[1])
    seed = _dropout_seed(opts.dropout_p)
    if mask_mod is None:
        out, lse = _attention(q, k, v, opts, seed)
    else:
        out, lse, opts = _masked_attention(q, k, v, opts, mask_mod, seed)
    if return_attn_probs:
        return out, lse, _probs(q, k, lse, opts, seed)
    return (out, lse) if return_lse else out


# cu_seqlens tensors whose values were checked: id -> (tensor's weakref, data_ptr, version
# counter, total, longest). A model passes the same cu_seqlens to every layer, forward and
# backward; each check is a host synchronization, and after one the GPU idles while the host
# launches the next kernel (on the H100 that made a 5k-token varlen forward take 1.7-2.8x the
# dense one's time, docs/performance.md v5.6). An in-place write bumps the version counter, so a
# changed tensor is checked again; only writes that bypass torch's counter (a raw pointer)
# would go unseen.
_CHECKED_CU_MAX = 16
_checked_cu: dict[int, tuple] = {}


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device) -> int:
    """cu_seqlens: int32, (batch + 1,), starting at 0, nondecreasing, ending at `total`.
    Returns the longest sequence. (One host synchronization the first time a tensor is seen,
    none for the same unchanged tensor again. Under torch.compile or torch.export only the
    dtype, shape and device are checked, and 0 is returned: reading the values would break the
    graph.)"""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 >= 2 cumulative "
                         f"lengths, got {cu.dtype} of shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if _capturing(device):  # torch.compile tracing or a CUDA graph capture: no host read
        return 0
    # an inference tensor has no version counter: it is read every time
    stamp = None if cu.is_inference() else (cu.data_ptr(), cu._version, total)
    seen = _checked_cu.get(id(cu))
    if stamp is not None and seen is not None and seen[0]() is cu and seen[1:4] == stamp:
        return seen[4]
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0, never decrease and end at {total} (the "
                         f"packed length), got {values[:8]}{' ...' if len(values) > 8 else ''}")
    longest = max(b - a for a, b in zip(values, values[1:]))
    if stamp is None:
        return longest
    if len(_checked_cu) >= _CHECKED_CU_MAX:
        _checked_cu.pop(next(iter(_checked_cu)))
    _checked_cu[id(cu)] = (weakref.ref(cu), *stamp, longest)
    return longest


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
    """flash_attn_func over a packed batch of sequences of different lengths, FlashAttention-2's
    signature: no work is spent on padding.

    Arguments:
        q: (total_q, nheads, headdim), the batch's sequences one after another.
        k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 cumulative lengths: sequence i's queries
            are rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (checked).
        The cumulative lengths' values and max_seqlen_q, max_seqlen_k against them are checked in
        eager mode only: under torch.compile and torch.export reading them would break the graph.
        The other arguments as in flash_attn_func; causal and window_size are aligned to each
        sequence's own bottom-right corner, alibi_slopes may be (batch, nheads).

    Returns out (total_q, nheads, headdim); with return_lse also lse (nheads, total_q) float32;
    with return_attn_probs (out, lse, probs), probs (batch, nheads, max_seqlen_q,
    max_seqlen_k), zero beyond each sequence's lengths.
    """
    _check_tensors(("q", "k", "v"), (q, k, v), 3, "(total, nheads, headdim)")
    batch = cu_seqlens_q.shape[0] - 1 if isinstance(cu_seqlens_q, torch.Tensor) else 0
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.numel()} entries but cu_seqlens_q "
                         f"has {cu_seqlens_q.numel()}; both are batch + 1")
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, longest_q),
                                 ("max_seqlen_k", max_seqlen_k, longest_k)):
        if isinstance(given, bool) or not isinstance(given, int) or given < longest:
            raise ValueError(f"{name} must be an int of at least the longest sequence "
                             f"({longest}), got {given!r}")
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # (1, total, H, D) views
    _check_qkv(q4, k4, v4, rows=(max_seqlen_q, max_seqlen_k))
    # each sequence's diagonal is its own (seqlen_k - seqlen_q), found in the kernels
    opts = _options(batch, q.shape[1], q.shape[2], q.device, softmax_scale=softmax_scale,
                    causal=causal, window_size=window_size, softcap=softcap,
                    alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                    varlen=(cu_seqlens_q, cu_seqlens_k, max(max_seqlen_q, 1),
                            max(max_seqlen_k, 1)))
    seed = _dropout_seed(opts.dropout_p)
    out4, lse4 = _attention(q4, k4, v4, opts, seed)
    out, lse = out4.squeeze(0), lse4.squeeze(0)  # (total_q, H, D), (H, total_q)
    if return_attn_probs:
        return out, lse, _probs(q4, k4, lse4, opts, seed)
    return (out, lse) if return_lse else out


def _int32_vector(name: str, t, length: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or tuple(t.shape) != (length,):
        raise ValueError(f"{name} must be an int32 tensor of shape ({length},), got {t.dtype} "
                         f"of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention against a KV cache, FlashAttention-2's signature and semantics (inference: no
    gradient).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with block_table
            a paged cache (num_blocks, page_size, nheads_k, headdim), page_size a multiple of 16.
        k, v: optional new keys/values (batch, seqlen_new, nheads_k, headdim), written in place
            into the cache at positions cache_seqlens .. cache_seqlens + seqlen_new - 1 before
            the attention.
        cache_seqlens: the cache's valid length per batch entry before the append: an int, or
            (batch,) int32; None means the whole cache.
        cache_batch_idx: (batch,) int32, which cache row each entry uses (default 0..batch-1).
        block_table: (batch, max_pages) int32 page indices of each entry's cache.
        causal, window_size: aligned to the bottom-right of each entry's (seqlen_q, valid
            length) score matrix. softmax_scale, softcap, alibi_slopes as in flash_attn_func.
        num_splits: split-KV (flash-decoding): each row's keys are cut into this many chunks,
            run by separate programs and combined by their log-sum-exp. 0 chooses: on a GPU,
            enough splits to give every SM about two programs when batch · heads · query
            blocks are fewer (chunks of at least 256 keys of the cache's capacity); 1 never
            splits. With grouped heads one program reads a kv head once for all its query
            heads.
        return_softmax_lse: also return lse (batch, nheads, seqlen_q).

    The cache's lengths are checked against its capacity on the host (one synchronization);
    while a CUDA graph is captured, or torch.compile traces, they cannot be read and are not.
    """
    _check_tensors(("q", "k_cache", "v_cache"), (q, k_cache, v_cache), 4,
                   "(batch, seqlen, nheads, headdim)")
    batch, seqlen_q, nheads, head_dim = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[3] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[3]} but q has {head_dim}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has "
                         f"{tuple(k_cache.shape)}; they must match")
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(f"q has {nheads} heads, which is not a multiple of k_cache's "
                         f"{nheads_k}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    if batch * num_splits > MAX_GRID_AXIS:
        raise ValueError(f"num_splits × batch must be at most {MAX_GRID_AXIS} (one grid axis "
                         f"holds them), got {num_splits} × {batch}")
    _check_row_offsets(("q",), (q,), (seqlen_q,))  # paged caches' rows are 64-bit
    device = q.device
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx and block_table cannot be combined")
        if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32
                or block_table.dim() != 2 or block_table.shape[0] != batch):
            raise ValueError(f"block_table must be an int32 tensor of shape ({batch}, pages)")
        if block_table.device != device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
        page = k_cache.shape[1]
        if page % 16:
            raise ValueError(f"the paged cache's page size (k_cache.shape[1]) must be a multiple "
                             f"of 16, got {page}")
        capacity = block_table.shape[1] * page
        batch_idx = torch.zeros(batch, dtype=torch.int32, device=device)
    else:
        page = 0
        capacity = k_cache.shape[1]
        _check_row_offsets(("k_cache", "v_cache"), (k_cache, v_cache), (capacity, capacity))
        batch_idx = (torch.arange(batch, dtype=torch.int32, device=device)
                     if cache_batch_idx is None
                     else _int32_vector("cache_batch_idx", cache_batch_idx, batch, device))
    if cache_seqlens is None:
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    cache_seqlens = _int32_vector("cache_seqlens", cache_seqlens, batch, device)
    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values)")
    if k is not None:
        _check_tensors(("q", "k", "v"), (q, k, v), 4, "(batch, seqlen_new, nheads_k, headdim)")
        if k.shape != v.shape or k.shape[0] != batch or tuple(k.shape[2:]) != (nheads_k,
                                                                                head_dim):
            raise ValueError(f"k and v must have shape ({batch}, seqlen_new, {nheads_k}, "
                             f"{head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        seqlen_new = k.shape[1]
    seqlens_k = cache_seqlens + seqlen_new
    if batch and not _capturing(device):
        # one synchronization for every value check (skipped while a CUDA graph is captured or
        # torch.compile traces, where the host cannot read values); on an error, more reads
        # find what to name
        rows = k_cache.shape[0]  # pages of a paged cache, else cache rows
        if block_table is not None:
            # the pages each entry reads or appends to: its first ceil(length / page) entries
            used = (torch.arange(block_table.shape[1], device=device)[None, :]
                    < (seqlens_k[:, None] + page - 1) // page)
            bad = used & ((block_table < 0) | (block_table >= rows))
        else:
            bad = (batch_idx < 0) | (batch_idx >= rows)
        lowest, longest, any_bad = torch.stack(
            [cache_seqlens.min(), seqlens_k.max(), bad.any().to(torch.int32)]).tolist()
        if lowest < 0 or longest > capacity:
            raise ValueError(f"cache_seqlens + seqlen_new must lie in [0, {capacity}] (the "
                             f"cache's capacity), got lengths {seqlens_k.tolist()[:8]}")
        if any_bad and block_table is not None:
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} points "
                             f"outside the paged cache: page indices must lie in [0, "
                             f"{rows}) (k_cache.shape[0], the number of pages)")
        if any_bad and cache_batch_idx is None:
            raise ValueError(f"k_cache has {rows} rows but q has batch {batch}: without "
                             f"cache_batch_idx, entry b reads cache row b")
        if any_bad:
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_batch_idx[{b}] = {int(batch_idx[b])} points outside "
                             f"the cache: rows must lie in [0, {rows}) (k_cache.shape[0])")
    if seqlen_new:
        # append in place: rows cache_seqlens .. + seqlen_new of each entry's cache
        positions = cache_seqlens[:, None].long() + torch.arange(seqlen_new, device=device)
        with torch.no_grad():
            if block_table is not None:
                rows = (block_table.gather(1, positions // page).long() * page
                        + positions % page).flatten()
                k_cache.view(-1, nheads_k, head_dim)[rows] = k.reshape(-1, nheads_k, head_dim)
                v_cache.view(-1, nheads_k, head_dim)[rows] = v.reshape(-1, nheads_k, head_dim)
            else:
                k_cache[batch_idx[:, None].long(), positions] = k
                v_cache[batch_idx[:, None].long(), positions] = v
    # each entry's diagonal is its own (seqlens_k - seqlen_q), found in the kernel
    opts = _options(batch, nheads, head_dim, device, softmax_scale=softmax_scale, causal=causal,
                    window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                    kvcache=(seqlens_k.to(torch.int32), batch_idx, block_table, page))
    splits = num_splits or _auto_splits(
        _decode_programs(batch, nheads, nheads_k, seqlen_q), capacity, device)
    keys = k_cache.view(1, -1, nheads_k, head_dim) if block_table is not None else k_cache
    values = v_cache.view(1, -1, nheads_k, head_dim) if block_table is not None else v_cache
    if q.numel() == 0:
        out = torch.zeros_like(q)
        lse = torch.full((batch, nheads, seqlen_q), float("-inf"), device=device)
    else:
        with torch.no_grad():
            if torch.compiler.is_compiling():  # one node for the compiler (ops.py)
                out, lse = ops.attention_kvcache(q, keys, values, opts, splits)
            else:  # eager: the launcher itself, without the op's dispatch
                out, lse = attention_forward(q, keys, values, opts, num_splits=splits)
    return (out, lse) if return_softmax_lse else out


def _capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream, or torch.compile is tracing: no
    host synchronization is allowed."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _decode_programs(batch: int, nheads: int, nheads_k: int, seqlen_q: int) -> int:
    """The forward's programs against a KV cache, unsplit: with grouped heads one per kv head
    and 16 of the group's (query, head) rows (PACK_GQA), else one per head and 128 queries."""
    group = nheads // nheads_k
    if group > 1:
        return batch * nheads_k * -(-seqlen_q * group // 16)
    return batch * nheads * -(-seqlen_q // 128)


def _auto_splits(programs: int, longest: int, device: torch.device) -> int:
    """Split-KV when the (batch, head, query block) programs leave SMs idle (`split_count`).
    Never under the interpreter."""
    if device.type != "cuda" or programs == 0:
        return 1
    return split_count(programs, longest, torch.cuda.get_device_properties(device)
                       .multi_processor_count)


def split_count(programs: int, longest: int, sms: int) -> int:
    """How many splits of each row's keys: as many as keep every program resident at once,
    at most two per SM (more, and a partial second round of programs leaves the rest of the
    GPU idle: B 8 × 16k on the H200 read 76% of the copy bandwidth at 8 splits, 256 programs
    on 132 SMs, and 71% at 9), in chunks of at least 256 keys of the longest possible row
    (the cache's capacity: no synchronization), at most 64 splits."""
    if programs >= sms:
        return 1
    return max(1, min(2 * sms // programs, -(-longest // 256), 64))


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


def _sdpa_unsupported(query, key, value, attn_mask, enable_gqa) -> str | None:
    """Why flashtile's kernels cannot take this SDPA call, or None if they can."""
    if attn_mask is not None:
        return "attn_mask is not supported by flashtile's kernels yet"
    tensors = (query, key, value)
    if any(t.dim() not in (3, 4) for t in tensors) or len({t.dim() for t in tensors}) != 1:
        return "inputs that are not all 3-D or all 4-D are not supported by flashtile's kernels"
    if query.dim() == 4 and (key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]):
        # with enable_gqa torch shares key/value heads in groups, as the kernels do
        if not (enable_gqa and key.shape[1] == value.shape[1] and key.shape[1] > 0
                and query.shape[1] % key.shape[1] == 0):
            return ("key and value with other head counts than query (without enable_gqa and "
                    "nheads % nheads_k == 0) are not supported by flashtile")
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
    enable_gqa=True shares key/value heads in groups (query heads % key heads == 0), and
    dropout_p > 0 drops attention probabilities with flashtile's Philox dropout (seeded from
    torch's generator). What the kernels do not handle (attn_mask, a value head dim different
    from the query's) is passed to torch's own function, with a warning, once per reason.
    """
    names = ("query", "key", "value")
    for name, t in zip(names, (query, key, value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    reason = _sdpa_unsupported(query, key, value, attn_mask, enable_gqa)
    if reason is not None:
        return _fall_back(reason, query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa)
    _check_tensors(names, (query, key, value), query.dim(), "(batch, heads, seqlen, headdim)")
    squeeze = query.dim() == 3
    if squeeze:  # (batch, L, E) -> (batch, 1, L, E), a view
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, E) views
    _check_qkv(q, k, v, names)
    # torch's is_causal is top-left aligned: the diagonal at offset 0
    opts = _options(q.shape[0], q.shape[2], q.shape[3], q.device, softmax_scale=scale,
                    causal=is_causal, dropout_p=dropout_p, scale_name="scale", diag_offset=0)
    out, _ = _attention(q, k, v, opts, _dropout_seed(opts.dropout_p))
    out = out.transpose(1, 2)  # (B, H, L, E)
    return out.squeeze(1) if squeeze else out
