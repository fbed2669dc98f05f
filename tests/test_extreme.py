"""Extreme values against the float64 reference, by FlashAttention's rule (flashtile/testing.py):
large logits, float16 values near overflow, -inf and NaN in q, k or v, and rows that see no key.

- Large logits: q and k scaled so that the largest |q·k|·scale is 1e2 .. 1e4, all positive or
  all about -1e4 (every p comes from exp2 of a difference of two numbers of size 1e4).
- float16 near overflow: v up to 65000, q (or k) up to 61000 against keys (queries) of 1e-3 at
  softmax_scale 1, q·k up to 6e4. The inputs are chosen so that every true result is
  representable in float16 and plain float16 attention (the rule's baseline) stays finite.
- -inf and NaN: one element of q, k or v, in batch entry 0 and head 1. What "as torch" means:
  the forward (out, lse) has the non-finite pattern of torch's attention: NaN where torch
  gives NaN, finite where torch is finite, the same ±inf (lse may be NaN where torch's is +inf:
  a row with a +inf score has out NaN in both, and flashtile's lse = m + log(l) is then NaN).
  Without a mask the gradients match torch's SDPA (math and CPU flash backends agree) entry for
  entry. With a causal mask torch's own implementations disagree on the gradients: they read
  masked pairs (0 · NaN = NaN, exp(-inf - NaN) = NaN), the more so the denser they are (for a
  NaN in q at row 7 of 40, dv has 640 NaN under SDPA's math backend and under
  flashtile.reference, 128 under flashtile, which skips the key tiles row 7 cannot see). There
  the test asserts what every implementation shares: NaN wherever a NaN reaches through the
  pairs the mask keeps (a pairwise reference that never touches a masked pair), finite wherever
  every torch implementation is finite, and other batch entries and heads bitwise equal to a run
  without the poisoned value.
- Rows that see no key (causal with seqlen_q > seqlen_k, a window that excludes every key of a
  row, a mask_mod that excludes a row or everything): out 0, lse -inf, gradients 0 and finite,
  FlashAttention's convention and flashtile's documented one. torch's SDPA agrees since 2.5
  (its math backend's safe softmax gives 0 for a fully masked row; earlier versions gave NaN).

Shapes are interpreter-sized (seqlen <= 70, head dim 16 or 32): lengths that are not multiples
of the interpreter's 32 × 16 blocks, so masked and unmasked pairs share tiles.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs tl visible to a @triton.jit)
from conftest import ON_GPU
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashtile.reference import attention_naive, keep_mask
from flashtile.testing import FLOOR, check_attention, reference_attention, run_flashtile

# numpy, under the Triton interpreter, warns of the inf and NaN these inputs are made of (and of
# exp2 overflowing in lanes past the end of a tile, which are never stored)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F64 = torch.float64
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
NAN, NEG_INF = float("nan"), float("-inf")


def run_leaves(q, k, v, dout, **kwargs):
    """run_flashtile on detached copies made leaves (the inputs here may be built by ops)."""
    return run_flashtile(*(t.detach().requires_grad_() for t in (q, k, v)), dout, **kwargs)


def check_rule(name, q, k, v, dout, fields=("out", "lse", "dq", "dk", "dv"), **kwargs):
    """flashtile against the float64 reference by the rule; the baseline must be finite (else
    the rule would allow anything)."""
    got = run_leaves(q, k, v, dout, **kwargs)
    ref = reference_attention(q, k, v, dout, dtype=F64, **kwargs)
    base = reference_attention(q, k, v, dout, **kwargs)
    for field in fields:
        assert bool(torch.isfinite(getattr(base, field)).all()), (
            f"{name}: the same-dtype baseline's {field} is not finite; choose other inputs")
        assert bool(torch.isfinite(got[field]).all()), f"{name}: {field} is not finite"
    check_attention(name, got, ref, base, q.dtype, fields=fields)
    return got


# -- large logits -------------------------------------------------------------------------------


def large_logits(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, logit, sign):
    """q, k, v, dout with max |q·k|·scale = `logit` (sign +1: scores spread over ±logit), or
    (sign -1) every score about -logit: q = a·u + noise, k = -a·u + noise, u a unit vector."""
    scale = head_dim**-0.5
    shape_q, shape_k = (batch, seqlen_q, nheads, head_dim), (batch, seqlen_k, nheads, head_dim)
    if sign > 0:
        q, k = torch.randn(shape_q, dtype=F64), torch.randn(shape_k, dtype=F64)
        s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
        c = math.sqrt(logit / s.abs().max().item())
        q, k = q * c, k * c
    else:
        u = torch.nn.functional.normalize(torch.randn(head_dim, dtype=F64), dim=0)
        a = math.sqrt(logit / scale)
        q = a * u + torch.randn(shape_q, dtype=F64)
        k = -a * u + torch.randn(shape_k, dtype=F64)
    v = torch.randn(shape_k, dtype=F64)
    dout = torch.randn(shape_q, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


# The draws of the large-value tests are fixed, not the session's: at |logit| >= 1e3 a draw
# whose rows are (nearly) one-hot can take the backward past the rule (the known limits pinned
# by the xfails below, about 1 draw in 10), and a fresh draw per session would make these tests
# flaky instead of pinning that limit once.
FIXED_DRAW = 20240611

# (logit, sign)
LOGITS = [(1e2, 1), (1e3, 1), (1e4, 1), (1e4, -1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("logit,sign", LOGITS, ids=["1e2", "1e3", "1e4", "-1e4"])
def test_large_logits(logit, sign, causal, dtype, dev):
    torch.manual_seed(FIXED_DRAW)
    q, k, v, dout = (t.to(dev) for t in large_logits(2, 37, 45, 2, 16, dtype, logit, sign))
    s = torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()) * 16**-0.5
    assert s.abs().max().item() >= 0.9 * logit
    fields = ("out", "lse", "dq", "dk", "dv")
    if dtype == torch.float32 and logit == 1e4:
        # the gradients exceed the rule when a draw makes every row one-hot: see
        # test_large_logits_float32_backward_one_hot_rows
        fields = ("out", "lse")
    check_rule(f"logits {sign * logit:g}", q, k, v, dout, fields=fields, causal=causal)


def one_hot_rows(batch, seqlen_q, seqlen_k, nheads, head_dim):
    """float32 q, k, v, dout where row i's score against key i is 1e4 and every other score is
    1e4 · cos(k_i, k_j), hundreds lower at least: every row of P is one-hot (to float64
    precision). All keys have norm 100, q_i = 1e4 / (scale · 100²) · k_i."""
    k = torch.nn.functional.normalize(
        torch.randn(batch, seqlen_k, nheads, head_dim, dtype=F64), dim=-1) * 100
    own = k[:, :seqlen_q]  # key i, visible to row i under causal as seqlen_q <= seqlen_k
    q = own * (1e4 / (head_dim**-0.5 * 100**2))
    v = torch.randn(batch, seqlen_k, nheads, head_dim, dtype=F64)
    dout = torch.randn(batch, seqlen_q, nheads, head_dim, dtype=F64)
    return tuple(t.float() for t in (q, k, v, dout))


@pytest.mark.xfail(strict=not ON_GPU, reason=(
    "float32 dk (6-11x) and dq (1.5-2.6x) exceed 2x plain float32 attention's error on one-hot "
    "rows at logits of 1e4: the backward cancels dp - Delta with Delta = rowsum(dO∘O) from "
    "the rounded O and p = exp2(s·log2e - lse·log2e) rebuilt from float32 numbers of size "
    "1.4e4 (p = 1 ± 4e-4 instead of 1), an error of ~1e-7·|dO||v| that dk = scale·dSᵀq and "
    "dq = scale·dS k multiply by |q|, |k| ~ 100; plain attention's dS = P∘(dP - rowsum(P∘dP)) "
    "is exactly 0 on a one-hot row, so the rule leaves only the 1e-5 floor. (With random "
    "scores of size 1e4 the same happens in about 1 draw in 10, when every row is one-hot.)"))
@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_float32_backward_one_hot_rows(causal, dev):
    q, k, v, dout = (t.to(dev) for t in one_hot_rows(2, 37, 45, 2, 16))
    check_rule("one-hot rows at logit 1e4, float32", q, k, v, dout, fields=("dq", "dk"),
               causal=causal)


# -- float16 near overflow ----------------------------------------------------------------------

F16_MAX = torch.finfo(torch.float16).max  # 65504


def near_overflow(case, batch, seqlen_q, seqlen_k, nheads, head_dim):
    """float64 q, k, v, dout and flash_attn_func's keywords of each case (see the docstring)."""
    q = torch.randn(batch, seqlen_q, nheads, head_dim, dtype=F64)
    k, v = (torch.randn(batch, seqlen_k, nheads, head_dim, dtype=F64) for _ in range(2))
    dout = torch.randn_like(q)
    kw = {}

    def huge(t):  # magnitudes 55000 .. 61000, random signs
        return torch.sign(t) * (55_000 + 6_000 * torch.rand_like(t))

    if case == "v_65000":
        v = (v * 20_000).clamp(-65_000, 65_000)
        dout = dout * 1e-3  # so that dq = scale · dS k stays representable
    elif case == "q_61000_scale1":  # q·scale·log2e > 65504: must not be formed in float16
        # dout 1e-4: dk = scale · dSᵀ q sums rows of size 6e4
        q, k, dout, kw = huge(q), k * 1e-3, dout * 1e-4, dict(softmax_scale=1.0)
    elif case == "k_61000_scale1":
        q, k, dout, kw = q * 1e-3, huge(k), dout * 1e-4, dict(softmax_scale=1.0)
    elif case == "qk_6e4":  # products near the float16 maximum, scores up to 6000
        s = torch.einsum("bmhd,bnhd->bhmn", q, k).abs().max().item()
        c = math.sqrt(60_000 / s)
        q, k, kw = q * c, k * c, dict(softmax_scale=0.1)
    return q, k, v, dout, kw


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["v_65000", "q_61000_scale1", "k_61000_scale1", "qk_6e4"])
def test_float16_near_overflow(case, causal, dev):
    torch.manual_seed(FIXED_DRAW)
    q, k, v, dout, kw = near_overflow(case, 2, 41, 50, 2, 16)
    q, k, v, dout = (t.to(device=dev, dtype=torch.float16) for t in (q, k, v, dout))
    assert max(t.abs().max().item() for t in (q, k, v)) <= F16_MAX
    if case == "qk_6e4":
        qk = torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()).abs().max().item()
        assert 50_000 < qk < F16_MAX
    check_rule(case, q, k, v, dout, causal=causal, **kw)


# Two draws (found by the session seeds 8 and 10 before the draws were fixed) that take the
# backward past the rule: not one-hot enough for the test above, but close.
@pytest.mark.xfail(strict=not ON_GPU, reason=(
    "float16 dq (2.25x) and dk (1.5x) over the rule on a nearly one-hot row (max p 0.9992) "
    "with q·k up to 6e4: Delta = rowsum(dO∘O) is taken from the float16-rounded O, so "
    "dp - Delta carries O's rounding (~5e-4 relative), which dq = scale·dS k multiplies by "
    "|k| ~ 60; plain float16 attention computes the softmax backward from its float32 P"))
def test_float16_qk_6e4_nearly_one_hot_row(dev):
    torch.manual_seed(6163)
    q, k, v, dout, kw = near_overflow("qk_6e4", 2, 41, 50, 2, 16)
    q, k, v, dout = (t.to(device=dev, dtype=torch.float16) for t in (q, k, v, dout))
    check_rule("qk_6e4 draw 6163", q, k, v, dout, fields=("dq", "dk"), causal=True, **kw)


@pytest.mark.xfail(strict=not ON_GPU, reason=(
    "float32 dv 1.08x over the rule (2.2x plain float32 attention's error) at logits of 1e3: "
    "p = exp2(s·log2e - lse·log2e) is rebuilt from float32 numbers of size 1.4e3, a few "
    "roundings of relative size |s|·2^-24 each, more than plain attention's exp(S - LSE)"))
def test_float32_logits_1e3_dv(dev):
    torch.manual_seed(6328)
    q, k, v, dout = (t.to(dev) for t in large_logits(2, 37, 45, 2, 16, torch.float32, 1e3, 1))
    check_rule("logits 1e3 draw 6328", q, k, v, dout, fields=("dv",))


# -- -inf and NaN -------------------------------------------------------------------------------

POISON_AT = (0, 7, 1, 3)  # batch 0, row (or key) 7, head 1, dim 3


def poisoned_inputs(where, value, dtype, dev, seqlen=40, head_dim=16):
    q, k, v = (torch.randn(2, seqlen, 2, head_dim, dtype=dtype) for _ in range(3))
    dout = torch.randn_like(q)
    if where == "q" and value == NEG_INF:
        # a key row 7 sees with k·e_3 < 0: q·k = +inf there, so row 7 is NaN as in torch,
        # not a row whose every score is -inf (a row that sees nothing; see below)
        b, _, h, d = POISON_AT
        k[b, 0, h, d] = -k[b, 0, h, d].abs() - 0.1
    clean = tuple(t.clone() for t in (q, k, v))
    dict(q=q, k=k, v=v)[where][POISON_AT] = value
    return (*(t.to(dev) for t in (q, k, v, dout)), tuple(t.to(dev) for t in clean))


def torch_sdpa(q, k, v, dout, backend, causal):
    """out, dq, dk, dv of torch's SDPA (top-left causal) in float64, in the (B, N, H, D) layout."""
    q, k, v = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout.double().transpose(1, 2))
    return [t.detach().transpose(1, 2) for t in (out, *grads)]


def pairwise_reference(q, k, v, dout, causal):
    """out, dq, dk, dv in float64 where a masked pair takes no part at all, not even as 0 · x:
    every (query, key) pair has its own copies of q_i, k_j, v_j, selected by the keep mask, so
    a non-finite value reaches exactly the results that depend on it through kept pairs."""
    Q, K, V = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    n_q, n_k, d = Q.shape[2], K.shape[2], Q.shape[3]
    keep = keep_mask(n_q, n_k, causal, device=Q.device)  # (Nq, Nk)
    pair = keep[:, :, None]
    q_ij = torch.where(pair, Q[:, :, :, None, :], 0.0)  # (B, H, Nq, Nk, D)
    k_ij = torch.where(pair, K[:, :, None, :, :], 0.0)
    v_ij = torch.where(pair, V[:, :, None, :, :], 0.0)
    s = torch.where(keep, (q_ij * k_ij).sum(-1) * d**-0.5, NEG_INF)  # (B, H, Nq, Nk)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(keep, torch.exp(s - lse), 0.0)
    out = (p[..., None] * v_ij).sum(-2)  # (B, H, Nq, D)
    grads = torch.autograd.grad(out, (Q, K, V), dout.double().transpose(1, 2))
    return [t.detach().transpose(1, 2) for t in (out, *grads)]


def check_nonfinite_like(name, got, want, dtype, baseline, nan_for_inf=False):
    """NaN where `want` is NaN, finite where it is finite, the same ±inf where it is infinite
    (or NaN, with nan_for_inf); finite entries by the rule, baseline errors taken where both
    are finite."""
    got, want, baseline = got.double().cpu(), want.double().cpu(), baseline.double().cpu()
    nan, finite, inf = want.isnan(), torch.isfinite(want), want.isinf()
    assert bool(got[nan].isnan().all()), (
        f"{name}: {int((~got[nan].isnan()).sum())} entries not NaN where torch's are")
    assert bool(torch.isfinite(got[finite]).all()), (
        f"{name}: {int((~torch.isfinite(got[finite])).sum())} entries not finite where torch's "
        "are")
    same_inf = got[inf] == want[inf]
    if nan_for_inf:
        same_inf |= got[inf].isnan()
    assert bool(same_inf.all()), f"{name}: {int((~same_inf).sum())} infinite entries differ"
    both = finite & torch.isfinite(baseline)
    if bool(both.any()):
        scale = max(1.0, want[both].abs().max().item())
        atol = 2 * (baseline[both] - want[both]).abs().max().item() + FLOOR[dtype] * scale
        worst = (got[both] - want[both]).abs().max().item()
        assert worst <= atol, f"{name}: max |diff| {worst:.3e} > tolerance {atol:.3e}"


def slices_other_than_poisoned(t):
    """The (batch, head) slices of a (B, N, H, D) tensor without batch 0 head 1, or of a
    (B, H, N) lse."""
    b, _, h, _ = POISON_AT
    if t.dim() == 3:  # lse (B, H, N)
        keep = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        keep[b, h] = False
        return t[keep]
    keep = torch.ones(t.shape[0], t.shape[2], dtype=torch.bool, device=t.device)
    keep[b, h] = False
    return t.transpose(1, 2)[keep]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [NAN, NEG_INF], ids=["nan", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs(where, value, causal, dtype, dev):
    q, k, v, dout, clean = poisoned_inputs(where, value, dtype, dev)
    got = run_leaves(q, k, v, dout, causal=causal)
    base = reference_attention(q, k, v, dout, causal=causal)
    ref = reference_attention(q, k, v, dout, causal=causal, dtype=F64)
    # forward: torch's attention (flashtile.reference, torch's CPU SDPA agree on it)
    check_nonfinite_like(f"{where}={value} out", got["out"], ref.out, dtype, base.out)
    check_nonfinite_like(f"{where}={value} lse", got["lse"], ref.lse, dtype, base.lse,
                         nan_for_inf=True)
    # seqlen_q == seqlen_k: torch's top-left causal mask is flashtile's bottom-right one
    math_ = torch_sdpa(q, k, v, dout, SDPBackend.MATH, causal)
    names, fields = ("dq", "dk", "dv"), (got["dq"], got["dk"], got["dv"])
    bases = (base.dq, base.dk, base.dv)
    if not causal:
        for name, g, want, b in zip(names, fields, math_[1:], bases):
            check_nonfinite_like(f"{where}={value} {name}", g, want, dtype, b)
        return
    # causal: every batch entry and head but the poisoned one exactly as without the poison
    again = run_leaves(*clean, dout, causal=causal)
    for field, t in got.items():
        assert torch.equal(slices_other_than_poisoned(t), slices_other_than_poisoned(again[field])
                           ), f"{where}={value}: {field} of another batch entry or head changed"
    pairwise = pairwise_reference(q, k, v, dout, causal)
    naive = [ref.dq, ref.dk, ref.dv]
    for name, g, pw, m, n in zip(names, fields, pairwise[1:], math_[1:], naive):
        g, pw, m, n = (t.double().cpu() for t in (g, pw, m, n))  # the references ran on dev
        missing = pw.isnan() & ~g.isnan()
        assert not bool(missing.any()), (
            f"{where}={value} {name}: {int(missing.sum())} entries not NaN that a NaN reaches "
            "through kept pairs")
        torch_finite = torch.isfinite(m) & torch.isfinite(n)
        extra = torch_finite & ~torch.isfinite(g)
        assert not bool(extra.any()), (
            f"{where}={value} {name}: {int(extra.sum())} non-finite entries where every torch "
            "implementation is finite")
    b, _, h, _ = POISON_AT
    if where == "q":  # the poisoned row: dq non-finite, and only it among the queries of (b, h)
        row = got["dq"][b, :, h]
        assert not bool(torch.isfinite(row[POISON_AT[1]]).any())
        others = torch.cat([row[:POISON_AT[1]], row[POISON_AT[1] + 1:]])
        assert bool(torch.isfinite(others).all())


# -- rows that see no key -------------------------------------------------------------------------


@triton.jit
def keep_nothing(b, h, q_idx, kv_idx):
    return (q_idx < 0) & (kv_idx < 0)


@triton.jit
def skip_rows_0_and_37(b, h, q_idx, kv_idx):
    return (q_idx != 0) & (q_idx != 37) & (kv_idx >= 0)


def skip_rows_keep(seqlen_q, seqlen_k, dev):
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=dev)
    keep[[0, 37]] = False
    return keep


# (id, seqlen_q, seqlen_k, flash_attn_func keywords, mask_mod, its dense keep (Nq, Nk) or None)
EMPTY_ROW_CASES = [
    ("causal-70x20", 70, 20, dict(causal=True), None, None),
    ("window(0,0)-60x25", 60, 25, dict(window_size=(0, 0)), None, None),
    ("window(-1,2)-64x30", 64, 30, dict(window_size=(-1, 2)), None, None),
    ("window(5,3)+causal-50x17", 50, 17, dict(window_size=(5, 3), causal=True), None, None),
    ("mask_rows_0_37-45x33", 45, 33, {}, skip_rows_0_and_37, skip_rows_keep),
    ("mask_nothing-40x40", 40, 40, {}, keep_nothing,
     lambda n_q, n_k, dev: torch.zeros(n_q, n_k, dtype=torch.bool, device=dev)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EMPTY_ROW_CASES, ids=[c[0] for c in EMPTY_ROW_CASES])
def test_rows_that_see_nothing(case, dtype, dev):
    name, seqlen_q, seqlen_k, kw, mask_mod, mask_keep = case
    q, k, v = (torch.randn(2, n, 2, 32, device=dev, dtype=dtype)
               for n in (seqlen_q, seqlen_k, seqlen_k))
    dout = torch.randn_like(q)
    window = kw.get("window_size", (-1, -1))
    keep = keep_mask(seqlen_q, seqlen_k, kw.get("causal", False), device=dev,
                     window_size=window)
    ref_kw = dict(kw)
    if mask_mod is not None:
        keep = keep & mask_keep(seqlen_q, seqlen_k, dev)
        ref_kw["mask"] = keep
    empty_rows, unseen_keys = ~keep.any(1), ~keep.any(0)
    assert bool(empty_rows.any())
    got = run_leaves(q, k, v, dout, mask_mod=mask_mod, **kw)
    ref = reference_attention(q, k, v, dout, dtype=F64, **ref_kw)
    base = reference_attention(q, k, v, dout, **ref_kw)
    check_attention(name, got, ref, base, dtype)
    for field in ("out", "dq", "dk", "dv"):
        assert bool(torch.isfinite(got[field]).all()), f"{name}: {field} not finite"
    assert bool((got["out"][:, empty_rows] == 0).all()), "out of a row that sees nothing"
    assert bool((got["dq"][:, empty_rows] == 0).all()), "dq of a row that sees nothing"
    assert bool((got["lse"][:, :, empty_rows] == NEG_INF).all()), "lse of a row that sees nothing"
    assert bool(torch.isfinite(got["lse"][:, :, ~empty_rows]).all())
    for field in ("dk", "dv"):
        assert bool((got[field][:, unseen_keys] == 0).all()), f"{field} of a key nobody sees"
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5):
        # torch's SDPA with the same boolean mask (float64, math backend): 0 for those rows too
        Q, K, V = (t.detach().double().transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(Q, K, V, attn_mask=keep).transpose(1, 2)
        assert bool((want[:, empty_rows] == 0).all())
        check_attention(f"{name} vs torch SDPA", got, type(ref)(want, None, None, None, None),
                        base, dtype, fields=("out",))


def test_row_whose_scores_are_all_minus_inf_is_empty(dev):
    """A row whose every visible score is -inf (q·k = -inf from a -inf in q): flashtile treats
    it as a row that sees nothing (out 0, lse -inf, dq 0), as its forward does for masked rows;
    torch agrees on out and lse (0 and -inf) and gives NaN for dq (exp(-inf - (-inf)))."""
    q, k, v = (torch.randn(1, 20, 1, 16, device=dev) for _ in range(3))
    k[..., 3] = k[..., 3].abs() + 0.1
    q[0, 5, 0, 3] = NEG_INF
    dout = torch.randn_like(q)
    got = run_leaves(q, k, v, dout)
    ref = attention_naive(*(t.transpose(1, 2).double() for t in (q, k, v)))
    assert bool((ref[0].transpose(1, 2)[0, 5] == 0).all()) and ref[1][0, 0, 5] == NEG_INF
    assert bool((got["out"][0, 5] == 0).all()) and got["lse"][0, 0, 5] == NEG_INF
    assert bool((got["dq"][0, 5] == 0).all())
    others = torch.cat([got["out"][0, :5], got["out"][0, 6:]])
    assert bool(torch.isfinite(others).all())
