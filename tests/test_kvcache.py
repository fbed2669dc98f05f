"""flash_attn_with_kvcache against per-entry float64 references: in-place append, contiguous
and paged caches (pages shuffled, appends across page boundaries), cache_batch_idx, split-KV,
and the dense options (causal, window, softcap, ALiBi, GQA)."""

import pytest
import torch
from conftest import ON_GPU

import flashtile
from flashtile.kernels import configs
from flashtile.testing import check_attention, reference_attention

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
B, H, HK, D = 3, 4, 2, 32


def check_entries(q, keys, values, lengths, out, lse, dtype, **options):
    """Entry b attends to its first lengths[b] keys of keys[b], values[b] ((N, HK, D) each)."""
    for b, n in enumerate(lengths):
        qi, ki, vi = q[b:b + 1], keys[b][:n][None], values[b][:n][None]
        extra = dict(options)
        if extra.get("alibi_slopes") is not None:
            extra["alibi_slopes"] = extra["alibi_slopes"][b]
        ref = reference_attention(qi, ki, vi, None, dtype=torch.float64, **extra)
        base = reference_attention(qi, ki, vi, None, **extra)
        check_attention(f"entry {b}", dict(out=out[b:b + 1], lse=lse[b:b + 1]), ref, base,
                        dtype, fields=("out", "lse"))


CASES = [
    ("plain", {}, 1),
    ("causal", dict(causal=True), 1),
    ("causal_split3", dict(causal=True), 3),
    ("window_softcap", dict(window_size=(20, 0), softcap=5.0), 2),
    ("alibi", dict(alibi=True, causal=True), 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,options,splits", CASES, ids=[c[0] for c in CASES])
def test_contiguous_cache_with_append(name, options, splits, dtype, dev):
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(B, H, device=dev) * 0.3
    k_cache, v_cache = (torch.randn(5, 90, HK, D, device=dev, dtype=dtype) for _ in range(2))
    q = torch.randn(B, 4, H, D, device=dev, dtype=dtype)
    k_new, v_new = (torch.randn(B, 4, HK, D, device=dev, dtype=dtype) for _ in range(2))
    cache_seqlens = torch.tensor([10, 0, 70], dtype=torch.int32, device=dev)
    batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=dev)
    before = k_cache.clone()
    out, lse = flashtile.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
        cache_batch_idx=batch_idx, num_splits=splits, return_softmax_lse=True, **options)
    for b, (row, start) in enumerate(zip(batch_idx.tolist(), cache_seqlens.tolist())):
        assert torch.equal(k_cache[row, start:start + 4], k_new[b])
        assert torch.equal(v_cache[row, start:start + 4], v_new[b])
    untouched = torch.ones(5, 90, dtype=torch.bool, device=dev)
    for row, start in zip(batch_idx.tolist(), cache_seqlens.tolist()):
        untouched[row, start:start + 4] = False
    assert torch.equal(k_cache[untouched], before[untouched]), "the append wrote elsewhere"
    lengths = (cache_seqlens + 4).tolist()
    check_entries(q, k_cache[batch_idx.long()], v_cache[batch_idx.long()], lengths, out, lse,
                  dtype, **options)


@pytest.mark.parametrize("loads", ["tma", "gather"])
@pytest.mark.parametrize("page", [16, 48, 64])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_cache_across_page_boundaries(page, splits, loads, dev, monkeypatch):
    """Pages shuffled; every row that is not an entry's (the rest of its last page, pages no
    entry uses) holds NaN, so a read of one that is not masked shows. loads="tma": key blocks
    copied from their page through one descriptor over the pool, where the block size divides
    the page (the interpreter's 16 always does; on a GPU page 64); "gather": row by row."""
    monkeypatch.setitem(configs.features, "tma_paged", loads == "tma")
    dtype = torch.float16
    pages_per_entry, blocks = 6, 25
    k_pages, v_pages = (torch.full((blocks, page, HK, D), float("nan"), device=dev, dtype=dtype)
                        for _ in range(2))
    block_table = torch.randperm(blocks, device=dev)[:B * pages_per_entry].view(B, -1).int()
    q = torch.randn(B, 2, H, D, device=dev, dtype=dtype)
    k_new, v_new = (torch.randn(B, 5, HK, D, device=dev, dtype=dtype) for _ in range(2))
    # appends that start just before a page boundary, at 0, and near the end
    cache_seqlens = torch.tensor([page - 2, 0, pages_per_entry * page - 5], dtype=torch.int32,
                                 device=dev)
    for b, n in enumerate(cache_seqlens.tolist()):  # the entries' cached rows, through the table
        rows = torch.arange(n, device=dev)
        pages = block_table[b, rows // page].long()
        for cache in (k_pages, v_pages):
            cache[pages, rows % page] = torch.randn(n, HK, D, device=dev, dtype=dtype)
    out, lse = flashtile.flash_attn_with_kvcache(
        q, k_pages, v_pages, k_new, v_new, cache_seqlens=cache_seqlens, block_table=block_table,
        causal=True, num_splits=splits, return_softmax_lse=True)
    logical_k = k_pages[block_table.long()].reshape(B, -1, HK, D)
    logical_v = v_pages[block_table.long()].reshape(B, -1, HK, D)
    for b, start in enumerate(cache_seqlens.tolist()):
        assert torch.equal(logical_k[b, start:start + 5], k_new[b])
    check_entries(q, logical_k, logical_v, (cache_seqlens + 5).tolist(), out, lse, dtype,
                  causal=True)


@pytest.mark.parametrize("heads,heads_k,seqlen_q,splits", [
    (3, 3, 2, 2),   # multi-head: one program per query head
    (8, 1, 1, 3),   # decoding one token, MQA: the 8 heads are one program's rows
    (12, 2, 3, 1),  # a group of 6 heads x 3 queries: rows cross a 16-row block
])
def test_grouped_heads_share_one_read(heads, heads_k, seqlen_q, splits, dev):
    """Each group's query heads are packed into one program's rows (PACK_GQA), so that a kv
    head is read once for all of them: every (query, head) row must land in its place."""
    dtype = torch.float16
    k_cache, v_cache = (torch.randn(2, 80, heads_k, D, device=dev, dtype=dtype)
                        for _ in range(2))
    q = torch.randn(2, seqlen_q, heads, D, device=dev, dtype=dtype)
    slopes = torch.rand(heads, device=dev) * 0.3
    lengths = torch.tensor([77, 9], dtype=torch.int32, device=dev)
    out, lse = flashtile.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lengths, causal=True, alibi_slopes=slopes,
        num_splits=splits, return_softmax_lse=True)
    check_entries(q, k_cache, v_cache, lengths.tolist(), out, lse, dtype, causal=True,
                  alibi_slopes=slopes[None].expand(2, heads))


def test_no_append_int_seqlens_and_empty_entries(dev):
    k_cache, v_cache = (torch.randn(B, 40, HK, D, device=dev) for _ in range(2))
    q = torch.randn(B, 3, H, D, device=dev)
    out, lse = flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=33,
                                                 return_softmax_lse=True)
    check_entries(q, k_cache, v_cache, [33] * B, out, lse, torch.float32)
    empty = torch.tensor([0, 5, 0], dtype=torch.int32, device=dev)
    out, lse = flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=empty,
                                                 return_softmax_lse=True, num_splits=2)
    assert bool((out[0] == 0).all()) and bool((lse[0] == float("-inf")).all())
    check_entries(q[1:2], k_cache[1:2], v_cache[1:2], [5], out[1:2], lse[1:2], torch.float32)


def _args(dev, **over):
    args = dict(q=torch.randn(2, 1, 4, 16, device=dev, dtype=torch.float16),
                k_cache=torch.randn(2, 32, 2, 16, device=dev, dtype=torch.float16),
                v_cache=torch.randn(2, 32, 2, 16, device=dev, dtype=torch.float16))
    args.update({k: (f(dev) if callable(f) else f) for k, f in over.items()})
    return args


def i32(values):
    return lambda dev: torch.tensor(values, dtype=torch.int32, device=dev)


@pytest.mark.parametrize("over,exc,match", [
    (dict(cache_seqlens=i32([30, 40])), ValueError, r"must lie in \[0, 32\]"),
    (dict(cache_seqlens=lambda dev: torch.tensor([1, 2], device=dev)), ValueError,
     r"cache_seqlens must be an int32 tensor of shape \(2,\)"),
    (dict(k=lambda dev: torch.randn(2, 3, 2, 16, device=dev, dtype=torch.float16)),
     ValueError, r"k and v must be given together"),
    (dict(block_table=i32([[0], [1]]), k_cache=lambda dev: torch.randn(
        4, 24, 2, 16, device=dev, dtype=torch.float16), v_cache=lambda dev: torch.randn(
        4, 24, 2, 16, device=dev, dtype=torch.float16)), ValueError,
     r"page size \(k_cache.shape\[1\]\) must be a multiple of 16, got 24"),
    (dict(num_splits=-1), ValueError, r"num_splits must be an int >= 0"),
    (dict(k_cache=lambda dev: torch.randn(1, 32, 2, 16, device=dev, dtype=torch.float16),
          v_cache=lambda dev: torch.randn(1, 32, 2, 16, device=dev, dtype=torch.float16)),
     ValueError, r"k_cache has 1 rows but q has batch 2: without cache_batch_idx"),
    (dict(q=lambda dev: torch.randn(2, 1, 3, 16, device=dev, dtype=torch.float16)), ValueError,
     r"q has 3 heads, which is not a multiple of k_cache's 2"),
], ids=["overflow", "int64_seqlens", "k_without_v", "page_24", "splits_negative",
        "cache_rows_under_batch", "heads"])
def test_bad_input_is_named(over, exc, match, dev):
    with pytest.raises(exc, match=match):
        flashtile.flash_attn_with_kvcache(**_args(dev, **over))


@pytest.mark.parametrize("programs,longest,sms,splits", [
    (32, 16384, 132, 8),      # B 8 x 16k, 4 kv heads: 256 programs, not 288 (9 splits)
    (32, 131072, 132, 8),
    (4, 16384, 132, 64),      # B 1: the 64-split cap
    (4, 1024, 132, 4),        # short caches: chunks of at least 256 keys
    (100, 16384, 132, 2),
    (131, 16384, 132, 2),
    (132, 16384, 132, 1),     # enough programs: no split
    (256, 16384, 132, 1),
])
def test_split_count_keeps_every_program_resident(programs, longest, sms, splits):
    """num_splits=0 chooses at most two programs per SM, so none waits for a second round."""
    from flashtile.interface import split_count

    assert split_count(programs, longest, sms) == splits
    assert programs * splits <= max(programs, 2 * sms)
