"""Tests of flashtile.reference itself: the tiled algorithm against the materialized one, the
materialized one against autograd, torch's SDPA and finite differences, and the mask."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from flashtile.reference import (
    attention_naive,
    attention_tiled_backward,
    attention_tiled_forward,
    keep_mask,
)

F64 = torch.float64
B, H, D = 2, 3, 40
TOL = {"rtol": 0.0, "atol": 1e-12}


def inputs(Nq: int, Nk: int, D: int = D, B: int = B, H: int = H):
    """Fresh Q, K, V, dO in float64 (tests/conftest.py seeds torch per test)."""
    return tuple(torch.randn(B, H, n, D, dtype=F64) for n in (Nq, Nk, Nk, Nq))


SHAPES = [(1, 1), (1, 17), (17, 1), (17, 17), (65, 65), (17, 65), (65, 17), (1, 65), (65, 1)]
BLOCKS = [(16, 16), (16, 32), (32, 16)]
MASKS = [(False, None), (True, None), (True, 0)]  # (causal, diag_offset): none, BR, TL


# -- the mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "Nq,Nk,causal,diag_offset,expected",
    [
        (2, 5, True, None, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),  # bottom-right
        (2, 5, True, 0, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]),  # top-left
        (5, 2, True, None, [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]),  # rows 0-2 see nothing
        (5, 2, True, 0, [[1, 0], [1, 1], [1, 1], [1, 1], [1, 1]]),
        (3, 3, True, None, [[1, 0, 0], [1, 1, 0], [1, 1, 1]]),
        (3, 3, True, 1, [[1, 1, 0], [1, 1, 1], [1, 1, 1]]),
        (2, 3, False, None, [[1, 1, 1], [1, 1, 1]]),
    ],
)
def test_keep_mask_explicit(Nq, Nk, causal, diag_offset, expected):
    got = keep_mask(Nq, Nk, causal, diag_offset)
    assert got.dtype == torch.bool
    assert torch.equal(got, torch.tensor(expected, dtype=torch.bool))


# -- the materialized reference against torch ---------------------------------------------------


@pytest.mark.parametrize("Nq,Nk", [(17, 17), (9, 23), (23, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_matches_sdpa(Nq, Nk, causal):
    Q, K, V, _ = inputs(Nq, Nk)
    # SDPA's is_causal is top-left aligned: diag_offset = 0
    O, _ = attention_naive(Q, K, V, causal=causal, diag_offset=0, dtype=F64)
    torch.testing.assert_close(O, F.scaled_dot_product_attention(Q, K, V, is_causal=causal), **TOL)
    if causal and Nq <= Nk:  # bottom-right through an explicit mask (no empty rows here)
        O, _ = attention_naive(Q, K, V, causal=True, dtype=F64)
        want = F.scaled_dot_product_attention(Q, K, V, attn_mask=keep_mask(Nq, Nk, True))
        torch.testing.assert_close(O, want, **TOL)


def test_naive_default_scale_and_lse():
    Q, K, V, _ = inputs(11, 13)
    O, LSE = attention_naive(Q, K, V, dtype=F64)
    O2, LSE2 = attention_naive(Q, K, V, softmax_scale=1 / math.sqrt(D), dtype=F64)
    assert torch.equal(O, O2) and torch.equal(LSE, LSE2)
    want = torch.logsumexp(Q @ K.transpose(-2, -1) / math.sqrt(D), dim=-1)
    torch.testing.assert_close(LSE, want, **TOL)


@pytest.mark.parametrize(
    "dtype,dtype_arg,o_dtype,lse_dtype",
    [
        (torch.float32, None, torch.float32, torch.float32),
        (torch.bfloat16, None, torch.bfloat16, torch.float32),
        (torch.bfloat16, F64, F64, F64),
    ],
)
def test_naive_dtypes(dtype, dtype_arg, o_dtype, lse_dtype):
    Q, K, V, _ = (t.to(dtype) for t in inputs(5, 7))
    O, LSE = attention_naive(Q, K, V, dtype=dtype_arg)
    assert (O.dtype, LSE.dtype) == (o_dtype, lse_dtype)
    O_t, LSE_t = attention_tiled_forward(Q, K, V)
    assert (O_t.dtype, LSE_t.dtype) == (torch.float32, torch.float32)  # tiles accumulate in fp32
    torch.testing.assert_close(
        O_t.double(), attention_naive(Q, K, V, dtype=F64)[0], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(3, 4), (4, 4), (5, 3)])
def test_gradcheck_naive(causal, Nq, Nk):
    Q, K, V, _ = (t.requires_grad_() for t in inputs(Nq, Nk, D=3, B=1, H=2))
    empty_rows = causal and Nq > Nk  # their lse is -inf, which finite differences cannot take

    def f(Q, K, V):
        O, LSE = attention_naive(Q, K, V, softmax_scale=0.7, causal=causal, dtype=F64)
        return O if empty_rows else (O, LSE)

    assert torch.autograd.gradcheck(f, (Q, K, V), eps=1e-6, atol=1e-8, rtol=1e-6)


# -- the tiled algorithm against the materialized one -------------------------------------------


@pytest.mark.parametrize("causal,diag_offset", MASKS)
@pytest.mark.parametrize("BLOCK_M,BLOCK_N", BLOCKS)
@pytest.mark.parametrize("Nq,Nk", SHAPES)
def test_tiled_forward_matches_naive(Nq, Nk, BLOCK_M, BLOCK_N, causal, diag_offset):
    Q, K, V, _ = inputs(Nq, Nk)
    O, LSE = attention_tiled_forward(Q, K, V, None, causal, diag_offset, BLOCK_M, BLOCK_N)
    O_ref, LSE_ref = attention_naive(Q, K, V, None, causal, diag_offset, dtype=F64)
    assert O.dtype == LSE.dtype == F64
    torch.testing.assert_close(O, O_ref, **TOL)
    torch.testing.assert_close(LSE, LSE_ref, **TOL)  # -inf in the same places


@pytest.mark.parametrize("causal,diag_offset", MASKS)
@pytest.mark.parametrize("BLOCK_M,BLOCK_N", BLOCKS)
@pytest.mark.parametrize("Nq,Nk", SHAPES)
def test_tiled_backward_matches_autograd(Nq, Nk, BLOCK_M, BLOCK_N, causal, diag_offset):
    Q, K, V, dO = inputs(Nq, Nk)
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    attention_naive(Qr, Kr, Vr, None, causal, diag_offset, dtype=F64)[0].backward(dO)
    O, LSE = attention_tiled_forward(Q, K, V, None, causal, diag_offset, BLOCK_M, BLOCK_N)
    grads = attention_tiled_backward(
        Q, K, V, O, dO, LSE, None, causal, diag_offset, BLOCK_M, BLOCK_N
    )
    for got, want in zip(grads, (Qr.grad, Kr.grad, Vr.grad)):
        assert got.dtype == F64
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_explicit_scale(causal):
    Q, K, V, dO = inputs(33, 47, D=24)
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    O_ref, LSE_ref = attention_naive(Qr, Kr, Vr, 0.05, causal, dtype=F64)
    O_ref.backward(dO)
    O, LSE = attention_tiled_forward(Q, K, V, 0.05, causal, BLOCK_M=16, BLOCK_N=16)
    torch.testing.assert_close(O, O_ref.detach(), **TOL)
    torch.testing.assert_close(LSE, LSE_ref.detach(), **TOL)
    grads = attention_tiled_backward(Q, K, V, O, dO, LSE, 0.05, causal, BLOCK_M=16, BLOCK_N=16)
    for got, want in zip(grads, (Qr.grad, Kr.grad, Vr.grad)):
        torch.testing.assert_close(got, want, **TOL)


# -- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_rows_of_p_sum_to_one(causal):
    Nq, Nk = 37, 21  # causal bottom-right: rows 0..15 see nothing and sum to 0
    Q, K, V, _ = inputs(Nq, Nk)
    _, LSE = attention_naive(Q, K, V, causal=causal, dtype=F64)
    S = (Q @ K.transpose(-2, -1) / math.sqrt(D)).masked_fill(
        ~keep_mask(Nq, Nk, causal), float("-inf")
    )
    sums = torch.exp(S - LSE.nan_to_num(neginf=0.0)[..., None]).sum(-1)
    want = (LSE > float("-inf")).to(F64)
    torch.testing.assert_close(sums, want, **TOL)
    ones = torch.ones_like(V)  # P · 1 = rowsum(P): through the tiles as well
    for O, _ in (
        attention_naive(Q, K, ones, causal=causal, dtype=F64),
        attention_tiled_forward(Q, K, ones, causal=causal, BLOCK_M=16, BLOCK_N=16),
    ):
        torch.testing.assert_close(O, want[..., None].expand_as(O), **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_shift_invariance(causal):
    """S_ij -> S_ij + c_i: same O, lse shifted by c_i. Done by appending a column (c_i / scale)
    to Q and a column of ones to K, so both implementations see the shifted scores."""
    Nq, Nk, scale = 29, 45, 0.2
    Q, K, V, _ = inputs(Nq, Nk, D=16)
    c = 300.0 * torch.randn(B, H, Nq, dtype=F64)
    Q2 = torch.cat([Q, (c / scale)[..., None]], -1)
    K2 = torch.cat([K, torch.ones(B, H, Nk, 1, dtype=F64)], -1)
    V2 = torch.cat([V, torch.zeros(B, H, Nk, 1, dtype=F64)], -1)  # the kernels need D_v == D
    O, LSE = attention_naive(Q, K, V, scale, causal, dtype=F64)
    for O2, LSE2 in (
        attention_naive(Q2, K2, V2, scale, causal, dtype=F64),
        attention_tiled_forward(Q2, K2, V2, scale, causal, BLOCK_M=16, BLOCK_N=16),
    ):
        torch.testing.assert_close(O2[..., :-1], O, rtol=0, atol=1e-10)
        torch.testing.assert_close(LSE2, LSE + c, rtol=0, atol=1e-10)


@pytest.mark.parametrize("BLOCK_M,BLOCK_N", [(16, 16), (32, 16)])
def test_fully_masked_rows_give_zero_output(BLOCK_M, BLOCK_N):
    Nq, Nk = 50, 18  # bottom-right causal: row i sees keys j <= i - 32; rows 0..31 see none
    Q, K, V, dO = inputs(Nq, Nk)
    O, LSE = attention_tiled_forward(Q, K, V, causal=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    O_ref, LSE_ref = attention_naive(Q, K, V, causal=True, dtype=F64)
    for o, lse in ((O, LSE), (O_ref, LSE_ref)):
        assert torch.equal(o[:, :, :32], torch.zeros(B, H, 32, D, dtype=F64))
        assert bool((lse[:, :, :32] == float("-inf")).all())
        assert bool(lse[:, :, 32:].isfinite().all())
    dQ, dK, dV = attention_tiled_backward(
        Q, K, V, O, dO, LSE, causal=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N
    )
    assert torch.equal(dQ[:, :, :32], torch.zeros(B, H, 32, D, dtype=F64))
    assert bool(dK.isfinite().all()) and bool(dV.isfinite().all())


def test_unseen_keys_get_zero_grad():
    Nq, Nk = 20, 50  # top-left causal: row i sees keys j <= i; keys 20..49 are seen by no row
    Q, K, V, dO = inputs(Nq, Nk)
    O, LSE = attention_tiled_forward(Q, K, V, None, True, 0, 16, 16)
    _, dK, dV = attention_tiled_backward(Q, K, V, O, dO, LSE, None, True, 0, 16, 16)
    assert torch.equal(dK[:, :, 20:], torch.zeros(B, H, 30, D, dtype=F64))
    assert torch.equal(dV[:, :, 20:], torch.zeros(B, H, 30, D, dtype=F64))
    assert bool((dV[:, :, :20] != 0).all())


# -- features: window, softcap, ALiBi, GQA, user mask, dropout, probabilities ------------------


@pytest.mark.parametrize(
    "Nq,Nk,causal,window,diag_offset,expected",
    [
        (4, 4, False, (1, 0), None, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
        (3, 5, False, (0, 1), None, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]),
        (3, 5, False, (-1, 0), None, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (3, 5, True, (1, 3), None, [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),  # right=0
        (3, 5, True, (-1, 2), None, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (2, 5, False, (1, 1), None, [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]),
        (5, 3, False, (0, -1), None, [[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]]),
        (5, 3, False, (0, 0), None, [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]),
        (3, 3, False, (0, 0), 1, [[0, 1, 0], [0, 0, 1], [0, 0, 0]]),
        (3, 4, False, (1, 1), 0, [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]),  # top-left
        (2, 3, False, (-1, -1), None, [[1, 1, 1], [1, 1, 1]]),
    ],
)
def test_keep_mask_window_explicit(Nq, Nk, causal, window, diag_offset, expected):
    got = keep_mask(Nq, Nk, causal, diag_offset, window_size=window)
    assert torch.equal(got, torch.tensor(expected, dtype=torch.bool))


def test_causal_is_window_right_zero():
    for Nq, Nk in ((7, 12), (12, 7), (9, 9)):
        for left in (-1, 0, 3):
            want = keep_mask(Nq, Nk, False, window_size=(left, 0))
            assert torch.equal(keep_mask(Nq, Nk, True, window_size=(left, -1)), want)
            assert torch.equal(keep_mask(Nq, Nk, True, window_size=(left, 5)), want)
        assert torch.equal(keep_mask(Nq, Nk, True, window_size=(-1, -1)), keep_mask(Nq, Nk, True))


def by_rows(Q, K, V, scale, *, causal=False, window=(-1, -1), softcap=0.0, slopes=None,
            mask=None, dropout_p=0.0, keep=None):
    """Attention one row at a time in Python floats, straight from the definitions."""
    B, H, Nq, D = Q.shape
    Nk, group = K.shape[-2], H // K.shape[1]
    left, right = (window[0], 0) if causal else window
    O = torch.zeros(B, H, Nq, D, dtype=F64)
    LSE = torch.full((B, H, Nq), float("-inf"), dtype=F64)
    P = torch.zeros(B, H, Nq, Nk, dtype=F64)
    for b, h, i in itertools.product(range(B), range(H), range(Nq)):
        kv, diag = h // group, i + Nk - Nq
        js = [j for j in range(Nk) if (left < 0 or j >= diag - left)
              and (right < 0 or j <= diag + right) and (mask is None or bool(mask[b, h, i, j]))]
        if not js:
            continue
        s = [scale * float(Q[b, h, i] @ K[b, kv, j]) for j in js]
        if softcap > 0:
            s = [softcap * math.tanh(x / softcap) for x in s]
        if slopes is not None:
            slope = float(slopes[h] if slopes.dim() == 1 else slopes[b, h])
            s = [x - slope * abs(diag - j) for x, j in zip(s, js)]
        lse = max(s) + math.log(sum(math.exp(x - max(s)) for x in s))
        LSE[b, h, i] = lse
        for j, x in zip(js, s):
            p = math.exp(x - lse)
            if keep is not None:
                p = p / (1 - dropout_p) if bool(keep[b, h, i, j]) else 0.0
            P[b, h, i, j] = p
            O[b, h, i] += p * V[b, kv, j]
    return O, LSE, P


def feature_inputs(case, Nq, Nk, H, Hk):
    """Q, K, V (H_k key/value heads) and attention_naive's keywords for a named case."""
    Q = torch.randn(B, H, Nq, D, dtype=F64)
    K, V = (torch.randn(B, Hk, Nk, D, dtype=F64) for _ in range(2))
    kw = {}
    if "window" in case:
        kw["window_size"] = (3, 1)
    if "softcap" in case:
        kw["softcap"] = 2.0
    if "alibi" in case:
        kw["alibi_slopes"] = torch.rand(B, H, dtype=F64) if "alibi2" in case else torch.rand(H)
    if "mask" in case:
        kw["mask"] = torch.rand(B, H, Nq, Nk) < 0.7
    if "dropout" in case:
        kw["dropout_p"], kw["dropout_keep"] = 0.25, torch.rand(B, H, Nq, Nk) < 0.75
    return Q, K, V, kw


FEATURE_CASES = [  # (case, Nq, Nk, H, Hk, causal)
    ("window", 6, 9, 2, 2, False),
    ("window", 9, 6, 2, 2, True),
    ("softcap", 5, 7, 2, 2, False),
    ("alibi", 7, 5, 2, 2, False),
    ("alibi2", 5, 7, 2, 2, True),
    ("gqa", 5, 7, 4, 2, False),
    ("mqa", 5, 7, 4, 1, True),
    ("mask", 6, 8, 2, 2, False),
    ("dropout", 6, 8, 2, 2, False),
    ("window+softcap+alibi+gqa", 8, 6, 4, 2, False),
    ("mask+dropout+alibi2+causal", 7, 7, 2, 1, True),
]


@pytest.mark.parametrize("case,Nq,Nk,H,Hk,causal", FEATURE_CASES, ids=[
    f"{c[0]}-{c[1]}x{c[2]}-H{c[3]}:{c[4]}{'-causal' if c[5] else ''}" for c in FEATURE_CASES])
def test_features_match_row_by_row(case, Nq, Nk, H, Hk, causal):
    Q, K, V, kw = feature_inputs(case, Nq, Nk, H, Hk)
    scale = 0.9
    O, LSE, P = attention_naive(Q, K, V, scale, causal, dtype=F64, return_probs=True, **kw)
    want = by_rows(Q, K, V, scale, causal=causal, window=kw.get("window_size", (-1, -1)),
                   softcap=kw.get("softcap", 0.0), slopes=kw.get("alibi_slopes"),
                   mask=kw.get("mask"), dropout_p=kw.get("dropout_p", 0.0),
                   keep=kw.get("dropout_keep"))
    for name, got, ref in zip(("O", "LSE", "P"), (O, LSE, P), want):
        assert got.dtype == F64 and got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, **TOL, msg=name)  # -inf in the same places


def test_softcap_formula():
    Q, K, V, _ = inputs(9, 11)
    scale, cap = 0.8, 1.5
    _, LSE, P = attention_naive(Q, K, V, scale, softcap=cap, dtype=F64, return_probs=True)
    S = cap * torch.tanh(scale * (Q @ K.transpose(-2, -1)) / cap)
    assert bool((S.abs() < cap).all())
    torch.testing.assert_close(P, torch.softmax(S, -1), **TOL)
    torch.testing.assert_close(LSE, torch.logsumexp(S, -1), **TOL)
    # a cap far above every score changes nothing (tanh(x) = x - x³/3 + ...)
    O_far, _ = attention_naive(Q, K, V, scale, softcap=1e7, dtype=F64)
    torch.testing.assert_close(O_far, attention_naive(Q, K, V, scale, dtype=F64)[0],
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_bias_matrix(per_batch):
    """Q = 0: every score is 0, so P = softmax(bias) with the bias written out."""
    Nq, Nk = 2, 4  # diag_offset 2: the diagonal of row i is key i + 2
    dist = torch.tensor([[2, 1, 0, 1], [3, 2, 1, 0]], dtype=F64)
    slopes = torch.tensor([[0.5, 0.25, 2.0], [1.0, 0.0, 3.0]], dtype=F64)[:, :H]  # (B, H)
    if not per_batch:
        slopes = slopes[0]
    Q = torch.zeros(B, H, Nq, D, dtype=F64)
    _, K, V, _ = inputs(Nq, Nk)
    _, LSE, P = attention_naive(Q, K, V, alibi_slopes=slopes, dtype=F64, return_probs=True)
    s = slopes if per_batch else slopes.expand(B, H)
    bias = -s[:, :, None, None] * dist  # (B, H, Nq, Nk)
    torch.testing.assert_close(P, torch.softmax(bias, -1), **TOL)
    torch.testing.assert_close(LSE, torch.logsumexp(bias, -1), **TOL)
    # top-left alignment: the diagonal of row i is key i
    _, _, P0 = attention_naive(Q, K, V, diag_offset=0, alibi_slopes=slopes, dtype=F64,
                               return_probs=True)
    dist0 = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2]], dtype=F64)
    torch.testing.assert_close(P0, torch.softmax(-s[:, :, None, None] * dist0, -1), **TOL)


@pytest.mark.parametrize("Hk", [1, 2])
def test_gqa_equals_each_query_head_with_its_kv_head(Hk):
    H, Nq, Nk = 4, 7, 10
    Q, dO = torch.randn(B, H, Nq, D, dtype=F64), torch.randn(B, H, Nq, D, dtype=F64)
    K, V = (torch.randn(B, Hk, Nk, D, dtype=F64) for _ in range(2))
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    O, LSE = attention_naive(Qr, Kr, Vr, causal=True, dtype=F64)
    dQ, dK, dV = torch.autograd.grad(O, (Qr, Kr, Vr), dO)
    assert dK.shape == K.shape and dV.shape == V.shape
    dK_sum, dV_sum = torch.zeros_like(K), torch.zeros_like(V)
    for h in range(H):
        kv = h // (H // Hk)
        q, k, v = (t.clone().requires_grad_() for t in (Q[:, h:h + 1], K[:, kv:kv + 1],
                                                         V[:, kv:kv + 1]))
        o, lse = attention_naive(q, k, v, causal=True, dtype=F64)
        torch.testing.assert_close(O[:, h:h + 1], o, **TOL)
        torch.testing.assert_close(LSE[:, h:h + 1], lse, **TOL)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), dO[:, h:h + 1])
        torch.testing.assert_close(dQ[:, h:h + 1], dq, **TOL)
        dK_sum[:, kv:kv + 1] += dk
        dV_sum[:, kv:kv + 1] += dv
    torch.testing.assert_close(dK, dK_sum, **TOL)
    torch.testing.assert_close(dV, dV_sum, **TOL)


def test_dropout_scaling():
    Q, K, V, _ = inputs(13, 17)
    p = 0.3
    keep = torch.rand(B, H, 13, 17) >= p
    O, LSE, P = attention_naive(Q, K, V, causal=True, dtype=F64, return_probs=True)
    Od, LSEd, Pd = attention_naive(Q, K, V, causal=True, dtype=F64, dropout_p=p,
                                   dropout_keep=keep, return_probs=True)
    assert torch.equal(LSEd, LSE)  # the softmax is taken before dropout
    assert torch.equal(Pd[keep], P[keep] / (1 - p))
    assert bool((Pd[~keep] == 0).all())
    torch.testing.assert_close(Od, Pd @ V, **TOL)
    everything = torch.ones(B, H, 13, 17, dtype=torch.bool)  # keep all: P / (1 - p)
    O_all, _ = attention_naive(Q, K, V, causal=True, dtype=F64, dropout_p=p,
                               dropout_keep=everything)
    torch.testing.assert_close(O_all, O / (1 - p), **TOL)
    with pytest.raises(ValueError, match="dropout_keep"):
        attention_naive(Q, K, V, dropout_p=p)


@pytest.mark.parametrize("causal", [False, True])
def test_return_probs(causal):
    Nq, Nk = 37, 21  # causal bottom-right: rows 0..15 see nothing
    Q, K, V, _ = inputs(Nq, Nk)
    O, LSE, P = attention_naive(Q, K, V, causal=causal, window_size=(8, -1), dtype=F64,
                                return_probs=True)
    torch.testing.assert_close(O, P @ V, **TOL)
    assert bool((P[..., ~keep_mask(Nq, Nk, causal, window_size=(8, -1))] == 0).all())
    sees = (LSE > float("-inf")).to(F64)
    torch.testing.assert_close(P.sum(-1), sees, **TOL)
    O32, LSE32, P32 = attention_naive(Q.float(), K.float(), V.float(), causal=causal,
                                      return_probs=True)
    assert (O32.dtype, LSE32.dtype, P32.dtype) == (torch.float32,) * 3
    O16, _, P16 = attention_naive(Q.half(), K.half(), V.half(), return_probs=True)
    assert (O16.dtype, P16.dtype) == (torch.float16, torch.float32)  # softmax in float32


def test_user_mask_and_empty_rows():
    Nq, Nk = 12, 10
    Q, K, V, dO = inputs(Nq, Nk)
    mask = torch.rand(B, 1, Nq, Nk) < 0.5  # broadcast over heads
    mask[:, :, 3] = False  # row 3 sees nothing, whatever else
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    O, LSE, P = attention_naive(Qr, Kr, Vr, causal=True, mask=mask, dtype=F64, return_probs=True)
    both = mask & keep_mask(Nq, Nk, True)
    O2, LSE2 = attention_naive(Q, K, V, mask=both, dtype=F64)
    torch.testing.assert_close(O.detach(), O2, **TOL)
    torch.testing.assert_close(LSE.detach(), LSE2, **TOL)
    empty = ~both.any(-1).expand(B, H, Nq)  # rows 0, 1 (causal) and 3, and any unlucky one
    assert bool(empty[:, :, 3].all())
    assert bool((O[empty] == 0).all()) and bool((LSE[empty] == float("-inf")).all())
    assert bool((P[empty] == 0).all()) and not bool(P.isnan().any())
    grads = torch.autograd.grad(O, (Qr, Kr, Vr), dO)
    assert all(bool(g.isfinite().all()) for g in grads)
    assert bool((grads[0][empty] == 0).all())


@pytest.mark.parametrize("case", ["window+softcap+alibi2+gqa", "mask+dropout+alibi+mqa"])
def test_gradcheck_features(case):
    Q, K, V, kw = feature_inputs(case, 4, 5, 2, 1 if "mqa" in case else 2)
    Q, K, V = (t[:1, ..., :3].clone().requires_grad_() for t in (Q, K, V))  # B = 1, D = 3
    kw = {n: (t[:1] if isinstance(t, torch.Tensor) and t.dim() > 1 else t) for n, t in kw.items()}

    def f(Q, K, V):  # O only: a masked-out row's lse is -inf, which finite differences cannot take
        return attention_naive(Q, K, V, 0.7, dtype=F64, **kw)[0]

    assert torch.autograd.gradcheck(f, (Q, K, V), eps=1e-6, atol=1e-8, rtol=1e-6)
