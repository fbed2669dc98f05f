"""Every candidate config the autotuner may choose, each forced in turn (GPU only).

The other GPU tests run one fixed config per kernel (tests/conftest.py): tuning would compile
every candidate for every shape bucket and flag set, and the suite would not finish in minutes.
Whatever the tuner picks on a user's machine is one of these, so each is checked here against
the float64 reference by the rule: the forward and both backward kernels at every padded head
dim, on a causal GQA problem with ragged lengths, and the forward's decoding candidates against
a KV cache. One test runs the tuned path itself: the first call tunes, the second launches the
remembered choice (configs.Remembered), and both must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU

import flashtile
from flashtile.kernels import configs
from flashtile.testing import check_attention, random_qkv, reference_attention, run_flashtile

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU configs; the interpreter runs one "
                                "fixed config (kernels/configs.py)")

F64 = torch.float64
DTYPE = torch.bfloat16
# padded head dim -> the head dim tested: the powers of two take the TMA path, 192 and 320 the
# pointer path with masked columns
HEAD_DIMS = {64: 64, 128: 128, 256: 192, 512: 320}
SEQLENS = {64: (300, 333), 128: (300, 333), 256: (200, 150), 512: (90, 120)}


def _params():
    for kernel, table in configs._CANDIDATES.items():
        for padded, listed in table.items():
            for bm, bn, w, s in listed:
                yield pytest.param(kernel, padded, configs.KernelConfig(bm, bn, w, s),
                                   id=f"{kernel}-d{HEAD_DIMS[padded]}-{bm}x{bn}-w{w}s{s}")


def _decode_params():
    for padded, listed in configs._CANDIDATES_DECODE.items():
        for bm, bn, w, s in listed:
            yield pytest.param(padded, configs.KernelConfig(bm, bn, w, s),
                               id=f"d{HEAD_DIMS[padded]}-{bm}x{bn}-w{w}s{s}")


@pytest.fixture
def forced():
    """configs.set_override for one kernel, undone after the test."""
    names = []

    def force(kernel, config):
        names.append(kernel)
        configs.set_override(kernel, config)

    yield force
    for kernel in names:
        configs.set_override(kernel, None)


@pytest.mark.parametrize("kernel,padded,config", list(_params()))
def test_candidate(kernel, padded, config, forced, dev):
    forced(kernel, config)
    seqlen_q, seqlen_k = SEQLENS[padded]
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 4, HEAD_DIMS[padded], DTYPE, dev,
                         nheads_k=2)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, causal=True)
    ref = reference_attention(q, k, v, dout, causal=True, dtype=F64)
    base = reference_attention(q, k, v, dout, causal=True)
    check_attention(f"{kernel} {config}", got, ref, base, q.dtype)


@pytest.mark.parametrize("paged", [None, "gather", "tma"],
                         ids=["contiguous", "paged_gather", "paged_tma"])
@pytest.mark.parametrize("padded,config", list(_decode_params()))
def test_decode_candidate(padded, config, paged, forced, dev, monkeypatch):
    """One new token per entry against cached prefixes of 5, 300 and 700 keys, 8 query heads on
    2 kv heads (PACK_GQA), split-KV chosen automatically; the cache contiguous, or in shuffled
    pages of 128 rows read row by row or, through TMA, a block at a time (every candidate's key
    block divides the page)."""
    forced("fwd", config)
    monkeypatch.setitem(configs.features, "tma_paged", paged == "tma")
    head_dim, dtype = HEAD_DIMS[padded], DTYPE
    lengths = [5, 300, 700]
    q = torch.randn(3, 1, 8, head_dim, device=dev, dtype=dtype)
    k_cache, v_cache = (torch.randn(3, 768, 2, head_dim, device=dev, dtype=dtype)
                        for _ in range(2))
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    if paged:  # page j of entry b is page where[b, j] of the pool
        where = torch.randperm(18, device=dev)
        k_pool, v_pool = (torch.empty(18, 128, 2, head_dim, device=dev, dtype=dtype)
                          for _ in range(2))
        k_pool[where], v_pool[where] = k_cache.view(18, 128, 2, head_dim), v_cache.view(
            18, 128, 2, head_dim)
        out, lse = flashtile.flash_attn_with_kvcache(
            q, k_pool, v_pool, cache_seqlens=cache_seqlens, block_table=where.view(3, 6).int(),
            causal=True, return_softmax_lse=True)
    else:
        out, lse = flashtile.flash_attn_with_kvcache(q, k_cache, v_cache,
                                                     cache_seqlens=cache_seqlens, causal=True,
                                                     return_softmax_lse=True)
    for b, n in enumerate(lengths):
        qi, ki, vi = q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n]
        ref = reference_attention(qi, ki, vi, None, causal=True, dtype=F64)
        base = reference_attention(qi, ki, vi, None, causal=True)
        check_attention(f"decode {config} entry {b}", dict(out=out[b:b + 1], lse=lse[b:b + 1]),
                        ref, base, dtype, fields=("out", "lse"))


def test_tuned_then_remembered(dev, monkeypatch):
    """Autotuning on: the first call tunes all three kernels, the second launches the choices
    directly; both pass the rule and agree bit for bit."""
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "1")
    q, k, v = random_qkv(2, 1000, 1000, 4, 128, DTYPE, dev, nheads_k=2)
    dout = torch.randn_like(q)
    first, second = (run_flashtile(q, k, v, dout, causal=True) for _ in range(2))
    for field in first:
        assert torch.equal(first[field], second[field]), f"{field}: tuned and remembered differ"
    ref = reference_attention(q, k, v, dout, causal=True, dtype=F64)
    base = reference_attention(q, k, v, dout, causal=True)
    check_attention("tuned", first, ref, base, q.dtype)
