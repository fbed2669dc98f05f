"""Reference attention in plain PyTorch: the ground truth the kernels are tested against.

Two implementations of the same function, both in the (batch, heads, seqlen, headdim) layout:

- `attention_naive` materializes S and P, then O = P V, with every feature of flash_attn_func.
  With `dtype=torch.float64` it is the float64 reference; with the input dtype it is "plain
  PyTorch attention in the same dtype", whose error sets the tolerance of every test
  (docs/derivation.md).
- `attention_tiled_forward` / `attention_tiled_backward` run exactly the algorithm of
  kernels/forward.py and kernels/backward.py, block by block, with the kernels' names
  (Q, K, V, O, dO, LSE, Delta; tiles q, k, v, qk, p, dp, ds; running state m_i, l_i, acc), so
  that each line of a kernel has a line here to be read beside it. No N×N matrix is ever built.
  They cover the plain and causal cases only.

The score pipeline of `attention_naive`, in order:

    S = softmax_scale · Q Kᵀ
    S = softcap · tanh(S / softcap)                       (softcap > 0)
    S = S - slope · |i + diag_offset - j|                 (ALiBi)
    S = -inf where the keep mask is False                 (bounds, causal/window, user mask)
    LSE = logsumexp(S) (natural log);  P = exp(S - LSE)
    P_drop = where(keep, P / (1 - dropout_p), 0)          (dropout; LSE is unaffected)
    O = P_drop V

Masking: with diag = i + diag_offset, query row i may see key column j when
`diag - left <= j <= diag + right` for window_size = (left, right), a negative side being
unbounded; causal sets right = 0. The default `diag_offset = seqlen_k - seqlen_q` aligns the
diagonal to the bottom-right corner, as FlashAttention >= 2.1 does; `diag_offset = 0` aligns it
to the top-left, as torch's SDPA does. A row that sees no key gives O = 0, LSE = -inf (the log
of an empty sum) and P = 0.

Grouped-query attention: K and V may have H_k heads with H % H_k == 0; query head h uses key/value
head h // (H // H_k).
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def keep_mask(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool,
    diag_offset: int | None = None,
    device: torch.device | str | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool matrix: True where query i may attend to key j.

    With diag = i + diag_offset: j >= diag - left unless left < 0, j <= diag + right unless
    right < 0, for (left, right) = window_size; causal sets right = 0."""
    if diag_offset is None:
        diag_offset = seqlen_k - seqlen_q
    left, right = window_size
    if causal:
        right = 0
    diag = torch.arange(seqlen_q, device=device)[:, None] + diag_offset
    offs_n = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= offs_n >= diag - left
    if right >= 0:
        keep &= offs_n <= diag + right
    return keep


def alibi_bias(
    alibi_slopes: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    diag_offset: int | None = None,
) -> torch.Tensor:
    """ALiBi bias -slope[b, h] · |i + diag_offset - j|, as (1 or B, H, seqlen_q, seqlen_k).

    alibi_slopes: (H,) or (B, H); the bias has its dtype."""
    if alibi_slopes.dim() not in (1, 2):
        raise ValueError(f"alibi_slopes must be (nheads,) or (batch, nheads), got shape "
                         f"{tuple(alibi_slopes.shape)}")
    if diag_offset is None:
        diag_offset = seqlen_k - seqlen_q
    device, dtype = alibi_slopes.device, alibi_slopes.dtype
    diag = torch.arange(seqlen_q, device=device)[:, None] + diag_offset
    dist = (diag - torch.arange(seqlen_k, device=device)[None, :]).abs().to(dtype)
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
    return -slopes[..., None, None] * dist


def attention_naive(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    diag_offset: int | None = None,
    dtype: torch.dtype | None = None,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
    return_probs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Materialized attention. Q: (B, H, Nq, D); K, V: (B, H_k, Nk, D), H % H_k == 0.

    dtype=None computes in the inputs' dtype the way plain PyTorch code does (matmuls in that
    dtype, softmax in float32); dtype=torch.float64 gives the reference. The score pipeline and
    the masks are in the module docstring:
        window_size: (left, right), negative = unbounded; causal sets right = 0.
        softcap: > 0 caps the scores; 0 is off.
        alibi_slopes: (H,) or (B, H), added as -slope · |i + diag_offset - j|.
        mask: bool, broadcastable to (B, H, Nq, Nk), True = keep; ANDed with the others.
        dropout_p, dropout_keep: bool keep tensor broadcastable to (B, H, Nq, Nk), required when
            dropout_p > 0; P_drop = where(dropout_keep, P / (1 - dropout_p), 0).
    Returns (O, LSE), plus P_drop (B, H, Nq, Nk) with return_probs (the probabilities after
    dropout and its scaling, so that O = P_drop V), with O in the compute dtype, LSE (B, H, Nq)
    and P_drop in float32 or float64, LSE in natural log. Differentiable.
    """
    compute = Q.dtype if dtype is None else dtype
    softmax_dtype = torch.float64 if compute == torch.float64 else torch.float32
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(Q.shape[-1])
    # heads are dim -3 (inputs without a head dim, (B, N, D) or (N, D), work as before)
    nheads, nheads_k = (Q.shape[-3], K.shape[-3]) if Q.dim() >= 3 else (1, 1)
    if nheads_k != nheads:
        if nheads_k == 0 or nheads % nheads_k != 0:
            raise ValueError(f"Q has {nheads} heads, not a multiple of K's {nheads_k}")
        # GQA: query head h uses K/V head h // (H // H_k); autograd sums each group's grads.
        K = K.repeat_interleave(nheads // nheads_k, dim=-3)
        V = V.repeat_interleave(nheads // nheads_k, dim=-3)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 is off), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and dropout_keep is None:
        raise ValueError("dropout_p > 0 needs dropout_keep, the bool keep tensor")
    seqlen_q, seqlen_k = Q.shape[-2], K.shape[-2]
    Q, K, V = Q.to(compute), K.to(compute), V.to(compute)
    S = (Q @ K.transpose(-2, -1)).to(softmax_dtype) * softmax_scale  # (B, H, Nq, Nk)
    if softcap > 0:
        S = softcap * torch.tanh(S / softcap)
    if alibi_slopes is not None:
        S = S + alibi_bias(alibi_slopes.to(softmax_dtype), seqlen_q, seqlen_k, diag_offset)
    keep = keep_mask(seqlen_q, seqlen_k, causal, diag_offset, Q.device, window_size)
    if mask is not None:
        keep = keep & mask.to(torch.bool)
    S = S.masked_fill(~keep, float("-inf"))
    LSE = torch.logsumexp(S, dim=-1)  # (B, H, Nq); -inf where a row sees nothing
    # A row that sees nothing: P = 0 (softmax of all -inf would be NaN).
    P = torch.exp(S - torch.where(LSE == float("-inf"), 0.0, LSE)[..., None])
    if dropout_keep is not None:
        P = torch.where(dropout_keep.to(torch.bool), P / (1.0 - dropout_p), 0.0)
    O = P.to(compute) @ V  # (B, H, Nq, D)
    return (O, LSE, P) if return_probs else (O, LSE)


def _to_float(t: torch.Tensor) -> torch.Tensor:
    """Tiles are computed at least in float32, as the kernels accumulate."""
    return t if t.dtype == torch.float64 else t.float()


def attention_tiled_forward(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    diag_offset: int | None = None,
    BLOCK_M: int = 64,
    BLOCK_N: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel's algorithm in PyTorch: online softmax in base 2, scale folded in.

    Q: (B, H, Nq, D); K, V: (B, H, Nk, D). Returns O (B, H, Nq, D) and LSE (B, H, Nq), natural
    log, both in float32 (float64 for float64 inputs).
    """
    Q, K, V = _to_float(Q), _to_float(K), _to_float(V)
    B, H, seqlen_q, HEAD_DIM = Q.shape
    seqlen_k = K.shape[-2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(HEAD_DIM)
    if diag_offset is None:
        diag_offset = seqlen_k - seqlen_q
    qk_scale = softmax_scale * LOG2E  # exp(s * scale) == exp2(s * qk_scale)
    O = torch.empty_like(Q)
    LSE = torch.empty(B, H, seqlen_q, dtype=Q.dtype, device=Q.device)
    for start_m in range(0, seqlen_q, BLOCK_M):
        offs_m = torch.arange(start_m, min(start_m + BLOCK_M, seqlen_q), device=Q.device)
        q = Q[:, :, offs_m]  # (B, H, BLOCK_M, D)
        m_i = torch.full((B, H, len(offs_m)), float("-inf"), dtype=Q.dtype, device=Q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros_like(q)
        # Causal: key blocks past the last key this query block sees are skipped entirely.
        hi = min(seqlen_k, max(0, offs_m[-1].item() + 1 + diag_offset)) if causal else seqlen_k
        for start_n in range(0, hi, BLOCK_N):
            offs_n = torch.arange(start_n, min(start_n + BLOCK_N, seqlen_k), device=Q.device)
            k, v = K[:, :, offs_n], V[:, :, offs_n]  # (B, H, BLOCK_N, D)
            # -- compute qk, in log2 units --
            qk = (q @ k.transpose(-2, -1)) * qk_scale  # (B, H, BLOCK_M, BLOCK_N)
            if causal:
                qk = qk.masked_fill(offs_n[None, :] > offs_m[:, None] + diag_offset, float("-inf"))
            # -- update m_i; a row that has seen nothing yet keeps m = -inf, use 0 there --
            m_ij = torch.maximum(m_i, qk.amax(-1))
            m_safe = torch.where(m_ij == float("-inf"), 0.0, m_ij)
            p = torch.exp2(qk - m_safe[..., None])
            alpha = torch.exp2(m_i - m_safe)  # rescales what was summed under the old max
            # -- update l_i and acc --
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v
            m_i = m_ij
        # -- epilogue: normalize; lse back to natural log --
        l_safe = torch.where(l_i == 0, 1.0, l_i)
        O[:, :, offs_m] = acc / l_safe[..., None]
        LSE[:, :, offs_m] = torch.where(l_i == 0, float("-inf"), (m_i + torch.log2(l_safe)) / LOG2E)
    return O, LSE


def attention_tiled_backward(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    O: torch.Tensor,
    dO: torch.Tensor,
    LSE: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    diag_offset: int | None = None,
    BLOCK_M: int = 64,
    BLOCK_N: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels' algorithm in PyTorch. Returns dQ, dK, dV in float32 (or float64).

    1. Delta = rowsum(dO ∘ O)                      (equal to rowsum(P ∘ dP), derivation §5)
    2. for each key block:   recompute p from LSE; dV += pᵀ dO; dK += scale · dsᵀ q
    3. for each query block: recompute p from LSE; dQ += scale · ds k
    with dp = dO Vᵀ and ds = p ∘ (dp − Delta). Two passes, each writing its own output once, so
    no atomics: the result is deterministic.
    """
    Q, K, V, O, dO, LSE = (_to_float(t) for t in (Q, K, V, O, dO, LSE))
    B, H, seqlen_q, HEAD_DIM = Q.shape
    seqlen_k = K.shape[-2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(HEAD_DIM)
    if diag_offset is None:
        diag_offset = seqlen_k - seqlen_q
    qk_scale = softmax_scale * LOG2E
    Delta = (dO * O).sum(-1)  # (B, H, Nq)
    # A row that saw nothing has LSE = -inf; +inf makes its recomputed p exactly 0.
    LSE2 = torch.where(LSE == float("-inf"), float("inf"), LSE * LOG2E)

    def recompute_p(start_m: int, start_n: int) -> tuple[torch.Tensor, ...]:
        offs_m = torch.arange(start_m, min(start_m + BLOCK_M, seqlen_q), device=Q.device)
        offs_n = torch.arange(start_n, min(start_n + BLOCK_N, seqlen_k), device=Q.device)
        q, k, v = Q[:, :, offs_m], K[:, :, offs_n], V[:, :, offs_n]
        do, delta = dO[:, :, offs_m], Delta[:, :, offs_m]
        qk = (q @ k.transpose(-2, -1)) * qk_scale  # (B, H, BLOCK_M, BLOCK_N)
        p = torch.exp2(qk - LSE2[:, :, offs_m, None])
        if causal:
            p = p.masked_fill(offs_n[None, :] > offs_m[:, None] + diag_offset, 0.0)
        dp = do @ v.transpose(-2, -1)  # (B, H, BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[..., None])
        return offs_m, offs_n, q, k, do, p, ds

    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    # -- dK, dV: one program per key block, walking the query blocks that see it --
    for start_n in range(0, seqlen_k, BLOCK_N):
        lo = max(0, start_n - diag_offset) if causal else 0
        for start_m in range(lo - lo % BLOCK_M, seqlen_q, BLOCK_M):
            _, offs_n, q, _, do, p, ds = recompute_p(start_m, start_n)
            dV[:, :, offs_n] += p.transpose(-2, -1) @ do
            dK[:, :, offs_n] += ds.transpose(-2, -1) @ q
    dK *= softmax_scale
    # -- dQ: one program per query block, walking the key blocks it sees --
    for start_m in range(0, seqlen_q, BLOCK_M):
        last_m = min(start_m + BLOCK_M, seqlen_q) - 1
        hi = min(seqlen_k, max(0, last_m + 1 + diag_offset)) if causal else seqlen_k
        for start_n in range(0, hi, BLOCK_N):
            offs_m, _, _, k, _, _, ds = recompute_p(start_m, start_n)
            dQ[:, :, offs_m] += ds @ k
    dQ *= softmax_scale
    return dQ, dK, dV
