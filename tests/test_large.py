"""Tensors of more than 2^31 elements (GPU only): every offset into them must be computed in 64
bits. An int32 overflow corrupts the rows past element 2^31, so these tests compare every row.

The shapes keep attention itself cheap (short sequences, many batch entries or sequences, pages
or cache rows) while the tensors pass 2^31 elements. The inputs repeat a few patterns: batch
entry (sequence, cache entry) b holds pattern b % P, so every result must equal the pattern's
own result bit for bit, wherever in memory it lies, which checks every row without an N×N
reference for each. The patterns, and the last batch entries (the rows past 2^31), are also
checked against the float64 reference by the rule (flashtile/testing.py).

Each test needs 10-40 GiB of free GPU memory and skips with the amount when there is less.
Configs are fixed (FLASHTILE_AUTOTUNE=0): autotuning would run every candidate on tensors of
gigabytes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU

import flashtile
from flashtile.testing import check_attention, reference_attention

pytestmark = pytest.mark.skipif(not ON_GPU, reason="tensors of 2^31 elements need a GPU")

BIG = 2**31
F64 = torch.float64
DTYPE = torch.bfloat16
FIELDS = ("out", "lse", "dq", "dk", "dv")


@pytest.fixture(autouse=True)
def _untuned_and_freed(monkeypatch):
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "0")
    yield
    torch.cuda.empty_cache()


def need_free_memory(nbytes: int) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, "
                    f"{free / 2**30:.1f} GiB free")


def repeated(patterns: torch.Tensor, times: int) -> torch.Tensor:
    """(P, ...) -> (times · P, ...) in memory: entry b is patterns[b % P]."""
    return patterns.repeat(times, *([1] * (patterns.dim() - 1)))


def assert_periodic(name: str, t: torch.Tensor, period: int, dim: int = 0) -> None:
    """t's slices along dim repeat with `period`, bit for bit (checked in chunks)."""
    t = t.movedim(dim, 0)
    first = t[:period]
    for start in range(period, t.shape[0], 64 * period):
        chunk = t[start:start + 64 * period]
        reps = chunk.shape[0] // period
        same = chunk.reshape(reps, period, *t.shape[1:]) == first.unsqueeze(0)
        if not bool(same.all()):
            bad = (~same).flatten(2).any(-1).nonzero()[0].tolist()
            raise AssertionError(f"{name}: slice {start + bad[0] * period + bad[1]} differs from "
                                 f"slice {bad[1]} of the same pattern")


def test_dense_forward_backward_past_2_31(dev):
    """flash_attn_func on (4196, 250, 16, 128): 2^31 + 868,352 elements per tensor."""
    patterns, seqlen, nheads, head_dim = 4, 250, 16, 128
    batch = 4196
    numel = batch * seqlen * nheads * head_dim
    assert numel > BIG
    need_free_memory(10 * numel * 2)
    q, k, v, dout = (repeated(torch.randn(patterns, seqlen, nheads, head_dim, device=dev,
                                          dtype=DTYPE), batch // patterns) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flashtile.flash_attn_func(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    got = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    for field, t in got.items():
        assert_periodic(field, t.detach(), patterns)
    for b in (*range(patterns), batch - 2, batch - 1):  # the last entries lie past 2^31
        entry = slice(b, b + 1)
        ref = reference_attention(q[entry], k[entry], v[entry], dout[entry], causal=True,
                                  dtype=F64)
        base = reference_attention(q[entry], k[entry], v[entry], dout[entry], causal=True)
        check_attention(f"batch entry {b}", {f: t[entry] for f, t in got.items()}, ref, base,
                        DTYPE)


def test_varlen_forward_backward_past_2_31(dev):
    """flash_attn_varlen_func, ragged sequences (empty ones too) repeated 1,275 times: more than
    2^31 elements in q, k and v, cu_seqlens up to 1.2 million."""
    lens_q = [250, 131, 0, 1, 377, 64]
    lens_k = [250, 200, 7, 0, 377, 90]
    times, nheads, head_dim = 1275, 16, 128
    block_q, block_k = sum(lens_q), sum(lens_k)
    total_q, total_k = times * block_q, times * block_k
    assert total_q * nheads * head_dim > BIG and total_k * nheads * head_dim > BIG
    need_free_memory((5 * total_q + 5 * total_k) * nheads * head_dim * 2)
    cu_q = torch.tensor([0, *torch.tensor(lens_q * times).cumsum(0).tolist()],
                        dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor(lens_k * times).cumsum(0).tolist()],
                        dtype=torch.int32, device=dev)
    q, dout = (repeated(torch.randn(block_q, nheads, head_dim, device=dev, dtype=DTYPE), times)
               for _ in range(2))
    k, v = (repeated(torch.randn(block_k, nheads, head_dim, device=dev, dtype=DTYPE), times)
            .requires_grad_() for _ in range(2))
    q.requires_grad_()
    out, lse = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for field, t, period, dim in (("out", out, block_q, 0), ("lse", lse, block_q, 1),
                                  ("dq", dq, block_q, 0), ("dk", dk, block_k, 0),
                                  ("dv", dv, block_k, 0)):
        assert_periodic(field, t.detach(), period, dim)
    last = len(lens_q) * times
    for i in (*range(len(lens_q)), last - 3, last - 2):  # the last ones lie past 2^31
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        keys = slice(int(cu_k[i]), int(cu_k[i + 1]))
        if rows.stop == rows.start:
            continue
        qi, ki, vi, doi = q[rows][None], k[keys][None], v[keys][None], dout[rows][None]
        ref = reference_attention(qi, ki, vi, doi, causal=True, dtype=F64)
        base = reference_attention(qi, ki, vi, doi, causal=True)
        got = dict(out=out[rows][None], lse=lse[:, rows][None], dq=dq[rows][None],
                   dk=dk[keys][None], dv=dv[keys][None])
        fields = FIELDS if keys.stop > keys.start else ("out", "lse", "dq")
        check_attention(f"sequence {i}", got, ref, base, DTYPE, fields=fields)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_past_2_31(paged, dev):
    """flash_attn_with_kvcache on a cache of more than 2^31 elements: entry 1 reads (and appends
    to) the cache's last rows or pages, holding the same keys and values as entry 0's first
    ones, so its result must equal entry 0's bit for bit."""
    nheads, nheads_k, head_dim = 16, 8, 128
    if paged:
        page, blocks = 256, 8194
        shape = (blocks, page, nheads_k, head_dim)  # 3 pages of 256 per entry: 768 >= 701
        block_table = torch.tensor([[0, 1, 2], [blocks - 3, blocks - 2, blocks - 1]],
                                   dtype=torch.int32, device=dev)
        batch_idx = None
    else:
        rows = 65
        shape = (rows, 32768, nheads_k, head_dim)
        block_table = None
        batch_idx = torch.tensor([0, rows - 1], dtype=torch.int32, device=dev)
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    assert numel > BIG
    need_free_memory(2 * numel * 2 + 2**30)
    k_cache, v_cache = (torch.randn(shape, device=dev, dtype=DTYPE) for _ in range(2))
    used = 700
    if paged:  # entry 1's pages: copies of entry 0's
        for cache in (k_cache, v_cache):
            cache[blocks - 3:] = cache[:3]
    else:
        for cache in (k_cache, v_cache):
            cache[rows - 1, :used + 1] = cache[0, :used + 1]
    q = torch.randn(1, 4, nheads, head_dim, device=dev, dtype=DTYPE).expand(2, -1, -1, -1)
    k_new, v_new = (torch.randn(1, 1, nheads_k, head_dim, device=dev, dtype=DTYPE)
                    .expand(2, -1, -1, -1).contiguous() for _ in range(2))
    cache_seqlens = torch.full((2,), used, dtype=torch.int32, device=dev)
    out, lse = flashtile.flash_attn_with_kvcache(
        q.contiguous(), k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
        cache_batch_idx=batch_idx, block_table=block_table, causal=True,
        return_softmax_lse=True)
    if paged:
        keys = k_cache[block_table.long()].flatten(1, 2)[:, :used + 1]
        values = v_cache[block_table.long()].flatten(1, 2)[:, :used + 1]
    else:
        keys = k_cache[batch_idx.long(), :used + 1]
        values = v_cache[batch_idx.long(), :used + 1]
    assert torch.equal(keys[1, used], k_new[1, 0]), "the append missed the cache's last rows"
    assert torch.equal(out[1], out[0]) and torch.equal(lse[1], lse[0]), (
        "the entry at the end of the cache differs from the same entry at its start")
    for b in range(2):
        qi, ki, vi = q[b:b + 1], keys[b:b + 1], values[b:b + 1]
        ref = reference_attention(qi, ki, vi, None, causal=True, dtype=F64)
        base = reference_attention(qi, ki, vi, None, causal=True)
        check_attention(f"entry {b}", dict(out=out[b:b + 1], lse=lse[b:b + 1]), ref, base,
                        DTYPE, fields=("out", "lse"))
