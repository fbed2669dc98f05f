"""Mask predicates (flashtile/masks.py) and their block maps (flashtile/kernels/blockmap.py).

- The ready-made masks' dense keep matrices against hand-written torch expressions.
- flash_attn_func(..., mask_mod=...) against the float64 reference given that keep matrix as
  `mask`, by FlashAttention's rule (flashtile/testing.py): out, lse, dq, dk, dv; alone and with
  causal, windows, grouped-query heads, ALiBi, softcap and dropout; with a user predicate that
  depends on the batch entry and the head, and one that leaves whole rows empty.
- The block lists the kernels walk: each map tile's state (empty / partial / full) against the
  keep matrix aggregated per tile, the lists' contents and order, and their caching.
- return_attn_probs with a mask, and the errors of bad mask data.

Under the interpreter the map block is 32, so lengths such as 45, 70 and 100 leave ragged tiles,
and the documents below have boundaries inside tiles.
"""

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs tl visible to a @triton.jit)
from conftest import ON_GPU

import flashtile
from flashtile import masks
from flashtile.kernels import blockmap
from flashtile.kernels.params import AttnOptions
from flashtile.testing import (
    assert_close,
    check_attention,
    random_qkv,
    reference_attention,
    run_flashtile,
    tolerance,
)

F64 = torch.float64
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# The predicate alone: no causal/window, top-left diagonal (only bounds are ANDed with it).
PLAIN = AttnOptions(softmax_scale=1.0, diag_offset=0)


def dense(mask, batch, nheads, seqlen_q, seqlen_k, dev, opts=PLAIN) -> torch.Tensor:
    return blockmap.dense_keep(mask, batch, nheads, seqlen_q, seqlen_k, opts, dev)


def grid(seqlen_q, seqlen_k, dev):
    """Index tiles i (Nq, 1) and j (1, Nk)."""
    return (torch.arange(seqlen_q, device=dev)[:, None],
            torch.arange(seqlen_k, device=dev)[None, :])


def doc_ids_from_lengths(lengths, dev) -> torch.Tensor:
    """(sum(lengths),) int64: document d repeated lengths[d] times."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=dev),
                                   torch.tensor(lengths, device=dev))


def random_doc_ids(batch, seqlen, dev) -> torch.Tensor:
    """(batch, seqlen) ids of 2 to 5 documents of random lengths (boundaries anywhere)."""
    rows = []
    for _ in range(batch):
        ndocs = int(torch.randint(2, 6, ()))
        cuts = torch.randperm(seqlen - 1)[: ndocs - 1] + 1
        starts = torch.zeros(seqlen, dtype=torch.int64)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows).to(dev)


# Five documents of 100 tokens, boundaries at 13, 40, 47 and 90: all inside 32-token map tiles
# (tiles 0, 1, 1, 2), one document (40..46) shorter than a tile.
DOCS_100 = [13, 27, 7, 43, 10]


@triton.jit
def per_head_mask(b, h, q_idx, kv_idx):
    """Depends on the head; key 0 is always kept, so no row is empty."""
    return ((q_idx + h) % 3 != 0) | (kv_idx == 0)


@triton.jit
def empty_rows_mask(b, h, q_idx, kv_idx):
    """Depends on batch and head; rows with q_idx % 7 == h are empty."""
    return (q_idx % 7 != h) & ((kv_idx + b) % 2 == 0)


def per_head_keep(batch, nheads, seqlen_q, seqlen_k, dev):
    i, j = grid(seqlen_q, seqlen_k, dev)
    h = torch.arange(nheads, device=dev)[:, None, None]
    keep = ((i + h) % 3 != 0) | (j == 0)
    return keep.expand(batch, nheads, seqlen_q, seqlen_k)


def empty_rows_keep(batch, nheads, seqlen_q, seqlen_k, dev):
    i, j = grid(seqlen_q, seqlen_k, dev)
    b = torch.arange(batch, device=dev)[:, None, None, None]
    h = torch.arange(nheads, device=dev)[None, :, None, None]
    return (i % 7 != h) & ((j + b) % 2 == 0)


# -- 1. dense keep matrices of the ready-made masks ----------------------------------------------


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(45, 70), (70, 45), (33, 33)])
def test_dense_keep_causal_window_prefix(seqlen_q, seqlen_k, dev):
    batch, nheads = 2, 2
    i, j = grid(seqlen_q, seqlen_k, dev)
    expected = {
        "causal": (masks.causal(), j <= i),
        "window0": (masks.sliding_window(0), (j <= i) & (i - j <= 0)),
        "window5": (masks.sliding_window(5), (j <= i) & (i - j <= 5)),
        "window40": (masks.sliding_window(40), (j <= i) & (i - j <= 40)),
        "prefix_int": (masks.prefix_lm(20, device=dev), (j <= i) | (j < 20)),
    }
    prefix = torch.tensor([3, 50], device=dev)
    expected["prefix_tensor"] = (
        masks.prefix_lm(prefix), (j <= i) | (j < prefix[:, None, None, None]))
    for name, (mask, keep) in expected.items():
        keep = keep.expand(batch, nheads, seqlen_q, seqlen_k)
        got = dense(mask, batch, nheads, seqlen_q, seqlen_k, dev)
        assert got.dtype == torch.bool and got.shape == keep.shape
        assert torch.equal(got, keep), f"{name} {seqlen_q}x{seqlen_k}: dense keep differs"


@pytest.mark.parametrize("seqlen", [100, 33])
def test_dense_keep_document(seqlen, dev):
    batch, nheads = 2, 2
    shared = (doc_ids_from_lengths(DOCS_100, dev) if seqlen == 100
              else random_doc_ids(1, seqlen, dev)[0])
    per_batch = random_doc_ids(batch, seqlen, dev)
    per_batch[1] = per_batch[1].flip(0) * 7 % 5  # not sorted, ids that repeat non-adjacently
    for name, ids in (("1-D", shared), ("2-D", per_batch), ("1-D int32", shared.int())):
        doc = ids.expand(batch, seqlen)
        keep = (doc[:, None, :, None] == doc[:, None, None, :]).expand(batch, nheads, -1, -1)
        got = dense(masks.document(ids), batch, nheads, seqlen, seqlen, dev)
        assert torch.equal(got, keep), f"document {name}: dense keep differs"


def test_dense_keep_user_predicates(dev):
    batch, nheads, seqlen_q, seqlen_k = 2, 3, 40, 50
    for fn, keep in ((per_head_mask, per_head_keep), (empty_rows_mask, empty_rows_keep)):
        got = dense(masks.as_mask_mod(fn), batch, nheads, seqlen_q, seqlen_k, dev)
        assert torch.equal(got, keep(batch, nheads, seqlen_q, seqlen_k, dev)), fn.__name__


def test_dense_keep_ands_causal_and_window(dev):
    """dense_keep is the whole visibility rule: with options, the mask AND causal/window."""
    seqlen_q, seqlen_k, diag = 40, 70, 30
    i, j = grid(seqlen_q, seqlen_k, dev)
    prefix = masks.prefix_lm(10, device=dev)
    opts = AttnOptions(softmax_scale=1.0, diag_offset=diag, window_left=20, window_right=0)
    got = dense(prefix, 1, 1, seqlen_q, seqlen_k, dev, opts)
    keep = ((j <= i) | (j < 10)) & (j <= i + diag) & (j >= i + diag - 20)
    assert torch.equal(got[0, 0], keep)


# -- 2. flash_attn_func with masks against the reference -----------------------------------------


def make_mask(spec, batch, seqlen, dev):
    """A MaskMod or bare predicate from a case's spec."""
    kind, *arg = spec
    if kind == "causal":
        return masks.causal()
    if kind == "window":
        return masks.sliding_window(arg[0], device=dev)
    if kind == "doc1d":
        return masks.document(doc_ids_from_lengths(DOCS_100, dev)[:seqlen])
    if kind == "doc2d":
        return masks.document(random_doc_ids(batch, seqlen, dev))
    if kind == "prefix":
        value = arg[0]
        return (masks.prefix_lm(value, device=dev) if isinstance(value, int)
                else masks.prefix_lm(torch.tensor(value, device=dev)))
    return {"per_head": per_head_mask, "empty_rows": empty_rows_mask}[kind]


def alibi_slopes(batch, nheads, dev):
    return 0.05 + 0.95 * torch.rand(batch, nheads, device=dev)


def make_inputs(dtype, dev, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, spec,
                features, qk_scale=1.0, requires_grad=True):
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, dev,
                         requires_grad=False, nheads_k=nheads_k)
    q, k = q * qk_scale, k * qk_scale
    kw = dict(features)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(batch, nheads, dev)
    mask = make_mask(spec, batch, seqlen_q, dev)
    keep = dense(masks.as_mask_mod(mask), batch, nheads, seqlen_q, seqlen_k, dev)
    return (*(t.requires_grad_(requires_grad) for t in (q, k, v)), mask, keep, kw)


def reference64(q, k, v, dout, **kwargs):
    """The float64 reference with float64 gradients. reference_attention(..., dtype=F64) on
    float16 inputs returns dq, dk, dv rounded to float16 (autograd casts a gradient to its
    leaf's dtype), half a unit off already; where a gradient is large (key 0 of per_head_mask
    collects whole rows), that and the kernel's own rounding differ by a unit, over the floor."""
    return reference_attention(*(t.double() for t in (q, k, v, dout)), dtype=F64, **kwargs)


def case_id(case) -> str:
    return case[0]


# (id, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, mask spec, features, qk_scale)
MASK_CASES = [
    ("causal_mask-45x70", 1, 45, 70, 2, 2, 32, ("causal",), {}, 1.0),
    # the top-left causal mask AND bottom-right causal=True: the first 25 rows see nothing
    ("causal_mask+causal-70x45", 1, 70, 45, 2, 2, 16, ("causal",), dict(causal=True), 1.0),
    ("sliding_window(16)+gqa4:2-75", 1, 75, 75, 4, 2, 16, ("window", 16), {}, 1.0),
    ("document_1d-100", 2, 100, 100, 2, 2, 16, ("doc1d",), {}, 1.0),
    ("document_2d+causal+mqa2:1-70", 2, 70, 70, 2, 1, 32, ("doc2d",), dict(causal=True), 1.0),
    ("document_1d+window(20,5)+alibi-50", 1, 50, 50, 2, 2, 16, ("doc1d",),
     dict(window_size=(20, 5), alibi=True), 1.0),
    ("prefix_lm(20)+softcap5-qk_x3-60", 1, 60, 60, 2, 2, 32, ("prefix", 20),
     dict(softcap=5.0), 3.0),
    ("prefix_lm([5,50])+alibi-45x70", 2, 45, 70, 2, 2, 16, ("prefix", [5, 50]),
     dict(alibi=True), 1.0),
    ("per_head+gqa4:2-50x75", 1, 50, 75, 4, 2, 16, ("per_head",), {}, 1.0),
    ("empty_rows+causal-60", 2, 60, 60, 3, 3, 16, ("empty_rows",), dict(causal=True), 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MASK_CASES, ids=case_id)
def test_mask_matches_reference(case, dtype, dev):
    name, *shape, spec, features, qk_scale = case
    q, k, v, mask, keep, kw = make_inputs(dtype, dev, *shape, spec, features, qk_scale)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, mask_mod=mask, **kw)
    ref = reference64(q, k, v, dout, mask=keep, **kw)
    base = reference_attention(q, k, v, dout, mask=keep, **kw)
    check_attention(name, got, ref, base, dtype)


def test_empty_rows_give_zeros(dev):
    """Rows the predicate leaves empty: out 0, lse -inf, dq 0, and no NaN anywhere."""
    batch, seqlen, nheads = 2, 40, 3
    q, k, v = random_qkv(batch, seqlen, seqlen, nheads, 16, torch.float16, dev)
    got = run_flashtile(q, k, v, torch.randn_like(q), mask_mod=empty_rows_mask)
    i = torch.arange(seqlen, device=dev)
    empty = i[None, :] % 7 == torch.arange(nheads, device=dev)[:, None]  # (H, Nq)
    assert bool(empty.any()) and not bool(empty.all())
    for field in ("out", "lse", "dq", "dk", "dv"):
        assert not bool(got[field].isnan().any()), f"NaN in {field}"
    rows = empty[None].expand(batch, -1, -1)  # (B, H, Nq)
    assert bool((got["lse"][rows] == float("-inf")).all())
    assert bool(torch.isfinite(got["lse"][~rows]).all())
    for field in ("out", "dq"):
        assert bool((got[field].transpose(1, 2)[rows] == 0).all()), f"{field} of empty rows"


P_DROP = 0.3
DROPOUT_CASES = [
    ("dropout+document_1d-100", 1, 100, 100, 2, 2, 16, ("doc1d",), {}, 1.0),
    ("dropout+prefix_lm([8,30])+gqa4:2-causal-45x60", 2, 45, 60, 4, 2, 16, ("prefix", [8, 30]),
     dict(causal=True), 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=case_id)
def test_mask_with_dropout_matches_reference(case, dtype, dev):
    """The dropout keep matrix read off the returned probs (same seed, same pattern). Every row
    keeps several keys: with dropout, a row of one key puts the whole rounding error of its
    float16 out into dS through Delta = rowsum(dO · out), beyond the tolerance rule, with or
    without a mask (window_size=(0, 0) shows it too), so such rows are left out here."""
    name, *shape, spec, features, qk_scale = case
    q, k, v, mask, keep, kw = make_inputs(dtype, dev, *shape, spec, features, qk_scale)
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    with torch.no_grad():
        _, _, probs = flashtile.flash_attn_func(q, k, v, dropout_p=P_DROP, mask_mod=mask,
                                                return_attn_probs=True, **kw)
    assert bool((probs[~keep] == 0).all())
    dout = torch.randn_like(q)
    torch.manual_seed(seed)
    got = run_flashtile(q, k, v, dout, dropout_p=P_DROP, mask_mod=mask, **kw)
    drop = dict(dropout_p=P_DROP, dropout_keep=probs != 0, mask=keep, **kw)
    ref = reference64(q, k, v, dout, **drop)
    base = reference_attention(q, k, v, dout, **drop)
    check_attention(name, got, ref, base, dtype)


# -- 3. block maps ------------------------------------------------------------------------------


def expected_states(keep: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, R, C) tile states of a (B, H, Nq, Nk) keep matrix: 0 none kept, 1 some, 2 all
    size × size pairs kept (pairs out of bounds are not kept, so a ragged tile is never full)."""
    b, h, nq, nk = keep.shape
    rows, cols = triton.cdiv(nq, size), triton.cdiv(nk, size)
    padded = torch.zeros(b, h, rows * size, cols * size, dtype=torch.int64, device=keep.device)
    padded[..., :nq, :nk] = keep.long()
    kept = padded.view(b, h, rows, size, cols, size).sum((3, 5))
    return torch.where(kept == 0, 0, torch.where(kept == size * size, 2, 1))


def states_from_lists(lists: torch.Tensor, ncols: int) -> torch.Tensor:
    """(..., R, 2, 1 + C) lists -> (..., R, C) states; checks each list's count and order and
    that no tile is listed twice."""
    *lead, rows, kinds, width = lists.shape
    assert kinds == 2 and width == 1 + ncols and lists.dtype == torch.int32
    flat = lists.reshape(-1, 2, width).cpu()
    states = torch.zeros(flat.shape[0], ncols, dtype=torch.int64)
    for r in range(flat.shape[0]):
        for kind, state in ((0, 2), (1, 1)):
            count = int(flat[r, kind, 0])
            assert 0 <= count <= ncols
            cols = flat[r, kind, 1:1 + count]
            assert bool((cols[1:] > cols[:-1]).all()), f"list {r} kind {kind} not ascending"
            assert bool(((cols >= 0) & (cols < ncols)).all())
            assert bool((states[r, cols] == 0).all()), f"list {r}: a tile listed twice"
            states[r, cols] = state
    return states.reshape(*lead, rows, ncols)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_block_lists_classify_tiles(causal, dev):
    batch, nheads, seqlen = 2, 3, 100
    ids = torch.stack([doc_ids_from_lengths([30, 70], dev),
                       doc_ids_from_lengths(DOCS_100, dev)])
    mask = masks.document(ids)
    opts = AttnOptions(softmax_scale=1.0, diag_offset=0, window_right=0 if causal else -1)
    lists = blockmap.block_lists(mask, batch, nheads, seqlen, seqlen, opts, dev)
    size = lists.map_block
    assert size == blockmap.map_block_size()
    tiles = triton.cdiv(seqlen, size)
    # document masks depend on the batch entry, not on the head: one map serves every head
    assert lists.kv.shape == (batch, 1, tiles, 2, 1 + tiles)
    assert lists.q.shape == (batch, 1, tiles, 2, 1 + tiles)
    keep = dense(mask, batch, 1, seqlen, seqlen, dev, opts)
    expected = expected_states(keep, size)
    assert torch.equal(states_from_lists(lists.kv, tiles), expected.cpu())
    assert torch.equal(states_from_lists(lists.q, tiles), expected.transpose(-1, -2).cpu())
    if size == 32:  # the interpreter's map blocks; on a GPU (128) 100 tokens are one tile
        # the shapes of interest occur: empty tiles (skipped: in no list), partial and full ones
        for state in (0, 1, 2):
            assert bool((expected == state).any()), f"no tile in state {state}"
        # batch 1, tile (0, 2): queries of documents 0, 1 and keys of documents 3, 4: empty, so
        # neither query block 0's key lists nor key block 2's query lists hold it
        assert expected[1, 0, 0, 2] == 0
        kv, q = lists.kv[1, 0, 0].cpu(), lists.q[1, 0, 2].cpu()
        assert 2 not in kv[0, 1:1 + kv[0, 0]].tolist() + kv[1, 1:1 + kv[1, 0]].tolist()
        assert 0 not in q[0, 1:1 + q[0, 0]].tolist() + q[1, 1:1 + q[1, 0]].tolist()
        # batch 0, tile (2, 1): queries 64-95 and keys 32-63, all of document 1: full
        assert expected[0, 0, 2, 1] == 2


def test_block_lists_per_head_and_cached(dev, monkeypatch):
    """A bare predicate's map has one entry per batch entry and head; the lists are built once
    per mask and shape, and a second call reuses them (no map launch, the same object)."""
    launches = []
    launch = blockmap._launch

    def counting_launch(*args, **kwargs):
        launches.append(kwargs.get("dense", args[-1]))
        return launch(*args, **kwargs)

    monkeypatch.setattr(blockmap, "_launch", counting_launch)
    batch, nheads, seqlen_q, seqlen_k = 2, 2, 45, 70
    mask = masks.MaskMod(per_head_mask)
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, 16, torch.float16, dev,
                         requires_grad=False)
    out = flashtile.flash_attn_func(q, k, v, mask_mod=mask)
    assert launches == [False] and len(mask._maps) == 1
    lists = next(iter(mask._maps.values()))
    assert lists.kv.shape[:2] == (batch, nheads)
    opts = AttnOptions(softmax_scale=1.0, diag_offset=seqlen_k - seqlen_q)
    assert blockmap.block_lists(mask, batch, nheads, seqlen_q, seqlen_k, opts, dev) is lists
    keep = dense(mask, batch, nheads, seqlen_q, seqlen_k, dev, opts)
    tiles_k = triton.cdiv(seqlen_k, lists.map_block)
    assert torch.equal(states_from_lists(lists.kv, tiles_k),
                       expected_states(keep, lists.map_block).cpu())
    launches.clear()
    again = flashtile.flash_attn_func(q, k, v, mask_mod=mask)
    assert launches == [] and len(mask._maps) == 1
    assert next(iter(mask._maps.values())) is lists
    assert torch.equal(again, out)
    # another shape (or causal) gets its own lists
    flashtile.flash_attn_func(q, k, v, mask_mod=mask, causal=True)
    assert launches == [False] and len(mask._maps) == 2


# -- 4. return_attn_probs -----------------------------------------------------------------------

PROBS_CASES = [
    ("document_2d-70", 2, 70, 70, 2, 2, 16, ("doc2d",), {}, 1.0),
    ("per_head+gqa4:2+window(10,10)-50x75", 1, 50, 75, 4, 2, 16, ("per_head",),
     dict(window_size=(10, 10)), 1.0),
    ("empty_rows+softcap5+alibi-qk_x3-45", 2, 45, 45, 3, 3, 16, ("empty_rows",),
     dict(softcap=5.0, alibi=True), 3.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PROBS_CASES, ids=case_id)
def test_return_attn_probs_with_mask(case, dtype, dev):
    name, *shape, spec, features, qk_scale = case
    q, k, v, mask, keep, kw = make_inputs(dtype, dev, *shape, spec, features, qk_scale,
                                          requires_grad=False)
    out, lse, probs = flashtile.flash_attn_func(q, k, v, mask_mod=mask, return_attn_probs=True,
                                                **kw)
    assert probs.shape == keep.shape and probs.dtype == torch.float32
    assert bool((probs[~keep] == 0).all()), "probs must be exactly 0 where the mask drops"
    ref = reference_attention(q, k, v, dtype=F64, mask=keep, return_probs=True, **kw)
    base = reference_attention(q, k, v, mask=keep, return_probs=True, **kw)
    check_attention(name, dict(out=out, lse=lse, probs=probs), ref, base, dtype,
                    fields=("out", "lse", "probs"))
    V = v.double().transpose(1, 2)
    V = V.repeat_interleave(probs.shape[1] // V.shape[1], dim=1)
    pv = (probs.double() @ V).transpose(1, 2)
    assert_close(f"{name} out vs probs @ v", out, pv, tolerance(ref.out, base.out, dtype))


# -- 5. errors ----------------------------------------------------------------------------------


def test_mask_errors(dev):
    q, k, v = random_qkv(2, 60, 60, 2, 16, torch.float16, dev, requires_grad=False)

    def call(mask, q=q, k=k, v=v):
        return flashtile.flash_attn_func(q, k, v, mask_mod=mask)

    with pytest.raises(ValueError, match="document mask: doc_ids has 50 tokens"):
        call(masks.document(torch.zeros(50, dtype=torch.int64, device=dev)))
    with pytest.raises(ValueError, match="document mask: doc_ids has 60 tokens but seqlen_q "
                                         "is 60 and seqlen_k 61"):
        k1, v1 = (torch.randn(2, 61, 2, 16, dtype=torch.float16, device=dev) for _ in "kv")
        call(masks.document(torch.zeros(60, dtype=torch.int64, device=dev)), k=k1, v=v1)
    with pytest.raises(ValueError, match="document mask: doc_ids has batch 3, q has 2"):
        call(masks.document(torch.zeros(3, 60, dtype=torch.int64, device=dev)))
    with pytest.raises(ValueError,
                       match="prefix_lm mask: prefix_lengths has 3 entries, q has batch 2"):
        call(masks.prefix_lm(torch.tensor([1, 2, 3], device=dev)))

    def not_jit(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    with pytest.raises(TypeError, match="mask_mod must be a @triton.jit function"):
        call(not_jit)
    with pytest.raises(TypeError, match="mask_mod must be a @triton.jit function"):
        masks.MaskMod(not_jit)
    meta = torch.zeros(1, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=f"mask_mod's data is on meta but q is on {q.device}"):
        call(masks.MaskMod(masks._sliding_window, meta, per_batch=False, per_head=False))
    with pytest.raises(ValueError, match="mask_mod's data is on meta"):
        call(masks.prefix_lm(3, device="meta"))
    # bad arguments to the constructors
    with pytest.raises(TypeError, match="doc_ids must be an integer"):
        masks.document(torch.zeros(60))
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        masks.document(torch.zeros(1, 2, 60, dtype=torch.int64))
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        masks.sliding_window(-1)
    with pytest.raises(TypeError, match="prefix_lengths must be an int or a"):
        masks.prefix_lm(torch.zeros(2, 2, dtype=torch.int64))
