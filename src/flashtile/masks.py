"""Mask functions: which (query, key) pairs may attend, as a Triton predicate.

A mask is a `@triton.jit` function of broadcast index tiles

    mask_mod(b, h, q_idx, kv_idx)               -> bool tile, True = keep
    mask_mod(b, h, q_idx, kv_idx, data, stride) -> the same, reading a tensor `data`

passed to `flash_attn_func(..., mask_mod=...)`, bare or wrapped in `MaskMod` with its data.
Indices are absolute positions, always inside the problem (q_idx in [0, seqlen_q), kv_idx in
[0, seqlen_k)), b the batch entry, h the query head, so a predicate may index its data with
them. The kernels AND it with the other masks (causal, window, bounds). A predicate defined in
your own module needs `import triton.language as tl` there (the interpreter resolves it).
`document` and `prefix_lm` copy their ids: later changes to the caller's tensor do not leak into
masks (and block maps) already made.

Once per mask and shape, a block map records which (query block, key block) tiles are empty,
partial or full (kernels/blockmap.py); the kernels skip the empty ones and apply the predicate
only on the partial ones, so a sparse mask costs in proportion to the blocks it keeps.

Ready-made: `causal()`, `sliding_window(w)`, `document(doc_ids)`, `prefix_lm(prefix_lengths)`.
Everything runs in eager mode and through the CPU interpreter; no torch.compile is involved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# What @triton.jit returns: a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction.
_JIT_TYPES = (triton.JITFunction, InterpretedFunction)


@dataclass(eq=False)
class MaskMod:
    """A mask predicate and what it reads.

    fn: the @triton.jit predicate; with `data`, it takes (b, h, q_idx, kv_idx, data, stride).
    data: an int32 tensor the predicate reads (on the inputs' device), or None.
    data_stride: the stride the predicate receives (a batch stride, say; 0 to broadcast).
    per_batch, per_head: whether the mask depends on b or h. When it does not, one block map
        serves every batch entry or head.
    check: called as check(batch, seqlen_q, seqlen_k) before a launch; raises ValueError if
        `data` does not cover the problem (so that the predicate never reads out of bounds).
    """

    fn: object  # a @triton.jit function
    data: torch.Tensor | None = None
    data_stride: int = 0
    per_batch: bool = True
    per_head: bool = True
    name: str = "mask_mod"
    check: Callable[[int, int, int], None] | None = None
    _maps: dict = field(default_factory=dict, repr=False)
    _copies: dict = field(default_factory=dict, repr=False)

    def to(self, device) -> MaskMod:
        """This mask with its data on `device` (copied once, then cached with its block maps)."""
        if self.data is None or self.data.device == torch.device(device):
            return self
        key = str(device)
        if key not in self._copies:
            self._copies[key] = MaskMod(self.fn, self.data.to(device), self.data_stride,
                                        self.per_batch, self.per_head, self.name, self.check)
        return self._copies[key]

    def __post_init__(self):
        if not isinstance(self.fn, _JIT_TYPES):
            raise TypeError(f"mask_mod must be a @triton.jit function, got "
                            f"{type(self.fn).__name__}")
        if self.data is not None and not isinstance(self.data, torch.Tensor):
            raise TypeError(f"mask_mod data must be a torch.Tensor or None, got "
                            f"{type(self.data).__name__}")


_bare: dict = {}  # bare predicate -> its MaskMod, so that its block maps are cached too


def as_mask_mod(mask) -> MaskMod:
    """A MaskMod from what the user passed: a MaskMod or a bare @triton.jit predicate."""
    if isinstance(mask, MaskMod):
        return mask
    if isinstance(mask, _JIT_TYPES):
        if mask not in _bare:
            _bare[mask] = MaskMod(mask, name=getattr(mask, "__name__", "mask_mod"))
        return _bare[mask]
    raise TypeError(f"mask_mod must be a @triton.jit function or a flashtile.masks.MaskMod, "
                    f"got {type(mask).__name__}")


# -- ready-made masks ---------------------------------------------------------------------------


@triton.jit
def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@triton.jit
def _sliding_window(b, h, q_idx, kv_idx, data, stride):
    return (kv_idx <= q_idx) & (q_idx - kv_idx <= tl.load(data))


@triton.jit
def _document(b, h, q_idx, kv_idx, data, stride):
    doc = data + b * stride
    return tl.load(doc + q_idx) == tl.load(doc + kv_idx)


@triton.jit
def _prefix_lm(b, h, q_idx, kv_idx, data, stride):
    return (kv_idx <= q_idx) | (kv_idx < tl.load(data + b * stride))


def causal() -> MaskMod:
    """Query i sees keys j <= i (top-left aligned, as torch's is_causal)."""
    return MaskMod(_causal, per_batch=False, per_head=False, name="causal")


def sliding_window(window: int, device=None) -> MaskMod:
    """Causal, and query i sees only keys j >= i - window."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    data = torch.tensor([window], dtype=torch.int32, device=device)
    return MaskMod(_sliding_window, data, 0, per_batch=False, per_head=False,
                   name=f"sliding_window({window})")


def document(doc_ids: torch.Tensor) -> MaskMod:
    """Packed sequences: a token sees only tokens of its own document. doc_ids: (seqlen,) or
    (batch, seqlen) integers, one document id per token (queries and keys share positions, so
    seqlen_q == seqlen_k == seqlen). Combine with causal=True for causal documents."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dtype.is_floating_point:
        raise TypeError("doc_ids must be an integer torch.Tensor")
    if doc_ids.dim() not in (1, 2):
        raise ValueError(f"doc_ids must have shape (seqlen,) or (batch, seqlen), got "
                         f"{tuple(doc_ids.shape)}")
    # a copy: the block maps cached on this mask must keep describing these ids
    data = doc_ids.to(torch.int32, copy=True).contiguous()
    per_batch = data.dim() == 2

    def check(batch, seqlen_q, seqlen_k):
        if seqlen_q != data.shape[-1] or seqlen_k != data.shape[-1]:
            raise ValueError(f"document mask: doc_ids has {data.shape[-1]} tokens but seqlen_q "
                             f"is {seqlen_q} and seqlen_k {seqlen_k}; all three must match")
        if per_batch and data.shape[0] != batch:
            raise ValueError(f"document mask: doc_ids has batch {data.shape[0]}, q has {batch}")

    return MaskMod(_document, data, data.shape[-1] if per_batch else 0, per_batch=per_batch,
                   per_head=False, name="document", check=check)


def prefix_lm(prefix_lengths: torch.Tensor | int, device=None) -> MaskMod:
    """Prefix-LM: every query sees the whole prefix (bidirectional), and the rest causally.
    prefix_lengths: an int, or a (batch,) integer tensor of per-sequence prefix lengths."""
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        data = torch.tensor([prefix_lengths], dtype=torch.int32, device=device)
        return MaskMod(_prefix_lm, data, 0, per_batch=False, per_head=False,
                       name=f"prefix_lm({prefix_lengths})")
    if not isinstance(prefix_lengths, torch.Tensor) or prefix_lengths.dim() != 1:
        raise TypeError("prefix_lengths must be an int or a (batch,) integer tensor")
    data = prefix_lengths.to(torch.int32, copy=True).contiguous()

    def check(batch, seqlen_q, seqlen_k):
        if data.shape[0] != batch:
            raise ValueError(f"prefix_lm mask: prefix_lengths has {data.shape[0]} entries, "
                             f"q has batch {batch}")

    return MaskMod(_prefix_lm, data, 1, per_batch=True, per_head=False, name="prefix_lm",
                   check=check)
