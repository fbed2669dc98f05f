"""What every kernel receives besides its tensors: the attention options, turned into runtime
scalars and compile-time flags in one fixed order.

The kernels take, after their tensors and strides:

    nheads, group, seqlen_q, seqlen_k, *AttnOptions.scalars(), seqlen_bucket, ...,
    **AttnOptions.flags()

so a new option is added here once, not at every launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnOptions:
    """Options of one attention call, validated (interface.py).

    diag_offset: query i's diagonal is key i + diag_offset (seqlen_k - seqlen_q for
        FlashAttention's bottom-right alignment, 0 for SDPA's top-left).
    window_left, window_right: query i sees keys diag - window_left .. diag + window_right;
        -1 is unlimited on that side. causal is window_right = 0.
    softcap: scores become softcap · tanh(scores / softcap); 0 is off.
    alibi_slopes: (nheads,) or (batch, nheads) float32, bias -slope · |i + diag_offset - j|.
    dropout_p, seed: dropout on P with Philox numbers from `seed` (torch's generator).
    deterministic: accepted for FlashAttention-2 compatibility; the backward always is.
    mask_mod, lists: a mask predicate (masks.MaskMod) and its block lists for this call
        (kernels/blockmap.py).
    kvcache: a KV cache, (seqlens_k (batch,) int32, batch_idx (batch,) int32, block_table
        (batch, pages) int32 or None, page size): each entry sees its first seqlens_k keys of
        cache row batch_idx (or of its pages), its diagonal bottom-right at that length.
    varlen: packed variable-length batches, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k): the tensors are then (1, total, heads, headdim) and each sequence's
        diagonal is its own bottom-right one.
    """

    softmax_scale: float
    diag_offset: int
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    deterministic: bool = True
    mask_mod: object = None
    lists: object = None
    varlen: tuple | None = None
    kvcache: tuple | None = None

    @property
    def causal(self) -> bool:
        return self.window_right == 0 and self.window_left < 0

    def scalars(self) -> tuple:
        """diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
        dropout_p, dropout_scale, seed."""
        softcap_scale = self.softmax_scale / self.softcap if self.softcap > 0 else 0.0
        return (self.diag_offset, max(self.window_left, 0), max(self.window_right, 0),
                self.softmax_scale * LOG2E, softcap_scale, self.softcap * LOG2E,
                self.dropout_p, 1.0 / (1.0 - self.dropout_p), self.seed)

    def flags(self) -> dict[str, bool]:
        return dict(LOCAL_LEFT=self.window_left >= 0, LOCAL_RIGHT=self.window_right >= 0,
                    SOFTCAP=self.softcap > 0, HAS_ALIBI=self.alibi_slopes is not None,
                    DROPOUT=self.dropout_p > 0, VARLEN=self.varlen is not None)

    def alibi(self, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The slopes tensor and its batch stride (0 for (nheads,) slopes); without ALiBi a
        placeholder the kernels never read."""
        if self.alibi_slopes is None:
            return fallback, 0
        slopes = self.alibi_slopes
        return slopes, (slopes.stride(0) if slopes.dim() == 2 else 0)

    def problem(self, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
        """(batch, seqlen_q, seqlen_k) the grid covers: the tensors' own, or with varlen the
        number of sequences and the longest lengths."""
        if self.varlen is None:
            return q.shape[0], q.shape[1], k.shape[1]
        cu_q, _, max_q, max_k = self.varlen
        return cu_q.numel() - 1, max_q, max_k

    def strides(self, t: torch.Tensor) -> tuple[int, ...]:
        """A tensor's strides for the kernels: with varlen, no batch stride (every sequence
        finds its rows through the cumulative lengths)."""
        return (0, *t.stride()[1:]) if self.varlen is not None else tuple(t.stride())

    def kv_args(self, placeholder: torch.Tensor) -> tuple:
        """SeqlensK, BatchIdx, BlockTable, stride_btb for the forward kernel."""
        if self.kvcache is None:
            return placeholder, placeholder, placeholder, 0
        seqlens_k, batch_idx, block_table, _ = self.kvcache
        if block_table is None:
            return seqlens_k, batch_idx, placeholder, 0
        return seqlens_k, batch_idx, block_table, block_table.stride(0)

    def kv_flags(self) -> dict:
        paged = self.kvcache is not None and self.kvcache[2] is not None
        return dict(KV_CACHE=self.kvcache is not None, PAGED=paged,
                    PAGE=self.kvcache[3] if paged else 16)

    def cu_seqlens(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.varlen is None:
            return placeholder, placeholder
        return self.varlen[0], self.varlen[1]

    def mask_args(self, kind: str, placeholder: torch.Tensor) -> tuple:
        """Lists, MaskData, then stride_mapb, stride_maph, stride_mapr, stride_mapk,
        mask_data_stride: what the kernels take for a mask predicate (placeholders without)."""
        if self.mask_mod is None:
            return (placeholder, placeholder, 0, 0, 0, 0, 0)
        lists, *strides = self.lists.kernel_args(kind)
        data = self.mask_mod.data if self.mask_mod.data is not None else placeholder
        return (lists, data, *strides, self.mask_mod.data_stride)

    def mask_flags(self) -> dict:
        size = self.lists.map_block if self.lists is not None else 16
        return dict(MASK_MOD=self.mask_mod.fn if self.mask_mod is not None else None,
                    MASK_DATA=self.mask_mod is not None and self.mask_mod.data is not None,
                    MAP_BLOCK_M=size, MAP_BLOCK_N=size)
