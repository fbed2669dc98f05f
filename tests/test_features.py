"""flash_attn_func's features against the float64 reference, by FlashAttention's rule
(flashtile/testing.py): grouped-query heads, sliding windows, softcap, ALiBi, the returned
probabilities, dropout and head dims up to 512, each alone and in pairs.

The semantics are those of flashtile.reference.attention_naive (its module docstring). Shapes are
small: on the CPU the kernels run through the Triton interpreter with 32 × 16 blocks, so these
lengths already cross windows, diagonals and ragged ends in many blocks.
"""

import math

import pytest
import torch
from conftest import ON_GPU

import flashtile
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


def alibi_slopes(batch: int, nheads: int, shape: str, dev) -> torch.Tensor:
    """float32 slopes: ALiBi's 2^(-8h/H), h = 1..H, as (H,); random in [0.05, 1) as (B, H)."""
    if shape == "per_head":
        return 2.0 ** (-8.0 * torch.arange(1, nheads + 1, device=dev) / nheads)
    return 0.05 + 0.95 * torch.rand(batch, nheads, device=dev)


def make_inputs(dtype, dev, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, features,
                qk_scale=1.0, requires_grad=True):
    """q, k, v and flash_attn_func's keywords. features may say alibi="per_head"/"per_batch";
    qk_scale multiplies q and k (so that a softcap matters)."""
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, dev,
                         requires_grad=False, nheads_k=nheads_k)
    q, k = q * qk_scale, k * qk_scale
    kw = dict(features)
    if "alibi" in kw:
        kw["alibi_slopes"] = alibi_slopes(batch, nheads, kw.pop("alibi"), dev)
    return (*(t.requires_grad_(requires_grad) for t in (q, k, v)), kw)


def check_out_is_probs_v(name, out, probs, v, ref, base, dtype):
    """out == probs @ v (probs in float64), within the tolerance of out."""
    V = v.detach().double().transpose(1, 2)  # (B, H_k, Nk, D)
    V = V.repeat_interleave(probs.shape[1] // V.shape[1], dim=1)
    pv = (probs.double() @ V).transpose(1, 2)
    assert_close(f"{name} out vs probs @ v", out, pv, tolerance(ref.out, base.out, dtype))


def case_id(case) -> str:
    return case[0]


# (id, batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, features, qk_scale)
WINDOWS = [(8, 0), (20, 5), (0, 0), (-1, 7), (7, -1)]
CAUSAL_WINDOWS = [(20, 5), (-1, 7), (7, -1)]  # (8, 0) and (0, 0) are already causal
WINDOW_CASES = [
    (f"window({w[0]},{w[1]}){'-causal' if causal else ''}-{nq}x{nk}", 1, nq, nk, 2, 2, 32,
     dict(window_size=w, causal=causal), 1.0)
    for causal, windows in ((False, WINDOWS), (True, CAUSAL_WINDOWS))
    for w in windows
    for nq, nk in ((40, 110), (110, 40))
]
SINGLE_CASES = [
    ("gqa8:2", 1, 50, 75, 8, 2, 32, {}, 1.0),
    ("mqa4:1-causal", 2, 75, 50, 4, 1, 32, dict(causal=True), 1.0),
    ("softcap5-qk_x3", 2, 45, 60, 2, 2, 64, dict(softcap=5.0), 3.0),
    ("softcap30-qk_x3-causal", 2, 60, 45, 2, 2, 64, dict(softcap=30.0, causal=True), 3.0),
    ("softcap30-scale1", 1, 45, 60, 2, 2, 64, dict(softcap=30.0, softmax_scale=1.0), 1.0),
    ("alibi_per_head", 2, 50, 80, 3, 3, 32, dict(alibi="per_head"), 1.0),
    ("alibi_per_batch", 2, 80, 50, 3, 3, 32, dict(alibi="per_batch"), 1.0),
]
PAIR_CASES = [
    ("gqa4:2+window(20,5)", 1, 60, 100, 4, 2, 32, dict(window_size=(20, 5)), 1.0),
    ("mqa4:1+window(8,0)-causal", 1, 100, 60, 4, 1, 32, dict(window_size=(8, 0), causal=True), 1.0),
    ("window(-1,7)+softcap5-qk_x3", 1, 50, 90, 2, 2, 64,
     dict(window_size=(-1, 7), softcap=5.0), 3.0),
    ("alibi_per_head+causal", 2, 50, 80, 3, 3, 32, dict(alibi="per_head", causal=True), 1.0),
    ("window(20,5)+alibi_per_batch-causal", 2, 80, 50, 2, 2, 32,
     dict(window_size=(20, 5), alibi="per_batch", causal=True), 1.0),
    ("softcap30+alibi_per_batch+mqa4:1-qk_x3", 2, 45, 70, 4, 1, 64,
     dict(softcap=30.0, alibi="per_batch"), 3.0),
    ("gqa4:2+window(7,-1)+softcap5+alibi_per_head-causal-qk_x3", 1, 70, 45, 4, 2, 48,
     dict(window_size=(7, -1), softcap=5.0, alibi="per_head", causal=True), 3.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SINGLE_CASES + WINDOW_CASES + PAIR_CASES, ids=case_id)
def test_feature_matches_reference(case, dtype, dev):
    name, *shape, features, qk_scale = case
    q, k, v, kw = make_inputs(dtype, dev, *shape, features, qk_scale)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, **kw)
    ref = reference_attention(q, k, v, dout, dtype=F64, **kw)
    base = reference_attention(q, k, v, dout, **kw)
    check_attention(name, got, ref, base, dtype)


PROBS_CASES = [
    ("plain", 2, 50, 70, 2, 2, 32, {}, 1.0),
    ("causal-empty_rows", 2, 70, 40, 2, 2, 32, dict(causal=True), 1.0),
    ("gqa4:2+window(20,5)+softcap5+alibi_per_batch-qk_x3", 1, 60, 80, 4, 2, 32,
     dict(window_size=(20, 5), softcap=5.0, alibi="per_batch"), 3.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PROBS_CASES, ids=case_id)
def test_return_attn_probs(case, dtype, dev):
    name, *shape, features, qk_scale = case
    q, k, v, kw = make_inputs(dtype, dev, *shape, features, qk_scale, requires_grad=False)
    out, lse, probs = flashtile.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    batch, seqlen_q, nheads, _ = q.shape
    assert probs.dtype == torch.float32
    assert probs.shape == (batch, nheads, seqlen_q, k.shape[1])
    ref = reference_attention(q, k, v, dtype=F64, return_probs=True, **kw)
    base = reference_attention(q, k, v, return_probs=True, **kw)
    got = dict(out=out, lse=lse, probs=probs)
    check_attention(name, got, ref, base, dtype, fields=("out", "lse", "probs"))
    assert bool((probs[ref.probs == 0] == 0).all()), "masked entries of probs must be 0"
    check_out_is_probs_v(name, out, probs, v, ref, base, dtype)


# -- dropout ----------------------------------------------------------------------------------

P_DROP = 0.3


def dropout_probs(seed, q, k, v, **kw):
    """out, lse, probs of a dropout run after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return flashtile.flash_attn_func(q, k, v, dropout_p=P_DROP, return_attn_probs=True, **kw)


def test_dropout_keep_rate_and_seeding(dev):
    """The kept fraction is 1 - p; the pattern is a function of torch's seed, and differs
    between seeds, between consecutive calls, and between heads and batches."""
    q, k, v = random_qkv(2, 64, 80, 4, 32, torch.float16, dev, requires_grad=False)
    seed = int(torch.randint(2**31, ()))
    out, _, probs = dropout_probs(seed, q, k, v)
    _, _, probs_next = flashtile.flash_attn_func(q, k, v, dropout_p=P_DROP,
                                                 return_attn_probs=True)
    out_again, _, probs_again = dropout_probs(seed, q, k, v)
    _, _, probs_other = dropout_probs(seed + 1, q, k, v)
    assert torch.equal(out_again, out) and torch.equal(probs_again, probs), (
        "same torch.manual_seed, different dropout")

    visible = reference_attention(q, k, v, dtype=F64, return_probs=True).probs > 0
    n = int(visible.sum())
    assert n >= 20_000
    sd = math.sqrt(P_DROP * (1 - P_DROP) / n)
    for what, p in (("first", probs), ("next", probs_next), ("other seed", probs_other)):
        kept = (p != 0)[visible].double().mean().item()
        assert abs(kept - (1 - P_DROP)) <= 5 * sd, (
            f"{what} call: kept fraction {kept:.4f}, expected {1 - P_DROP} ± {5 * sd:.4f}")
    keep = probs != 0
    assert not torch.equal(probs_next != 0, keep), "consecutive calls gave one dropout pattern"
    assert not torch.equal(probs_other != 0, keep), "two seeds gave one dropout pattern"
    assert not torch.equal(keep[0, 0], keep[0, 1]), "two heads share one dropout pattern"
    assert not torch.equal(keep[0, 0], keep[1, 0]), "two batches share one dropout pattern"


DROPOUT_CASES = [
    ("dropout", 1, 50, 70, 2, 2, 32, {}, 1.0),
    ("dropout+causal", 2, 70, 40, 2, 2, 32, dict(causal=True), 1.0),
    ("dropout+gqa4:1", 1, 60, 60, 4, 1, 32, {}, 1.0),
    ("dropout+window(20,5)+alibi_per_head", 1, 45, 75, 2, 2, 32,
     dict(window_size=(20, 5), alibi="per_head"), 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=case_id)
def test_dropout_matches_reference(case, dtype, dev):
    """The keep mask read off the returned probs; then out, lse and the gradients of a run
    without probs (same seed, so the same mask) against the reference with that mask."""
    name, *shape, features, qk_scale = case
    q, k, v, kw = make_inputs(dtype, dev, *shape, features, qk_scale)
    seed = int(torch.randint(2**31, ()))
    with torch.no_grad():
        out_p, lse_p, probs = dropout_probs(seed, q, k, v, **kw)
    keep = probs != 0
    dout = torch.randn_like(q)
    torch.manual_seed(seed)
    got = run_flashtile(q, k, v, dout, dropout_p=P_DROP, **kw)
    drop = dict(dropout_p=P_DROP, dropout_keep=keep, return_probs=True, **kw)
    ref = reference_attention(q, k, v, dout, dtype=F64, **drop)
    base = reference_attention(q, k, v, dout, **drop)
    check_attention(name, got, ref, base, dtype)
    check_attention(f"{name} (return_attn_probs)", dict(out=out_p, lse=lse_p, probs=probs),
                    ref, base, dtype, fields=("out", "lse", "probs"))
    check_out_is_probs_v(name, out_p, probs, v, ref, base, dtype)


# -- head dims over 256 -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim,causal", [
    (20, 33, 320, True),
    (33, 20, 512, False),
], ids=["320-20x33-causal", "512-33x20"])
def test_large_head_dims(seqlen_q, seqlen_k, head_dim, causal, dtype, dev):
    q, k, v = random_qkv(1, seqlen_q, seqlen_k, 2, head_dim, dtype, dev)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, causal=causal)
    ref = reference_attention(q, k, v, dout, causal=causal, dtype=F64)
    base = reference_attention(q, k, v, dout, causal=causal)
    check_attention(f"head dim {head_dim}", got, ref, base, dtype)
