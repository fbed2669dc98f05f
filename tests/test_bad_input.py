"""Bad input to every public function: one table of calls, each of which must raise an exception
that names the argument and what was expected, before any kernel is launched.

The table holds the hardening issue's cases for every function: tensors on different devices,
cu_seqlens that are not monotone or do not match the packed length, a block_table that points
outside the paged cache (and a cache_batch_idx that points outside the cache), plus what else each
function checks first. test_interface.py, test_varlen.py and test_kvcache.py keep their own
tables of dtype, shape and option errors; the cases here are not repeated there.

Two of the issue's cases are not bad input, and are tested as correct results instead:

- a non-contiguous last dimension (q[..., ::2]): every function reads its tensors through their
  strides, so such views are valid inputs (flash_attn_func's are in test_attention.py's
  test_any_strides; the other functions' are here);
- requires_grad on some inputs but not others (LoRA fine-tuning freezes some of them): as in
  FlashAttention, the inputs that require a gradient get the correct one, the others none.

"Another device" is the meta device on the CPU and the CPU on a GPU machine. Launches are
intercepted where every public function reaches the kernels: flashtile.interface's
attention_forward, attention_backward and attention_probs (flash_attn_func and SDPA reach them
through the flashtile::fwd / flashtile::bwd custom ops of flashtile/ops.py, whose
implementations call interface._forward and interface._backward; ring attention through
distributed/blocks.py, which calls the same two).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs tl visible to a @triton.jit)
from conftest import ON_GPU

import flashtile
import flashtile.distributed as fd
import flashtile.interface as interface
from flashtile import masks
from flashtile.testing import assert_close, reference_attention, tolerance

OTHER_DEVICE = "cpu" if ON_GPU else "meta"
F16 = torch.float16


def _randn(dev, *shape, dtype=F16):
    return torch.randn(*shape, device=dev, dtype=dtype)


def _i32(values, dev):
    return torch.tensor(values, dtype=torch.int32, device=dev)


# Each public function's valid call, as keyword arguments built on dev. Sizes: batch 2, query
# head dim 16; varlen sequences of 5 + 7 queries and 5 + 9 keys; a paged cache of 4 pages of 16.
def _fa_args(dev):
    return dict(q=_randn(dev, 2, 10, 4, 16), k=_randn(dev, 2, 12, 4, 16),
                v=_randn(dev, 2, 12, 4, 16))


def _varlen_args(dev):
    return dict(q=_randn(dev, 12, 2, 16), k=_randn(dev, 14, 2, 16), v=_randn(dev, 14, 2, 16),
                cu_seqlens_q=_i32([0, 5, 12], dev), cu_seqlens_k=_i32([0, 5, 14], dev),
                max_seqlen_q=7, max_seqlen_k=9)


def _kvcache_args(dev):
    return dict(q=_randn(dev, 2, 1, 4, 16), k_cache=_randn(dev, 2, 32, 2, 16),
                v_cache=_randn(dev, 2, 32, 2, 16), cache_seqlens=_i32([5, 20], dev))


def _paged_args(dev):
    return dict(q=_randn(dev, 2, 1, 4, 16), k_cache=_randn(dev, 4, 16, 2, 16),
                v_cache=_randn(dev, 4, 16, 2, 16), cache_seqlens=_i32([5, 20], dev),
                block_table=_i32([[0, 1], [2, 3]], dev))


def _sdpa_args(dev):
    return dict(query=_randn(dev, 2, 4, 10, 16), key=_randn(dev, 2, 4, 12, 16),
                value=_randn(dev, 2, 4, 12, 16))


def _ring_args(dev):
    return dict(q=_randn(dev, 1, 8, 2, 16), k=_randn(dev, 1, 8, 2, 16),
                v=_randn(dev, 1, 8, 2, 16))


FUNCTIONS = {
    "flash_attn_func": (flashtile.flash_attn_func, _fa_args),
    "flash_attn_varlen_func": (flashtile.flash_attn_varlen_func, _varlen_args),
    "flash_attn_with_kvcache": (flashtile.flash_attn_with_kvcache, _kvcache_args),
    "flash_attn_with_kvcache(paged)": (flashtile.flash_attn_with_kvcache, _paged_args),
    "scaled_dot_product_attention": (flashtile.scaled_dot_product_attention, _sdpa_args),
    "ring_flash_attn_func": (fd.ring_flash_attn_func, _ring_args),
}


def elsewhere(name):
    """The argument `name` of the valid call, moved to another device."""
    return lambda args, dev: args[name].to(OTHER_DEVICE)


def i32(values):
    return lambda args, dev: _i32(values, dev)


def appending(seqlen_new):
    """New keys and values (batch 2, seqlen_new, 2 kv heads, 16), appended to the cache."""
    return dict(k=lambda args, dev: _randn(dev, 2, seqlen_new, 2, 16),
                v=lambda args, dev: _randn(dev, 2, seqlen_new, 2, 16))


@triton.jit
def _keep_all(b, h, q_idx, kv_idx):
    return (q_idx >= 0) & (kv_idx >= 0)


def shaped(*names, shape):
    """The arguments `names`, each a fresh random tensor of `shape`."""
    return dict.fromkeys(names, lambda args, dev: _randn(dev, *shape))


def rows_past_2_31(batch, nheads, head_dim):
    """A (batch, 2, nheads, head_dim) view whose two rows lie 2^31 elements apart (batch
    entries overlap): one sequence spanning more than 2^31 elements. Its storage is never
    touched (on the CPU the pages are not even mapped in)."""
    def make(args, dev):
        storage = torch.empty(2**31 + batch * 64 + nheads * head_dim, device=dev, dtype=F16)
        return storage.as_strided((batch, 2, nheads, head_dim), (64, 2**31, head_dim, 1))
    return make


def case(id, function, exc, match, marks=(), **over):
    """One bad call: `function`'s valid call with the arguments in `over` replaced (a callable
    (args, dev) -> value builds one from the valid arguments)."""
    return pytest.param(function, over, exc, match, id=f"{function}-{id}", marks=marks)


BAD_CALLS = [
    # -- tensors on different devices: every tensor argument of every function -----------------
    case("v_elsewhere", "flash_attn_func", ValueError,
         r"v is on \S+ but q is on \S+; all inputs must be on one device", v=elsewhere("v")),
    case("alibi_elsewhere", "flash_attn_func", ValueError,
         r"alibi_slopes is on \S+ but q is on \S+",
         alibi_slopes=lambda args, dev: torch.ones(4, device=OTHER_DEVICE)),
    case("mask_data_on_meta", "flash_attn_func", ValueError,
         r"mask_mod's data is on meta but q is on \S+",
         k=lambda args, dev: _randn(dev, 2, 10, 4, 16),
         v=lambda args, dev: _randn(dev, 2, 10, 4, 16),
         mask_mod=lambda args, dev: masks.document(torch.zeros(10, dtype=torch.int32,
                                                               device="meta"))),
    case("k_elsewhere", "flash_attn_varlen_func", ValueError,
         r"k is on \S+ but q is on \S+; all inputs must be on one device", k=elsewhere("k")),
    case("cu_seqlens_q_elsewhere", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_q is on \S+ but q is on \S+", cu_seqlens_q=elsewhere("cu_seqlens_q")),
    case("cu_seqlens_k_elsewhere", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_k is on \S+ but q is on \S+", cu_seqlens_k=elsewhere("cu_seqlens_k")),
    case("k_cache_elsewhere", "flash_attn_with_kvcache", ValueError,
         r"k_cache is on \S+ but q is on \S+", k_cache=elsewhere("k_cache"),
         v_cache=elsewhere("v_cache")),
    case("v_cache_elsewhere", "flash_attn_with_kvcache", ValueError,
         r"v_cache is on \S+ but q is on \S+", v_cache=elsewhere("v_cache")),
    case("cache_seqlens_elsewhere", "flash_attn_with_kvcache", ValueError,
         r"cache_seqlens is on \S+ but q is on \S+", cache_seqlens=elsewhere("cache_seqlens")),
    case("cache_batch_idx_elsewhere", "flash_attn_with_kvcache", ValueError,
         r"cache_batch_idx is on \S+ but q is on \S+",
         cache_batch_idx=lambda args, dev: _i32([1, 0], OTHER_DEVICE)),
    case("new_k_v_elsewhere", "flash_attn_with_kvcache", ValueError,
         r"k is on \S+ but q is on \S+",
         k=lambda args, dev: _randn(OTHER_DEVICE, 2, 3, 2, 16),
         v=lambda args, dev: _randn(OTHER_DEVICE, 2, 3, 2, 16)),
    case("block_table_elsewhere", "flash_attn_with_kvcache(paged)", ValueError,
         r"block_table is on \S+ but q is on \S+", block_table=elsewhere("block_table")),
    case("key_elsewhere", "scaled_dot_product_attention", ValueError,
         r"key is on \S+ but query is on \S+; all inputs must be on one device",
         key=elsewhere("key")),
    case("value_elsewhere", "scaled_dot_product_attention", ValueError,
         r"value is on \S+ but query is on \S+", value=elsewhere("value")),
    case("k_elsewhere", "ring_flash_attn_func", ValueError,
         r"k is on \S+ but q is on \S+; all inputs must be on one device", k=elsewhere("k"),
         v=elsewhere("v")),
    # -- cu_seqlens: not monotone, not from 0, not ending at the packed length, mismatched ----
    case("cu_seqlens_q_decreasing", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_q must start at 0, never decrease and end at 12 \(the packed length\), "
         r"got \[0, 8, 5, 12\]", cu_seqlens_q=i32([0, 8, 5, 12]),
         cu_seqlens_k=i32([0, 5, 9, 14])),
    case("cu_seqlens_k_decreasing", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_k must start at 0, never decrease and end at 14",
         cu_seqlens_k=i32([0, 9, 14, 14, 13, 14]), cu_seqlens_q=i32([0, 2, 4, 6, 9, 12])),
    case("cu_seqlens_q_not_from_0", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_q must start at 0, .* got \[1, 5, 12\]", cu_seqlens_q=i32([1, 5, 12])),
    case("cu_seqlens_q_short_of_total", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_q must .* end at 12 \(the packed length\), got \[0, 5, 10\]",
         cu_seqlens_q=i32([0, 5, 10])),
    case("cu_seqlens_k_past_total", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_k must .* end at 14 \(the packed length\), got \[0, 5, 15\]",
         cu_seqlens_k=i32([0, 5, 15]), max_seqlen_k=10),
    case("cu_seqlens_batch_mismatch", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_k has 4 entries but cu_seqlens_q has 3; both are batch \+ 1",
         cu_seqlens_k=i32([0, 5, 9, 14])),
    case("cu_seqlens_2d", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_q must be a 1-D int32 tensor of batch \+ 1 >= 2 cumulative lengths, "
         r"got torch.int32 of shape \(1, 3\)", cu_seqlens_q=i32([[0, 5, 12]])),
    case("cu_seqlens_single_entry", "flash_attn_varlen_func", ValueError,
         r"cu_seqlens_k must be a 1-D int32 tensor of batch \+ 1 >= 2", cu_seqlens_k=i32([14])),
    case("cu_seqlens_list", "flash_attn_varlen_func", TypeError,
         r"cu_seqlens_q must be a torch.Tensor, got list", cu_seqlens_q=[0, 5, 12]),
    case("max_seqlen_k_too_small", "flash_attn_varlen_func", ValueError,
         r"max_seqlen_k must be an int of at least the longest sequence \(9\), got 8",
         max_seqlen_k=8),
    case("max_seqlen_q_float", "flash_attn_varlen_func", ValueError,
         r"max_seqlen_q must be an int of at least the longest sequence \(7\), got 7.0",
         max_seqlen_q=7.0),
    # -- the paged cache: block_table outside the cache --------------------------------------
    case("block_table_past_last_page", "flash_attn_with_kvcache(paged)", ValueError,
         r"block_table\[1, 1\] = 4 points outside the paged cache: page indices must lie in "
         r"\[0, 4\) \(k_cache.shape\[0\], the number of pages\)",
         block_table=i32([[0, 1], [2, 4]])),
    case("block_table_negative", "flash_attn_with_kvcache(paged)", ValueError,
         r"block_table\[1, 0\] = -1 points outside the paged cache",
         block_table=i32([[0, 1], [-1, 3]])),
    case("block_table_past_last_page_append", "flash_attn_with_kvcache(paged)", ValueError,
         r"block_table\[1, 1\] = 7 points outside the paged cache",
         block_table=i32([[0, 1], [2, 7]]), cache_seqlens=i32([5, 17]), **appending(3)),
    case("block_table_int64", "flash_attn_with_kvcache(paged)", ValueError,
         r"block_table must be an int32 tensor of shape \(2, pages\)",
         block_table=lambda args, dev: args["block_table"].long()),
    case("block_table_batch", "flash_attn_with_kvcache(paged)", ValueError,
         r"block_table must be an int32 tensor of shape \(2, pages\)",
         block_table=i32([[0, 1, 2, 3]])),
    case("block_table_and_cache_batch_idx", "flash_attn_with_kvcache(paged)", ValueError,
         r"cache_batch_idx and block_table cannot be combined", cache_batch_idx=i32([0, 1])),
    case("append_past_paged_capacity", "flash_attn_with_kvcache(paged)", ValueError,
         r"cache_seqlens \+ seqlen_new must lie in \[0, 32\]", cache_seqlens=i32([5, 30]),
         **appending(3)),
    case("cache_batch_idx_past_cache", "flash_attn_with_kvcache", ValueError,
         r"cache_batch_idx\[1\] = 2 points outside the cache: rows must lie in \[0, 2\) "
         r"\(k_cache.shape\[0\]\)", cache_batch_idx=i32([0, 2])),
    case("cache_batch_idx_negative", "flash_attn_with_kvcache", ValueError,
         r"cache_batch_idx\[0\] = -1 points outside the cache", cache_batch_idx=i32([-1, 0])),
    case("cache_seqlens_negative", "flash_attn_with_kvcache", ValueError,
         r"cache_seqlens \+ seqlen_new must lie in \[0, 32\] \(the cache's capacity\)",
         cache_seqlens=i32([-3, 4])),
    case("new_k_heads", "flash_attn_with_kvcache", ValueError,
         r"k and v must have shape \(2, seqlen_new, 2, 16\), got \(2, 3, 4, 16\)",
         k=lambda args, dev: _randn(dev, 2, 3, 4, 16),
         v=lambda args, dev: _randn(dev, 2, 3, 4, 16)),
    case("v_cache_shape", "flash_attn_with_kvcache", ValueError,
         r"v_cache has shape \(2, 31, 2, 16\) but k_cache has \(2, 32, 2, 16\)",
         v_cache=lambda args, dev: _randn(dev, 2, 31, 2, 16)),
    # -- grid limits: heads and batch entries are CUDA grid axes of at most 65,535 programs ----
    case("batch_past_grid_axis", "flash_attn_func", ValueError,
         r"the batch size \(with cu_seqlens, the number of sequences\) must be at most 65535 "
         r"\(a CUDA grid axis holds one program per entry\), got 65536",
         **shaped("q", "k", "v", shape=(65536, 1, 1, 16))),
    case("heads_past_grid_axis", "scaled_dot_product_attention", ValueError,
         r"the number of heads must be at most 65535 .*, got 65536",
         **shaped("query", "key", "value", shape=(1, 65536, 1, 16))),
    case("sequences_past_grid_axis", "flash_attn_varlen_func", ValueError,
         r"the batch size \(with cu_seqlens, the number of sequences\) must be at most 65535",
         **shaped("q", "k", "v", shape=(65536, 2, 16)), max_seqlen_q=1, max_seqlen_k=1,
         **dict.fromkeys(("cu_seqlens_q", "cu_seqlens_k"), lambda args, dev: torch.arange(
             65537, dtype=torch.int32, device=dev))),
    case("num_splits_times_batch", "flash_attn_with_kvcache", ValueError,
         r"num_splits × batch must be at most 65535 \(one grid axis holds them\), got "
         r"40000 × 2", num_splits=40000),
    # -- rows of one sequence are offset in 32 bits: a sequence of more than 2^31 elements ----
    case("q_sequence_past_2_31", "flash_attn_func", ValueError,
         r"q: one sequence spans 2147483664 elements \(2 rows of stride 2147483648\), more "
         r"than 2\^31; flashtile indexes the rows of one sequence in 32 bits",
         q=rows_past_2_31(2, 4, 16)),
    case("k_cache_sequence_past_2_31", "flash_attn_with_kvcache", ValueError,
         r"k_cache: one sequence spans 2147483664 elements",
         k_cache=rows_past_2_31(2, 2, 16), v_cache=rows_past_2_31(2, 2, 16),
         cache_seqlens=i32([1, 2])),
    # -- what else each function checks before a launch ---------------------------------------
    case("mask_mod_not_jit", "flash_attn_func", TypeError,
         r"mask_mod must be a @triton.jit function or a flashtile.masks.MaskMod, got function",
         mask_mod=lambda args, dev: lambda b, h, i, j: True),
    case("no_process_group", "ring_flash_attn_func", RuntimeError,
         r"ring_flash_attn_func needs torch.distributed: call "
         r"torch.distributed.init_process_group"),
    case("k_seqlen", "ring_flash_attn_func", ValueError,
         r"k has seqlen 6 but q has 8: each rank holds the queries, keys and values of the same "
         r"tokens", k=lambda args, dev: _randn(dev, 1, 6, 2, 16),
         v=lambda args, dev: _randn(dev, 1, 6, 2, 16)),
    case("integer", "ring_flash_attn_func", TypeError,
         r"q must be float16, bfloat16 or float32, got torch.int32",
         q=lambda args, dev: args["q"].int()),
]


def _forbid_launches(monkeypatch):
    for name in ("attention_forward", "attention_backward", "attention_probs"):
        def launched(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} was launched on bad input")

        monkeypatch.setattr(interface, name, launched)
    # none of these calls may be handed to torch's SDPA either
    def fell_back(*args, **kwargs):
        raise AssertionError("torch's SDPA was called on bad input")

    monkeypatch.setattr(F, "scaled_dot_product_attention", fell_back)


def test_every_public_function_is_in_the_table():
    covered = {function for p in BAD_CALLS for function in p.values[:1]}
    assert covered == set(FUNCTIONS)


@pytest.mark.parametrize("function,over,exc,match", BAD_CALLS)
def test_bad_input_is_named_before_any_launch(function, over, exc, match, dev, monkeypatch):
    fn, valid = FUNCTIONS[function]
    args = valid(dev)
    for name, value in over.items():
        args[name] = value(args, dev) if callable(value) else value
    _forbid_launches(monkeypatch)
    with pytest.raises(exc, match=match):
        fn(**args)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_the_valid_calls_run(function, dev):
    """The table's baseline calls are valid: each case's error is its own change's."""
    fn, valid = FUNCTIONS[function]
    if function == "ring_flash_attn_func":
        pytest.skip("needs a process group (test_distributed.py runs it)")
    fn(**valid(dev))


def test_unused_block_table_entries_are_not_read(dev):
    """Only the pages an entry's length reaches are checked (and read): padding such as -1 in
    the rest of its row is valid, as in paged-attention servers."""
    args = _paged_args(dev)
    args["block_table"] = _i32([[3, -1], [2, 0]], dev)  # entry 0: 5 keys, one page
    out = flashtile.flash_attn_with_kvcache(**args)
    for b, (pages, n) in enumerate((([3], 5), ([2, 0], 20))):
        keys = args["k_cache"][pages].flatten(0, 1)[None, :n]
        values = args["v_cache"][pages].flatten(0, 1)[None, :n]
        ref = reference_attention(args["q"][b:b + 1], keys, values, None, dtype=torch.float64)
        base = reference_attention(args["q"][b:b + 1], keys, values, None)
        assert_close(f"entry {b} out", out[b:b + 1], ref.out, tolerance(ref.out, base.out, F16))


# -- a non-contiguous last dimension is valid input: correct results -------------------------


def strided_last_dim(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view whose last dimension has stride 2."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert view.stride(-1) == 2 and torch.equal(view, t)
    return view


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_varlen_strided_last_dim(dtype, dev):
    lens_q, lens_k = [17, 0, 40], [33, 5, 20]
    cu_q = _i32([0, 17, 17, 57], dev)
    cu_k = _i32([0, 33, 38, 58], dev)
    q = strided_last_dim(_randn(dev, sum(lens_q), 2, 24, dtype=dtype)).requires_grad_()
    k, v = (strided_last_dim(_randn(dev, sum(lens_k), 2, 24, dtype=dtype)).requires_grad_()
            for _ in range(2))
    dout = torch.randn_like(q)
    out = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 33, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for i in range(3):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        keys = slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi, ki, vi, doi = q[rows][None], k[keys][None], v[keys][None], dout[rows][None]
        ref = reference_attention(qi, ki, vi, doi, causal=True, dtype=torch.float64)
        base = reference_attention(qi, ki, vi, doi, causal=True)
        for name, got, r, b in (("out", out[rows], ref.out, base.out),
                                ("dq", dq[rows], ref.dq, base.dq),
                                ("dk", dk[keys], ref.dk, base.dk),
                                ("dv", dv[keys], ref.dv, base.dv)):
            assert_close(f"sequence {i} {name}", got[None], r, tolerance(r, b, dtype))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous_cache", "paged_cache"])
def test_kvcache_strided_last_dim(paged, dev):
    """q, the cache and the new keys all with a last-dimension stride of 2; the append lands in
    the caller's (strided) cache."""
    batch, heads, heads_k, d = 2, 4, 2, 32
    if paged:
        k_cache, v_cache = (strided_last_dim(_randn(dev, 6, 16, heads_k, d)) for _ in range(2))
        block_table = _i32([[4, 1, 0], [2, 5, 3]], dev)
        capacity = 48
    else:
        k_cache, v_cache = (strided_last_dim(_randn(dev, batch, 40, heads_k, d))
                            for _ in range(2))
        block_table, capacity = None, 40
    q = strided_last_dim(_randn(dev, batch, 3, heads, d))
    k_new, v_new = (strided_last_dim(_randn(dev, batch, 3, heads_k, d)) for _ in range(2))
    cache_seqlens = _i32([14, 30], dev)
    out, lse = flashtile.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, block_table=block_table,
        causal=True, return_softmax_lse=True)

    def logical(cache):  # (batch, capacity, heads_k, d) as each entry sees its cache
        if not paged:
            return cache
        return cache[block_table.long()].reshape(batch, capacity, heads_k, d)

    keys, values = logical(k_cache), logical(v_cache)
    for b, start in enumerate(cache_seqlens.tolist()):
        assert torch.equal(keys[b, start:start + 3], k_new[b]), "append missed the cache"
        n = start + 3
        ref = reference_attention(q[b:b + 1], keys[b:b + 1, :n], values[b:b + 1, :n], None,
                                  causal=True, dtype=torch.float64)
        base = reference_attention(q[b:b + 1], keys[b:b + 1, :n], values[b:b + 1, :n], None,
                                   causal=True)
        assert_close(f"entry {b} out", out[b:b + 1], ref.out, tolerance(ref.out, base.out, F16))
        assert_close(f"entry {b} lse", lse[b:b + 1], ref.lse, tolerance(ref.lse, base.lse, F16))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_strided_last_dim(is_causal, dev):
    query, key, value = (strided_last_dim(_randn(dev, 2, 3, n, 32)).requires_grad_()
                         for n in (37, 50, 50))
    dout = _randn(dev, 2, 3, 37, 32)
    out = flashtile.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
    grads = torch.autograd.grad(out, (query, key, value), dout)
    # torch's SDPA is top-left aligned: the reference's diag_offset=0, in (B, N, H, D)
    q, k, v, do = (t.transpose(1, 2) for t in (query, key, value, dout))
    ref = reference_attention(q, k, v, do, causal=is_causal, diag_offset=0, dtype=torch.float64)
    base = reference_attention(q, k, v, do, causal=is_causal, diag_offset=0)
    for name, got, r, b in zip(("out", "dquery", "dkey", "dvalue"), (out, *grads),
                               (ref.out, ref.dq, ref.dk, ref.dv),
                               (base.out, base.dq, base.dk, base.dv)):
        assert_close(name, got.transpose(1, 2), r, tolerance(r, b, F16))


# -- requires_grad on some inputs only: their gradients, and none for the others -------------

GRAD_SUBSETS = ["q", "kv", "v", "qk"]


def _call_with_grads(function, q, k, v, dev, **kw):
    """out of `function` on (B, N, H, D) q, k, v, in that layout."""
    if function == "flash_attn_func":
        return flashtile.flash_attn_func(q, k, v, causal=True, **kw)
    if function == "flash_attn_func(mask_mod)":  # the autograd.Function path, not the ops
        return flashtile.flash_attn_func(q, k, v, causal=True, mask_mod=_keep_all, **kw)
    if function == "scaled_dot_product_attention":
        out = flashtile.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                     is_causal=True)
        return out.transpose(1, 2)
    # varlen: the batch packed as sequences of equal length
    batch, seqlen_q, _, _ = q.shape
    seqlen_k = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=dev)
    cu_k = torch.arange(0, (batch + 1) * seqlen_k, seqlen_k, dtype=torch.int32, device=dev)
    out = flashtile.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                           cu_q, cu_k, seqlen_q, seqlen_k, causal=True)
    return out.view(q.shape)


@pytest.mark.parametrize("subset", GRAD_SUBSETS)
@pytest.mark.parametrize("function", ["flash_attn_func", "flash_attn_func(mask_mod)",
                                      "flash_attn_varlen_func", "scaled_dot_product_attention"])
def test_some_inputs_require_grad(function, subset, dev):
    seqlen_q = seqlen_k = 45
    if function == "flash_attn_func":
        seqlen_k = 60  # bottom-right causal: diag offset 15
    q, k, v = (_randn(dev, 2, n, 2, 32) for n in (seqlen_q, seqlen_k, seqlen_k))
    wants = dict(zip("qkv", (name in subset for name in "qkv")))
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(wants[name])
    dout = torch.randn_like(q)
    out = _call_with_grads(function, q, k, v, dev)
    out.backward(dout)
    diag = 0 if function == "scaled_dot_product_attention" else None
    ref = reference_attention(q, k, v, dout, causal=True, diag_offset=diag, dtype=torch.float64)
    base = reference_attention(q, k, v, dout, causal=True, diag_offset=diag)
    assert_close("out", out, ref.out, tolerance(ref.out, base.out, F16))
    for name, t in zip("qkv", (q, k, v)):
        if wants[name]:
            r, b = getattr(ref, f"d{name}"), getattr(base, f"d{name}")
            assert t.grad is not None, f"d{name} missing"
            assert_close(f"d{name}", t.grad, r, tolerance(r, b, F16))
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


def test_no_input_requires_grad(dev):
    q, k, v = (_randn(dev, 1, 20, 2, 16) for _ in range(3))
    out = flashtile.flash_attn_func(q, k, v)
    assert not out.requires_grad and out.grad_fn is None
