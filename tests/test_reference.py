"""Tests of flashtile.reference itself: the tiled algorithm against the materialized one, the
materialized one against autograd, torch's SDPA and finite differences, and the mask."""

from __future__ import annotations

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
