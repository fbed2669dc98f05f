"""Numerical checks of every identity stated in docs/derivation.md, in float64 on the CPU.

One test per identity; the document names the test that checks each of its lines. Inputs are
fresh standard-normal tensors from torch's generator, which tests/conftest.py seeds per test
(FLASHTILE_TEST_SEED replays a session); tolerances are float64-tight.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from flashtile.reference import (
    LOG2E,
    alibi_bias,
    attention_naive,
    attention_tiled_backward,
    attention_tiled_forward,
    keep_mask,
)

F64 = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-12}  # the quantities compared below are O(1)


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=F64)


def qkv(B: int, H: int, Nq: int, Nk: int, D: int) -> tuple[torch.Tensor, ...]:
    return (
        randn(B, H, Nq, D),
        randn(B, H, Nk, D),
        randn(B, H, Nk, D),
        randn(B, H, Nq, D),
    )


# §1 -- Jacobian of Y = X W ------------------------------------------------------------------


def test_matmul_jacobian_is_block_diagonal():
    X, W = randn(2, 3), randn(3, 4)  # the notes' sizes
    JX = jacobian(lambda X: X @ W, X).reshape(2 * 4, 2 * 3)  # rows (i, a), columns (k, b)
    JW = jacobian(lambda W: X @ W, W).reshape(2 * 4, 3 * 4)  # rows (i, a), columns (b, c)
    torch.testing.assert_close(
        JX, torch.kron(torch.eye(2, dtype=F64), W.T.contiguous()), rtol=0, atol=0
    )
    torch.testing.assert_close(JW, torch.kron(X, torch.eye(4, dtype=F64)), rtol=0, atol=0)
    assert JX.numel() == 48 and X.numel() == 6  # the Jacobian is much bigger than dX


def test_matmul_vjp_without_jacobian():
    X, W, dY = randn(5, 3), randn(3, 4), randn(5, 4)
    JX = jacobian(lambda X: X @ W, X)  # (5, 4, 5, 3)
    JW = jacobian(lambda W: X @ W, W)  # (5, 4, 3, 4)
    dX_jac = torch.einsum("ia,iakb->kb", dY, JX)  # dY · ∂Y/∂X, through the full Jacobian
    dW_jac = torch.einsum("ia,iabc->bc", dY, JW)
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    (Xr @ Wr).backward(dY)
    for got in (dX_jac, Xr.grad):
        torch.testing.assert_close(got, dY @ W.T, **TOL)
    for got in (dW_jac, Wr.grad):
        torch.testing.assert_close(got, X.T @ dY, **TOL)


# §2 -- Jacobian of the softmax --------------------------------------------------------------


def test_softmax_jacobian():
    s = randn(7, scale=2.0)
    p = torch.softmax(s, -1)
    J = jacobian(lambda s: torch.softmax(s, -1), s)  # J[j, k] = ∂p_j / ∂s_k
    torch.testing.assert_close(J, torch.diag(p) - torch.outer(p, p), **TOL)
    # the notes' two cases: j == k gives p_j (1 - p_j), j != k gives -p_j p_k
    torch.testing.assert_close(J.diagonal(), p * (1 - p), **TOL)
    torch.testing.assert_close(J[2, 5], -p[2] * p[5], **TOL)


def test_softmax_jacobian_symmetric_and_shift_invariant():
    p = torch.softmax(randn(9, scale=3.0), -1)
    J = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(J, J.T, rtol=0, atol=0)
    torch.testing.assert_close(J @ torch.ones(9, dtype=F64), torch.zeros(9, dtype=F64), **TOL)
    s = randn(9)
    torch.testing.assert_close(torch.softmax(s + 123.4, -1), torch.softmax(s, -1), **TOL)


def test_softmax_vjp():
    S, dP = randn(6, 11, scale=2.0), randn(6, 11)
    P = torch.softmax(S, -1)
    via_jacobian = torch.stack(
        [(torch.diag(P[i]) - torch.outer(P[i], P[i])) @ dP[i] for i in range(6)]
    )
    closed_form = P * (dP - (P * dP).sum(-1, keepdim=True))
    Sr = S.clone().requires_grad_()
    torch.softmax(Sr, -1).backward(dP)
    torch.testing.assert_close(closed_form, via_jacobian, **TOL)
    torch.testing.assert_close(closed_form, Sr.grad, **TOL)


# §4 -- the backward, line by line -----------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_backward_closed_forms_match_autograd(causal):
    Q, K, V, dO = qkv(2, 3, 10, 13, 8)  # Nq <= Nk: every row sees a key (see §10)
    scale = 0.37
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    S = scale * Qr @ Kr.transpose(-2, -1)
    S = S.masked_fill(~keep_mask(10, 13, causal), float("-inf"))
    S.retain_grad()
    Pr = torch.softmax(S, -1)
    Pr.retain_grad()
    (Pr @ Vr).backward(dO)  # φ = Σ O ∘ dO, so ∂φ/∂O = dO
    P = Pr.detach()
    dP = dO @ V.transpose(-2, -1)
    dS = P * (dP - (P * dP).sum(-1, keepdim=True))
    torch.testing.assert_close(Vr.grad, P.transpose(-2, -1) @ dO, **TOL)  # dV = Pᵀ dO
    torch.testing.assert_close(Pr.grad, dP, **TOL)  # dP = dO Vᵀ
    torch.testing.assert_close(dS, S.grad, **TOL)  # dS = P ∘ (dP − rowsum(P ∘ dP))
    torch.testing.assert_close(Qr.grad, scale * dS @ K, **TOL)  # dQ = scale dS K
    torch.testing.assert_close(Kr.grad, scale * dS.transpose(-2, -1) @ Q, **TOL)  # dK


# §5 -- Delta ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_delta_identity(causal):
    Q, K, V, dO = qkv(2, 2, 21, 15, 6)
    O, lse = attention_naive(Q, K, V, causal=causal, dtype=F64)
    S = Q @ K.transpose(-2, -1) / math.sqrt(6)
    P = torch.exp(S - lse[..., None]).masked_fill(~keep_mask(21, 15, causal), 0.0)
    dP = dO @ V.transpose(-2, -1)
    torch.testing.assert_close((P * dP).sum(-1), (dO * O).sum(-1), **TOL)


# §6 -- online softmax ------------------------------------------------------------------------


def online_softmax(s: torch.Tensor, v: torch.Tensor, sizes: list[int], check_invariant: bool):
    """One row of scores s (N,) and values v (N, D), read in blocks of the given sizes."""
    m, l, acc = torch.tensor(float("-inf"), dtype=F64), torch.tensor(0.0, dtype=F64), 0 * v[0]
    end = 0
    for size in sizes:
        blk = slice(end, end + size)
        end += size
        m_new = torch.maximum(m, s[blk].max())
        alpha = torch.exp(m - m_new)
        p = torch.exp(s[blk] - m_new)
        l = alpha * l + p.sum()
        acc = alpha * acc + p @ v[blk]
        m = m_new
        if check_invariant:  # the state is the softmax of the prefix, kept under its max
            torch.testing.assert_close(m, s[:end].max(), rtol=0, atol=0)
            torch.testing.assert_close(l, torch.exp(s[:end] - m).sum(), **TOL)
            torch.testing.assert_close(acc, torch.exp(s[:end] - m) @ v[:end], **TOL)
    return m, l, acc


@pytest.mark.parametrize("sizes", [[40], [1] * 40, [16, 16, 8], [3, 17, 1, 9, 10], [8, 8, 8, 8, 8]])
@pytest.mark.parametrize("increasing", [False, True])
def test_online_softmax_invariant(sizes, increasing):
    s, v = randn(40, scale=10.0), randn(40, 5)
    if increasing:  # the max changes at every block: every step rescales
        s = s.sort().values
    m, l, acc = online_softmax(s, v, sizes, check_invariant=True)
    torch.testing.assert_close(acc / l, torch.softmax(s, -1) @ v, **TOL)
    torch.testing.assert_close(m + torch.log(l), torch.logsumexp(s, -1), **TOL)
    assert 1.0 <= l.item() <= 40.0  # the max term contributes exactly exp(0) = 1


# §7 -- lse is all the backward needs ----------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_p_recomputed_from_lse(causal):
    Q, K, V, _ = qkv(2, 2, 29, 33, 16)
    S = (Q @ K.transpose(-2, -1) / 4.0).masked_fill(~keep_mask(29, 33, causal), float("-inf"))
    P = torch.softmax(S, -1)
    _, lse_naive = attention_naive(Q, K, V, causal=causal, dtype=F64)
    _, lse_tiled = attention_tiled_forward(Q, K, V, causal=causal, BLOCK_M=16, BLOCK_N=16)
    for lse in (lse_naive, lse_tiled):
        torch.testing.assert_close(torch.exp(S - lse[..., None]), P, **TOL)


# §8 -- base 2, scale folded in ----------------------------------------------------------------


def test_exp2_scale_folding():
    x, scale = randn(1000, scale=5.0), 0.125
    assert abs(LOG2E - 1.0 / math.log(2.0)) < 1e-15
    torch.testing.assert_close(
        torch.exp2(x * (scale * LOG2E)), torch.exp(x * scale), rtol=1e-14, atol=0
    )


def test_lse_from_base2_state():
    s, scale = randn(4, 50, scale=3.0), 0.3  # raw scores q·k
    qk = s * (scale * LOG2E)  # what the kernel holds: scores in log2 units
    m2 = qk.amax(-1)
    l = torch.exp2(qk - m2[:, None]).sum(-1)
    lse = (m2 + torch.log2(l)) / LOG2E  # == (m2 + log2 l) · ln 2
    torch.testing.assert_close(lse, torch.logsumexp(scale * s, -1), **TOL)
    torch.testing.assert_close(m2 / LOG2E, (scale * s).amax(-1), **TOL)  # m2 = m · log2 e
    # the backward's recomputation in base 2: exp2(qk − lse · log2 e) == softmax
    p = torch.exp2(qk - (lse * LOG2E)[:, None])
    torch.testing.assert_close(p, torch.softmax(scale * s, -1), **TOL)


@pytest.mark.parametrize("M", [1.0, 16.0, 64.0])
def test_recompute_error_scales_with_score(M):
    """Recomputing p = exp2(qk − lse2) in float32: the inputs' roundoff, eps/2 · (|qk| + |lse2|),
    becomes a relative error of p (times ln 2 < 1), on top of exp2's own few eps."""
    eps = torch.finfo(torch.float32).eps
    qk = randn(64, 256)
    qk = M * qk / qk.abs().amax(-1, keepdim=True)  # scores in log2 units, max |qk| = M per row
    lse2 = torch.logsumexp(qk / LOG2E, -1) * LOG2E  # exact, in log2 units
    p = torch.exp2(qk - lse2[:, None])
    p32 = torch.exp2(qk.float() - lse2.float()[:, None]).double()
    rel = (p32 - p).abs() / p
    bound = eps * (qk.abs() + lse2.abs()[:, None] + 2.0)
    assert bool((rel <= bound).all())
    if M == 64.0:
        assert rel.max().item() > 4 * eps  # the error does grow with |qk|, beyond a few eps


# §9 -- masked blocks can be skipped ----------------------------------------------------------


def online_step(m_i, l_i, acc, qk, v):
    """One key block of the forward kernel, exactly as in reference.attention_tiled_forward."""
    m_ij = torch.maximum(m_i, qk.amax(-1))
    m_safe = torch.where(m_ij == float("-inf"), 0.0, m_ij)
    p = torch.exp2(qk - m_safe[..., None])
    alpha = torch.exp2(m_i - m_safe)
    return m_ij, l_i * alpha + p.sum(-1), acc * alpha[..., None] + p @ v


def test_masked_block_update_is_identity():
    m_i = randn(6)
    m_i[:2] = float("-inf")  # two rows that have seen nothing yet
    l_i = torch.exp(randn(6)) + 1.0
    l_i[:2] = 0.0
    acc = randn(6, 4)
    acc[:2] = 0.0
    qk = torch.full((6, 8), float("-inf"), dtype=F64)  # a fully masked block
    m_new, l_new, acc_new = online_step(m_i, l_i, acc, qk, randn(8, 4))
    assert torch.equal(m_new, m_i) and torch.equal(l_new, l_i) and torch.equal(acc_new, acc)


def tiled_forward_no_skip(Q, K, V, diag_offset, BLOCK_M, BLOCK_N):
    """attention_tiled_forward(causal=True) visiting every block, masked ones included."""
    B, H, Nq, D = Q.shape
    Nk = K.shape[-2]
    qk_scale = (1.0 / math.sqrt(D)) * LOG2E  # the same rounding as the reference
    O, LSE, masked_blocks = torch.empty_like(Q), torch.empty(B, H, Nq, dtype=F64), 0
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = torch.arange(start_m, min(start_m + BLOCK_M, Nq))
        m_i = torch.full((B, H, len(offs_m)), float("-inf"), dtype=F64)
        l_i, acc = torch.zeros_like(m_i), torch.zeros(B, H, len(offs_m), D, dtype=F64)
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = torch.arange(start_n, min(start_n + BLOCK_N, Nk))
            qk = (Q[:, :, offs_m] @ K[:, :, offs_n].transpose(-2, -1)) * qk_scale
            masked = offs_n[None, :] > offs_m[:, None] + diag_offset
            masked_blocks += bool(masked.all())
            qk = qk.masked_fill(masked, float("-inf"))
            m_i, l_i, acc = online_step(m_i, l_i, acc, qk, V[:, :, offs_n])
        l_safe = torch.where(l_i == 0, 1.0, l_i)
        O[:, :, offs_m] = acc / l_safe[..., None]
        LSE[:, :, offs_m] = torch.where(l_i == 0, float("-inf"), (m_i + torch.log2(l_safe)) / LOG2E)
    return O, LSE, masked_blocks


def tiled_backward_no_skip(Q, K, V, O, dO, LSE, diag_offset, BLOCK_M, BLOCK_N):
    """attention_tiled_backward(causal=True) visiting every block, masked ones included."""
    Nq, D, Nk = Q.shape[-2], Q.shape[-1], K.shape[-2]
    scale = 1.0 / math.sqrt(D)
    qk_scale = scale * LOG2E  # the same rounding as the reference
    Delta = (dO * O).sum(-1)
    LSE2 = torch.where(LSE == float("-inf"), float("inf"), LSE * LOG2E)
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    blocks = [(m, n) for n in range(0, Nk, BLOCK_N) for m in range(0, Nq, BLOCK_M)]
    for pass_ in ("dkdv", "dq"):
        for start_m, start_n in blocks if pass_ == "dkdv" else sorted(blocks):
            offs_m = torch.arange(start_m, min(start_m + BLOCK_M, Nq))
            offs_n = torch.arange(start_n, min(start_n + BLOCK_N, Nk))
            q, k, v = Q[:, :, offs_m], K[:, :, offs_n], V[:, :, offs_n]
            qk = (q @ k.transpose(-2, -1)) * qk_scale
            p = torch.exp2(qk - LSE2[:, :, offs_m, None])
            p = p.masked_fill(offs_n[None, :] > offs_m[:, None] + diag_offset, 0.0)
            ds = p * (dO[:, :, offs_m] @ v.transpose(-2, -1) - Delta[:, :, offs_m, None])
            if pass_ == "dkdv":
                dV[:, :, offs_n] += p.transpose(-2, -1) @ dO[:, :, offs_m]
                dK[:, :, offs_n] += ds.transpose(-2, -1) @ q
            else:
                dQ[:, :, offs_m] += ds @ k
    return dQ * scale, dK * scale, dV


def kept_block_area(Nq, Nk, diag_offset, BLOCK_M, BLOCK_N):
    """Σ |block| over the (query block, key block) pairs with at least one kept entry."""
    keep = keep_mask(Nq, Nk, True, diag_offset)
    return sum(
        min(BLOCK_M, Nq - m) * min(BLOCK_N, Nk - n)
        for m in range(0, Nq, BLOCK_M)
        for n in range(0, Nk, BLOCK_N)
        if keep[m : m + BLOCK_M, n : n + BLOCK_N].any()
    )


SKIP_CASES = [(65, 65, None), (17, 65, None), (65, 17, None), (40, 70, 0), (70, 40, 0)]


@pytest.mark.parametrize("Nq,Nk,diag_offset", SKIP_CASES)
def test_forward_block_skipping_is_exact(Nq, Nk, diag_offset):
    Q, K, V, _ = qkv(2, 2, Nq, Nk, 8)
    off = Nk - Nq if diag_offset is None else diag_offset
    O_ref, LSE_ref = attention_tiled_forward(Q, K, V, None, True, diag_offset, 16, 32)
    O, LSE, masked_blocks = tiled_forward_no_skip(Q, K, V, off, 16, 32)
    assert masked_blocks > 0
    assert torch.equal(O, O_ref) and torch.equal(LSE, LSE_ref)  # bit for bit
    with FlopCounterMode(display=False) as fc:  # the reference skips exactly the masked blocks
        attention_tiled_forward(Q, K, V, None, True, diag_offset, 16, 32)
    assert fc.get_total_flops() == 2 * 2 * 4 * 8 * kept_block_area(Nq, Nk, off, 16, 32)


@pytest.mark.parametrize("Nq,Nk,diag_offset", SKIP_CASES)
def test_backward_block_skipping_is_exact(Nq, Nk, diag_offset):
    Q, K, V, dO = qkv(2, 2, Nq, Nk, 8)
    off = Nk - Nq if diag_offset is None else diag_offset
    O, LSE = attention_tiled_forward(Q, K, V, None, True, diag_offset, 16, 32)
    ref = attention_tiled_backward(Q, K, V, O, dO, LSE, None, True, diag_offset, 16, 32)
    got = tiled_backward_no_skip(Q, K, V, O, dO, LSE, off, 16, 32)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)  # bit for bit: a masked block adds exact zeros
    with FlopCounterMode(display=False) as fc:
        attention_tiled_backward(Q, K, V, O, dO, LSE, None, True, diag_offset, 16, 32)
    assert fc.get_total_flops() == 2 * 2 * 14 * 8 * kept_block_area(Nq, Nk, off, 16, 32)


# §10 -- rows that see nothing ----------------------------------------------------------------


def test_fully_masked_rows_forward():
    Q, K, V, _ = qkv(2, 2, 40, 17, 8)  # bottom-right causal: rows 0..22 see no key
    for O, LSE in (
        attention_naive(Q, K, V, causal=True, dtype=F64),
        attention_tiled_forward(Q, K, V, causal=True, BLOCK_M=16, BLOCK_N=16),
    ):
        assert torch.equal(O[:, :, :23], torch.zeros_like(O[:, :, :23]))
        assert bool((LSE[:, :, :23] == float("-inf")).all())
        assert bool(LSE[:, :, 23:].isfinite().all()) and bool((O[:, :, 23:] != 0).all())


def test_fully_masked_rows_backward():
    Q, K, V, dO = qkv(2, 2, 40, 17, 8)
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    attention_naive(Qr, Kr, Vr, causal=True, dtype=F64)[0].backward(dO)
    O, LSE = attention_tiled_forward(Q, K, V, causal=True, BLOCK_M=16, BLOCK_N=16)
    dQ, dK, dV = attention_tiled_backward(Q, K, V, O, dO, LSE, None, True, None, 16, 16)
    assert torch.equal((dO * O).sum(-1)[:, :, :23], torch.zeros(2, 2, 23, dtype=F64))  # Delta
    assert torch.equal(dQ[:, :, :23], torch.zeros_like(dQ[:, :, :23]))
    assert torch.equal(Qr.grad[:, :, :23], torch.zeros_like(dQ[:, :, :23]))
    for got, want in ((dQ, Qr.grad), (dK, Kr.grad), (dV, Vr.grad)):
        torch.testing.assert_close(got, want, **TOL)
    # the masked rows' dO does not reach dK, dV: changing it changes nothing
    dO2 = dO.clone()
    dO2[:, :, :23] = randn(2, 2, 23, 8)
    grads2 = attention_tiled_backward(Q, K, V, O, dO2, LSE, None, True, None, 16, 16)
    for a, b in zip(grads2, (dQ, dK, dV)):
        assert torch.equal(a, b)


def test_plus_inf_trick():
    qk = randn(3, 5)
    qk[0] = float("-inf")  # row 0 is fully masked; its lse is -inf
    lse2 = torch.tensor([float("-inf"), 0.5, -0.25], dtype=F64)
    fixed = torch.where(lse2 == float("-inf"), float("inf"), lse2)
    # mask applied to qk before exp2 (as in the forward): -inf - (-inf) = nan
    assert bool(torch.exp2(qk - lse2[:, None])[0].isnan().all())
    assert torch.equal(torch.exp2(qk - fixed[:, None])[0], torch.zeros(5, dtype=F64))
    # mask applied after exp2 (as in the reference backward): exp2(+inf) = inf, and inf · 0 = nan
    raw = randn(3, 5)
    assert bool(torch.exp2(raw - lse2[:, None])[0].isinf().all())
    assert torch.equal(torch.exp2(raw - fixed[:, None])[0], torch.zeros(5, dtype=F64))
    # the other rows are untouched
    torch.testing.assert_close(
        torch.exp2(qk - fixed[:, None])[1:], torch.exp2(qk - lse2[:, None])[1:]
    )


# §11 -- memory -------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any operation run under it."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_extra_memory_is_linear():
    B, H, N, D, BLOCK = 1, 2, 256, 16, 32
    Q, K, V, dO = qkv(B, H, N, N, D)
    with LargestTensor() as naive:
        attention_naive(Q, K, V, dtype=F64)
    with LargestTensor() as tiled:
        O, LSE = attention_tiled_forward(Q, K, V, BLOCK_M=BLOCK, BLOCK_N=BLOCK)
        attention_tiled_backward(Q, K, V, O, dO, LSE, BLOCK_M=BLOCK, BLOCK_N=BLOCK)
    assert naive.numel >= B * H * N * N  # S and P
    assert tiled.numel <= B * H * max(N * D, BLOCK * BLOCK)  # inputs, outputs, one tile
    assert LSE.shape == (B, H, N)  # what the forward keeps besides O: N numbers per head


# §12 -- FLOPs --------------------------------------------------------------------------------


def test_flop_counts():
    B, H, Nq, Nk, D = 2, 3, 48, 40, 8
    unit = B * H * Nq * Nk * D  # one (Nq × D) · (D × Nk) matmul is 2 · unit FLOPs
    Q, K, V, dO = qkv(B, H, Nq, Nk, D)
    with FlopCounterMode(display=False) as fwd:
        O, LSE = attention_tiled_forward(Q, K, V, BLOCK_M=16, BLOCK_N=16)
    with FlopCounterMode(display=False) as bwd:
        attention_tiled_backward(Q, K, V, O, dO, LSE, BLOCK_M=16, BLOCK_N=16)
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    On, _ = attention_naive(Qr, Kr, Vr, dtype=F64)
    with FlopCounterMode(display=False) as naive_bwd:
        On.backward(dO)
    assert fwd.get_total_flops() == 4 * unit  # 2 matmuls: q kᵀ and p v
    assert naive_bwd.get_total_flops() == 8 * unit  # 4 matmuls, P kept from the forward
    # FlashAttention's nominal backward: those 4 plus one recomputation of q kᵀ = 2.5 · forward
    assert (naive_bwd.get_total_flops() + 2 * unit) / fwd.get_total_flops() == 2.5
    assert bwd.get_total_flops() == 14 * unit  # two passes: 7 matmuls executed = 3.5 · forward


# §14 -- the algorithm: pass 1 with the key block as rows --------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_key_rows_pass_matches_autograd(causal):
    """Pass 1 as the Gluon dK/dV kernel writes it: sT = k qᵀ, pT = exp2(sT · qk_scale − lse₂)
    with lse₂ along the columns, dpT = v dOᵀ, dsT = pT ∘ (dpT − Δ), dV = pT dO,
    dK = scale · dsT q. The transposes of §14's lines, so dK and dV are autograd's."""
    Nq, Nk, scale = 11, 14, 0.29
    Q, K, V, dO = qkv(2, 2, Nq, Nk, 8)
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    S = (scale * Qr @ Kr.transpose(-2, -1)).masked_fill(~keep_mask(Nq, Nk, causal),
                                                        float("-inf"))
    O = torch.softmax(S, -1) @ Vr
    O.backward(dO)
    lse2 = torch.logsumexp(S.detach(), -1) * LOG2E  # (B, H, Nq)
    delta = (dO * O.detach()).sum(-1)  # §5
    sT = K @ Q.transpose(-2, -1)  # (B, H, Nk, Nq)
    pT = torch.exp2(sT * (scale * LOG2E) - lse2[..., None, :])
    pT = pT.masked_fill(~keep_mask(Nq, Nk, causal).transpose(-2, -1), 0.0)
    dpT = V @ dO.transpose(-2, -1)
    dsT = pT * (dpT - delta[..., None, :])
    torch.testing.assert_close(pT @ dO, Vr.grad, **TOL)  # dV
    torch.testing.assert_close(scale * dsT @ Q, Kr.grad, **TOL)  # dK


# §15 -- score modifications: softcap, ALiBi, masks, dropout, GQA --------------------------------


def vjp(f, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = dy · ∂f/∂x, by autograd."""
    xr = x.clone().requires_grad_()
    f(xr).backward(dy)
    return xr.grad


def test_softcap_jacobian():
    S, dS1, c = randn(5, 7, scale=4.0), randn(5, 7), 1.7
    cap = lambda S: c * torch.tanh(S / c)
    S1 = cap(S)
    J = jacobian(cap, S).reshape(35, 35)
    factor = 1 - (S1 / c) ** 2  # = 1 − tanh²(S/c), read off the capped score alone
    torch.testing.assert_close(J, torch.diag(factor.flatten()), **TOL)  # diagonal
    torch.testing.assert_close(factor, 1 - torch.tanh(S / c) ** 2, **TOL)
    torch.testing.assert_close(vjp(cap, S, dS1), dS1 * factor, **TOL)  # dS = dS¹ ∘ (1 − (S¹/c)²)
    assert bool((S1.abs() < c).all()) and bool((factor > 0).all())


def test_softcap_in_log2_units():
    S, c = randn(6, 9, scale=5.0), 2.5  # natural units
    c2, S2 = c * LOG2E, S * LOG2E  # what the kernel holds: qk = S · log2 e
    capped2 = c2 * torch.tanh(S2 / c2)
    torch.testing.assert_close(capped2, LOG2E * c * torch.tanh(S / c), **TOL)
    torch.testing.assert_close(1 - (capped2 / c2) ** 2, 1 - torch.tanh(S / c) ** 2, **TOL)
    lse = torch.logsumexp(c * torch.tanh(S / c), -1)
    p = torch.exp2(capped2 - (lse * LOG2E)[:, None])  # §7–§8 with the capped scores
    torch.testing.assert_close(p, torch.softmax(c * torch.tanh(S / c), -1), **TOL)


def test_softcap_before_mask():
    S, dP, c = randn(4, 6, scale=3.0), randn(4, 6), 1.5
    keep = torch.rand(4, 6) < 0.6
    keep[:, 0] = True
    S1 = c * torch.tanh(S / c)
    P = torch.softmax(S1.masked_fill(~keep, float("-inf")), -1)
    # capping after the mask would turn -inf into the finite -c: masked keys would get weight
    wrong = torch.softmax(c * torch.tanh(S.masked_fill(~keep, float("-inf")) / c), -1)
    assert bool((wrong[~keep] > 0).all()) and bool((P[~keep] == 0).all())
    # the backward's factor must come from the capped score before the mask
    ds1 = P * (dP - (P * dP).sum(-1, keepdim=True))
    S_masked = S1.masked_fill(~keep, float("-inf"))
    assert bool((ds1 * (1 - (S_masked / c) ** 2))[~keep].isnan().all())  # 0 · (−inf)
    ds = ds1 * (1 - (S1 / c) ** 2)
    assert torch.equal(ds[~keep], torch.zeros_like(ds[~keep]))
    chain = lambda S: torch.softmax((c * torch.tanh(S / c)).masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(vjp(chain, S, dP), ds, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_is_a_constant_bias(causal):
    Q, K, V, dO = qkv(1, 3, 9, 12, 8)
    scale, slopes = 0.3, torch.rand(3, dtype=F64)
    A = alibi_bias(slopes, 9, 12)  # (1, 3, 9, 12): −slope_h · |i + diag_offset − j|
    keep = keep_mask(9, 12, causal)
    Qr, Kr, Vr, Ar = (t.clone().requires_grad_() for t in (Q, K, V, A))
    S2 = scale * Qr @ Kr.transpose(-2, -1) + Ar
    S2.retain_grad()
    P = torch.softmax(S2.masked_fill(~keep, float("-inf")), -1)
    (P @ Vr).backward(dO)
    P = P.detach()
    dP = dO @ V.transpose(-2, -1)
    dS = P * (dP - (dO * (P @ V)).sum(-1, keepdim=True))  # §4–§5, P of the biased scores
    torch.testing.assert_close(S2.grad, dS, **TOL)
    torch.testing.assert_close(Ar.grad, dS, **TOL)  # ∂S²/∂S¹ = I: the same dS goes on to Q, K
    torch.testing.assert_close(Qr.grad, scale * dS @ K, **TOL)
    torch.testing.assert_close(Kr.grad, scale * dS.transpose(-2, -1) @ Q, **TOL)
    # were the slopes learned: d slope_h = −Σ_ij dS_hij · |i + off − j|
    sr = slopes.clone().requires_grad_()
    alibi_bias(sr, 9, 12).backward(dS)
    dist = (torch.arange(9)[:, None] + 3 - torch.arange(12)[None, :]).abs().to(F64)
    torch.testing.assert_close(sr.grad, -(dS * dist).sum((0, 2, 3)), **TOL)
    if causal:  # j ≤ i + off: the bias is −slope·(i + off) + slope·j, a row shift plus slope·j
        S = scale * Q @ K.transpose(-2, -1)
        off, j = 12 - 9, torch.arange(12, dtype=F64)
        row = -slopes[:, None] * (torch.arange(9, dtype=F64) + off)  # (3, 9)
        S_j = (S + slopes[:, None, None] * j).masked_fill(~keep, float("-inf"))
        torch.testing.assert_close(torch.softmax(S_j, -1), P, **TOL)  # §2: shift invariance
        lse = torch.logsumexp((S + A).masked_fill(~keep, float("-inf")), -1)
        torch.testing.assert_close(lse, torch.logsumexp(S_j, -1) + row, **TOL)  # lse moves


MASK_CASES = [  # Nq, Nk, diag_offset, window (left, right; negative = unbounded), user mask
    (10, 13, None, (-1, 0), False),  # causal
    (10, 13, None, (3, 2), False),  # sliding window
    (13, 10, 0, (-1, 4), False),  # top-left, right side only
    (11, 11, None, (2, -1), True),  # left side only, with a user mask
    (12, 15, None, (-1, -1), True),  # user mask only
]


def mask_for(Nq, Nk, diag_offset, window, user):
    keep = keep_mask(Nq, Nk, False, diag_offset, window_size=window)
    if user:
        user_mask = torch.rand(Nq, Nk) < 0.5
        off = Nk - Nq if diag_offset is None else diag_offset
        i = torch.arange(Nq)
        user_mask[i, (i + off).clamp(0, Nk - 1)] = True  # every row keeps at least one key
        keep = keep & user_mask
    assert bool(keep.any(-1).all())  # rows that see nothing are §10's business
    return keep


@pytest.mark.parametrize("Nq,Nk,diag_offset,window,user", MASK_CASES)
def test_masked_entries_get_no_gradient(Nq, Nk, diag_offset, window, user):
    keep = mask_for(Nq, Nk, diag_offset, window, user)
    S, dO, V = randn(2, Nq, Nk, scale=2.0), randn(2, Nq, 5), randn(2, Nk, 5)
    Sr = S.clone().requires_grad_()
    Sm = Sr.masked_fill(~keep, float("-inf"))
    Sm.retain_grad()
    P = torch.softmax(Sm, -1)
    (P @ V).backward(dO)
    P = P.detach()
    assert torch.equal(P[:, ~keep], torch.zeros_like(P[:, ~keep]))
    dP = dO @ V.transpose(-2, -1)
    dS = P * (dP - (dO * (P @ V)).sum(-1, keepdim=True))
    assert torch.equal(dS[:, ~keep], torch.zeros_like(dS[:, ~keep]))  # P = 0 there: exact zeros
    torch.testing.assert_close(Sm.grad, dS, **TOL)
    torch.testing.assert_close(Sr.grad, dS, **TOL)  # the mask's Jacobian: diag(keep)


def band_key_range(start_m, end_m, diag_offset, window, Nk, BLOCK_N):
    """Key blocks [lo, hi) that the query rows [start_m, end_m) see under the band mask."""
    left, right = (w if w >= 0 else 10**9 for w in window)
    first = max(0, start_m + diag_offset - left)
    hi = max(0, min(Nk, end_m - 1 + diag_offset + right + 1))
    return first - first % BLOCK_N, hi


def band_query_range(start_n, end_n, diag_offset, window, Nq, BLOCK_M):
    """Query blocks [lo, hi) that see the keys [start_n, end_n) under the band mask."""
    left, right = (w if w >= 0 else 10**9 for w in window)
    first = max(0, start_n - diag_offset - right)
    hi = max(0, min(Nq, end_n - 1 - diag_offset + left + 1))
    return first - first % BLOCK_M, hi


BAND_CASES = [  # Nq, Nk, diag_offset, window
    (65, 65, 0, (-1, 0)),
    (40, 70, 30, (5, 3)),
    (70, 40, -30, (-1, 4)),
    (50, 90, 40, (20, -1)),
    (90, 50, -40, (0, 0)),
    (33, 47, 14, (7, 9)),
]


@pytest.mark.parametrize("Nq,Nk,diag_offset,window", BAND_CASES)
def test_window_block_ranges_are_exact(Nq, Nk, diag_offset, window):
    keep = keep_mask(Nq, Nk, False, diag_offset, window_size=window)
    BM, BN = 16, 8
    for m in range(0, Nq, BM):
        lo, hi = band_key_range(m, min(m + BM, Nq), diag_offset, window, Nk, BN)
        seen = {n for n in range(0, Nk, BN) if keep[m : m + BM, n : n + BN].any()}
        assert set(range(lo, hi, BN)) == seen  # contiguous, and every block in it is needed
    for n in range(0, Nk, BN):
        lo, hi = band_query_range(n, min(n + BN, Nk), diag_offset, window, Nq, BM)
        seen = {m for m in range(0, Nq, BM) if keep[m : m + BM, n : n + BN].any()}
        assert set(range(lo, hi, BM)) == seen


def test_dropout_backward():
    S, V, dO, p_drop = randn(2, 8, 11, scale=2.0), randn(2, 11, 5), randn(2, 8, 5), 0.3
    Z = torch.rand(2, 8, 11) < 1 - p_drop  # the keep mask, Bernoulli(1 − p)
    zs = Z.to(F64) / (1 - p_drop)
    Sr, Vr = S.clone().requires_grad_(), V.clone().requires_grad_()
    P = torch.softmax(Sr, -1)
    P.retain_grad()
    P_drop = P * zs
    P_drop.retain_grad()
    O = P_drop @ Vr
    O.backward(dO)
    grad_P, grad_P_drop = P.grad, P_drop.grad
    P, P_drop, O = P.detach(), P_drop.detach(), O.detach()
    dP_drop = dO @ V.transpose(-2, -1)
    dP = dP_drop * zs
    Delta = (dO * O).sum(-1, keepdim=True)
    torch.testing.assert_close(Vr.grad, P_drop.transpose(-2, -1) @ dO, **TOL)  # dV = P_dropᵀ dO
    torch.testing.assert_close(grad_P_drop, dP_drop, **TOL)  # dP_drop = dO Vᵀ
    torch.testing.assert_close(grad_P, dP, **TOL)  # dP = dP_drop ∘ Z/(1 − p)
    torch.testing.assert_close(Delta, (P_drop * dP_drop).sum(-1, keepdim=True), **TOL)
    torch.testing.assert_close(Delta, (P * dP).sum(-1, keepdim=True), **TOL)
    dS = P * (dP - Delta)
    torch.testing.assert_close(Sr.grad, dS, **TOL)
    # a dropped entry still has a gradient: it moves the normalizer of its row
    torch.testing.assert_close(dS[~Z], (-P * Delta)[~Z], **TOL)
    assert bool((dS[~Z] != 0).all())


@pytest.mark.parametrize("sizes", [[30], [1] * 30, [8, 8, 8, 6], [3, 17, 1, 9]])
def test_dropout_online_softmax(sizes):
    s, v, p_drop = randn(30, scale=5.0), randn(30, 4), 0.25
    zs = (torch.rand(30) < 1 - p_drop).to(F64) / (1 - p_drop)
    m, l, acc = torch.tensor(float("-inf"), dtype=F64), torch.tensor(0.0, dtype=F64), 0 * v[0]
    end = 0
    for size in sizes:  # §6 with l summing p and acc summing p ∘ Z/(1 − p)
        blk = slice(end, end + size)
        end += size
        m_new = torch.maximum(m, s[blk].max())
        alpha, p = torch.exp(m - m_new), torch.exp(s[blk] - m_new)
        l, acc, m = alpha * l + p.sum(), alpha * acc + (p * zs[blk]) @ v[blk], m_new
    torch.testing.assert_close(acc / l, (torch.softmax(s, -1) * zs) @ v, **TOL)
    torch.testing.assert_close(m + torch.log(l), torch.logsumexp(s, -1), **TOL)  # Z-free


@pytest.mark.parametrize("H,H_k", [(6, 2), (4, 1), (3, 3)])
def test_gqa_grads_sum_over_group(H, H_k):
    group = H // H_k
    Q, dO = randn(2, H, 7, 8), randn(2, H, 7, 8)
    K, V = randn(2, H_k, 9, 8), randn(2, H_k, 9, 8)
    scale = 0.35
    Kr, Vr = K.clone().requires_grad_(), V.clone().requires_grad_()
    Kh, Vh = Kr.repeat_interleave(group, 1), Vr.repeat_interleave(group, 1)  # head h: h // group
    Kh.retain_grad()
    Vh.retain_grad()
    (torch.softmax(scale * Q @ Kh.transpose(-2, -1), -1) @ Vh).backward(dO)
    for h in range(H):
        assert torch.equal(Kh[:, h], K[:, h // group])
    # the sum of the Jacobian of the copy: dK_g = Σ_{h // group = g} dK_h
    torch.testing.assert_close(Kr.grad, Kh.grad.unflatten(1, (H_k, group)).sum(2), **TOL)
    torch.testing.assert_close(Vr.grad, Vh.grad.unflatten(1, (H_k, group)).sum(2), **TOL)
    # the dK/dV program of kv head g: accumulate over its query heads, scale once at the end
    for g in range(H_k):
        dk, dv = torch.zeros_like(K[:, g]), torch.zeros_like(V[:, g])
        for h in range(g * group, (g + 1) * group):
            P = torch.softmax(scale * Q[:, h] @ K[:, g].transpose(-2, -1), -1)
            dP = dO[:, h] @ V[:, g].transpose(-2, -1)
            dS = P * (dP - (dO[:, h] * (P @ V[:, g])).sum(-1, keepdim=True))
            dv += P.transpose(-2, -1) @ dO[:, h]
            dk += dS.transpose(-2, -1) @ Q[:, h]
        torch.testing.assert_close(dk * scale, Kr.grad[:, g], **TOL)
        torch.testing.assert_close(dv, Vr.grad[:, g], **TOL)


def modified_tiles(Q, K, V, keep, Z, opts, BLOCK_M, BLOCK_N):
    """The tile recipe of §15.7 for one batch: Q (H, Nq, D), K, V (H_k, Nk, D), keep (H, Nq, Nk),
    Z (H, Nq, Nk) bool or None. Returns tile(h, offs_m, offs_n): the tensors of one tile."""
    scale, c, A = opts["scale"], opts["softcap"], opts["alibi"]
    zs = None if Z is None else Z.to(F64) / (1 - opts["dropout_p"])
    group = Q.shape[0] // K.shape[0]

    def tile(h, offs_m, offs_n):
        q, k, v = Q[h, offs_m], K[h // group, offs_n], V[h // group, offs_n]
        s = scale * q @ k.T
        t = torch.tanh(s / c) if c > 0 else None
        if c > 0:
            s = c * t
        if A is not None:
            s = s + A[h][offs_m][:, offs_n]
        kept = keep[h][offs_m][:, offs_n]
        qk = s.masked_fill(~kept, float("-inf")) * LOG2E  # log2 units, as §8
        z = torch.ones_like(qk) if zs is None else zs[h][offs_m][:, offs_n]
        return q, k, v, qk, t, z, bool(kept.any())

    return tile


def modified_forward(Q, K, V, keep, Z, opts, BLOCK_M, BLOCK_N, skip):
    H, Nq, D = Q.shape
    Nk = K.shape[1]
    tile = modified_tiles(Q, K, V, keep, Z, opts, BLOCK_M, BLOCK_N)
    O, LSE, skipped = torch.empty_like(Q), torch.empty(H, Nq, dtype=F64), 0
    for h in range(H):
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = torch.arange(start_m, min(start_m + BLOCK_M, Nq))
            m_i = torch.full((len(offs_m),), float("-inf"), dtype=F64)
            l_i, acc = torch.zeros_like(m_i), torch.zeros(len(offs_m), D, dtype=F64)
            for start_n in range(0, Nk, BLOCK_N):
                offs_n = torch.arange(start_n, min(start_n + BLOCK_N, Nk))
                _, _, v, qk, _, z, any_kept = tile(h, offs_m, offs_n)
                if skip and not any_kept:
                    skipped += 1
                    continue
                m_ij = torch.maximum(m_i, qk.amax(-1))
                m_safe = torch.where(m_ij == float("-inf"), 0.0, m_ij)
                p = torch.exp2(qk - m_safe[:, None])
                alpha = torch.exp2(m_i - m_safe)
                l_i = l_i * alpha + p.sum(-1)  # the normalizer: every p, dropped or not
                acc = acc * alpha[:, None] + (p * z) @ v  # the output: p ∘ Z/(1 − p)
                m_i = m_ij
            l_safe = torch.where(l_i == 0, 1.0, l_i)
            O[h, offs_m] = acc / l_safe[:, None]
            LSE[h, offs_m] = torch.where(
                l_i == 0, float("-inf"), (m_i + torch.log2(l_safe)) / LOG2E
            )
    return O, LSE, skipped


def modified_backward(Q, K, V, O, dO, LSE, keep, Z, opts, BLOCK_M, BLOCK_N, skip):
    H, Nq, _ = Q.shape
    H_k, Nk, _ = K.shape
    group, scale, c = H // H_k, opts["scale"], opts["softcap"]
    tile = modified_tiles(Q, K, V, keep, Z, opts, BLOCK_M, BLOCK_N)
    Delta = (dO * O).sum(-1)  # rowsum(dO ∘ O) = rowsum(P ∘ dP), dropout or not
    LSE2 = torch.where(LSE == float("-inf"), float("inf"), LSE * LOG2E)

    def grads(h, offs_m, offs_n):
        q, k, v, qk, t, z, any_kept = tile(h, offs_m, offs_n)
        p = torch.exp2(qk - LSE2[h, offs_m, None])  # P, before dropout
        dp = (dO[h, offs_m] @ v.T) * z  # dP = dP_drop ∘ Z/(1 − p)
        ds = p * (dp - Delta[h, offs_m, None])
        if c > 0:
            ds = ds * (1 - t**2)  # t = tanh(S/c) from before the mask: finite everywhere
        return q, k, p * z, ds, any_kept

    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    for g in range(H_k):  # dK/dV: one program per (kv head, key block)
        for start_n in range(0, Nk, BLOCK_N):
            offs_n = torch.arange(start_n, min(start_n + BLOCK_N, Nk))
            dk, dv = torch.zeros_like(K[g, offs_n]), torch.zeros_like(V[g, offs_n])
            for h in range(g * group, (g + 1) * group):  # the group, summed in registers
                for start_m in range(0, Nq, BLOCK_M):
                    offs_m = torch.arange(start_m, min(start_m + BLOCK_M, Nq))
                    q, _, p_drop, ds, any_kept = grads(h, offs_m, offs_n)
                    if skip and not any_kept:
                        continue
                    dv += p_drop.T @ dO[h, offs_m]
                    dk += ds.T @ q
            dK[g, offs_n], dV[g, offs_n] = dk * scale, dv
    for h in range(H):  # dQ: one program per (query head, query block)
        for start_m in range(0, Nq, BLOCK_M):
            offs_m = torch.arange(start_m, min(start_m + BLOCK_M, Nq))
            dq = torch.zeros_like(Q[h, offs_m])
            for start_n in range(0, Nk, BLOCK_N):
                offs_n = torch.arange(start_n, min(start_n + BLOCK_N, Nk))
                _, k, _, ds, any_kept = grads(h, offs_m, offs_n)
                if skip and not any_kept:
                    continue
                dq += ds @ k
            dQ[h, offs_m] = dq * scale
    return dQ, dK, dV


MODIFIED_CASES = [  # name, H, H_k, Nq, Nk, diag_offset, window, softcap, alibi, user mask, p
    ("gqa", 4, 2, 21, 30, None, (-1, -1), 0.0, False, False, 0.0),
    ("softcap+alibi+causal", 2, 2, 30, 21, 0, (-1, 0), 1.5, True, False, 0.0),
    ("everything", 6, 2, 37, 50, None, (6, 3), 1.5, True, True, 0.3),
    ("mqa+window+dropout, empty rows", 3, 1, 45, 29, None, (4, 0), 0.8, True, False, 0.2),
    ("top-left, right window, user mask", 2, 1, 29, 40, 0, (-1, 5), 0.0, False, True, 0.25),
]


def modified_case(H, H_k, Nq, Nk, diag_offset, window, softcap, alibi, user, p):
    D = 8
    Q, K, V, dO = randn(H, Nq, D), randn(H_k, Nk, D), randn(H_k, Nk, D), randn(H, Nq, D)
    slopes = torch.rand(H, dtype=F64) if alibi else None
    A = alibi_bias(slopes, Nq, Nk, diag_offset)[0] if alibi else None
    user_mask = (torch.rand(H, Nq, Nk) < 0.7) if user else None
    keep = keep_mask(Nq, Nk, False, diag_offset, window_size=window).expand(H, Nq, Nk)
    if user:
        keep = keep & user_mask
    Z = (torch.rand(H, Nq, Nk) < 1 - p) if p > 0 else None
    opts = {"scale": 0.3, "softcap": softcap, "alibi": A, "dropout_p": p}
    naive_kw = {
        "softmax_scale": 0.3,
        "diag_offset": diag_offset,
        "dtype": F64,
        "window_size": window,
        "softcap": softcap,
        "alibi_slopes": slopes,
        "mask": user_mask,
        "dropout_p": p,
        "dropout_keep": Z,
    }
    return Q, K, V, dO, keep, Z, opts, naive_kw


@pytest.mark.parametrize("case", MODIFIED_CASES, ids=[c[0] for c in MODIFIED_CASES])
def test_modified_backward_closed_forms_match_autograd(case):
    """The chain of §15.1, stage by stage, against autograd through the reference."""
    Q, K, V, dO, keep, Z, opts, kw = modified_case(*case[1:])
    H, H_k, c = Q.shape[0], K.shape[0], opts["softcap"]
    group, scale = H // H_k, opts["scale"]
    zs = torch.ones(keep.shape, dtype=F64) if Z is None else Z.to(F64) / (1 - opts["dropout_p"])
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    Kh, Vh = Kr.repeat_interleave(group, 0), Vr.repeat_interleave(group, 0)
    S0 = scale * Qr @ Kh.transpose(-2, -1)
    S1 = c * torch.tanh(S0 / c) if c > 0 else S0
    S2 = S1 + opts["alibi"] if opts["alibi"] is not None else S1
    S = S2.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(S, -1)
    P = torch.exp(S - torch.where(lse == float("-inf"), 0.0, lse)[..., None])  # §10: rows of 0
    P_drop = P * zs
    O = P_drop @ Vh
    stages = (Kh, Vh, S0, S1, S2, S, P, P_drop)
    for t in stages:
        t.retain_grad()
    O.backward(dO)
    grad = {name: t.grad for name, t in zip(("Kh", "Vh", "S0", "S1", "S2", "S", "P", "Pd"), stages)}
    Kh, Vh, S0, S1, S2, S, P, P_drop = (t.detach() for t in stages)
    O_ref, lse_ref = attention_naive(Q[None], K[None], V[None], **kw)
    torch.testing.assert_close(O.detach(), O_ref[0], **TOL)
    torch.testing.assert_close(lse, lse_ref[0], rtol=0, atol=1e-12)
    # §7: P from lse alone, for the final scores S (cap and bias included, then dropout apart)
    lse_safe = torch.where(lse == float("-inf"), float("inf"), lse)
    torch.testing.assert_close(torch.exp(S - lse_safe[..., None]), P, **TOL)
    dV_h = P_drop.transpose(-2, -1) @ dO
    dP_drop = dO @ Vh.transpose(-2, -1)
    dP = dP_drop * zs
    Delta = (dO * O.detach()).sum(-1, keepdim=True)
    dS = P * (dP - Delta)
    dS0 = dS * (1 - (S1 / c) ** 2) if c > 0 else dS
    dK_h = scale * dS0.transpose(-2, -1) @ Q
    torch.testing.assert_close(grad["Vh"], dV_h, **TOL)  # dV = P_dropᵀ dO, per query head
    torch.testing.assert_close(grad["Pd"], dP_drop, **TOL)  # dP_drop = dO Vᵀ
    torch.testing.assert_close(grad["P"], dP, **TOL)  # dP = dP_drop ∘ Z/(1 − p)
    torch.testing.assert_close(Delta, (P * dP).sum(-1, keepdim=True), **TOL)
    # at S itself autograd's logsumexp gives NaN on a row that sees nothing (−∞ − (−∞)); those
    # entries are constants (−∞) and the mask's Jacobian diag(keep) drops them
    torch.testing.assert_close(grad["S"][keep], dS[keep], **TOL)
    for name in ("S2", "S1"):  # the mask and the bias pass dS on unchanged
        torch.testing.assert_close(grad[name], dS, **TOL)
    torch.testing.assert_close(grad["S0"], dS0, **TOL)  # the cap: ∘ (1 − (S¹/c)²)
    torch.testing.assert_close(Qr.grad, scale * dS0 @ Kh, **TOL)
    torch.testing.assert_close(grad["Kh"], dK_h, **TOL)
    torch.testing.assert_close(Kr.grad, dK_h.unflatten(0, (H_k, group)).sum(1), **TOL)
    torch.testing.assert_close(Vr.grad, dV_h.unflatten(0, (H_k, group)).sum(1), **TOL)


@pytest.mark.parametrize("case", MODIFIED_CASES, ids=[c[0] for c in MODIFIED_CASES])
def test_modified_tiled_algorithm(case):
    """§15.7's tiles, forward and both backward passes, against autograd; and skipping every
    tile with no kept entry changes no bit."""
    Q, K, V, dO, keep, Z, opts, kw = modified_case(*case[1:])
    Qr, Kr, Vr = (t.clone().requires_grad_() for t in (Q, K, V))
    O_ref, lse_ref = attention_naive(Qr[None], Kr[None], Vr[None], **kw)
    O_ref.backward(dO[None])
    full = modified_forward(Q, K, V, keep, Z, opts, 16, 8, skip=False)
    O, LSE, skipped = modified_forward(Q, K, V, keep, Z, opts, 16, 8, skip=True)
    assert skipped > 0 or bool(keep.all())
    assert torch.equal(O, full[0]) and torch.equal(LSE, full[1])
    torch.testing.assert_close(O, O_ref[0].detach(), **TOL)
    torch.testing.assert_close(LSE, lse_ref[0].detach(), **TOL)
    grads = modified_backward(Q, K, V, O, dO, LSE, keep, Z, opts, 16, 8, skip=True)
    grads_full = modified_backward(Q, K, V, O, dO, LSE, keep, Z, opts, 16, 8, skip=False)
    for got, got_full, want in zip(grads, grads_full, (Qr.grad, Kr.grad, Vr.grad)):
        assert torch.equal(got, got_full)  # a skipped tile would have added exact zeros
        torch.testing.assert_close(got, want, **TOL)


def test_split_kv_combine_is_exact(dev):
    """§16: partial (O_s, LSE_s) over disjoint key chunks combine to the full O and LSE
    (the combine kernel, in float64)."""
    from flashtile.kernels.forward import combine_splits

    B, H, Nq, Nk, D = 2, 3, 4, 50, 8
    S = torch.randn(B, H, Nq, Nk, dtype=torch.float64, device=dev) * 3
    V = torch.randn(B, H, Nk, D, dtype=torch.float64, device=dev)
    S[0, 0, 0] = float("-inf")  # a row that sees nothing
    S[1, :, :, 20:35] = float("-inf")  # a chunk that sees nothing
    chunks = [slice(0, 20), slice(20, 35), slice(35, 50)]
    lse_s, out_s = [], []
    for c in chunks:
        lse = torch.logsumexp(S[..., c], -1)
        p = torch.exp(S[..., c] - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
        lse_s.append(lse)
        out_s.append((p @ V[:, :, c]).transpose(1, 2))  # (B, Nq, H, D), the kernel's layout
    out, lse = combine_splits(torch.stack(out_s), torch.stack(lse_s), torch.float64)
    want_lse = torch.logsumexp(S, -1)
    P = torch.exp(S - torch.where(want_lse == float("-inf"), 0.0, want_lse)[..., None])
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, (P @ V).transpose(1, 2), rtol=0, atol=1e-12)
    assert bool((out[0, 0, 0] == 0).all()) and lse[0, 0, 0] == float("-inf")
