"""Input generation, tolerances and the one comparison helper that tests and benchmarks share.

The rule is FlashAttention's: compared with a float64 reference, flashtile's error may be at most
twice the error of plain PyTorch attention computed in the same dtype, plus a small floor.

The floor, at the reference's magnitude (at least 1), is half a unit roundoff for the 16-bit
dtypes, as FlashAttention's tests use. For float32 it is an absolute 1e-5 (about 80 roundoffs):
plain float32 attention is accurate to a few roundoffs, while the kernels rebuild p = exp2(s - lse)
(a roundoff in an argument of size |s| is a relative error |s|·eps in p) and cancel
dp - Delta between dot products of size about sqrt(headdim); 1e-5 bounds that and is still
hundreds of times tighter than any 16-bit result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtile.reference import attention_naive


def device() -> torch.device:
    """The device tests and the demo run on: the GPU when there is one, else the CPU (the
    kernels then run through the Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_qkv(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    nheads: int,
    head_dim: int,
    dtype: torch.dtype,
    dev: torch.device | str | None = None,
    requires_grad: bool = True,
    *,
    nheads_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh standard-normal q (B, Nq, H, D), k, v (B, Nk, H_k, D), the FlashAttention layout.

    nheads_k: key/value heads (grouped-query attention); default nheads."""
    dev = device() if dev is None else dev
    nheads_k = nheads if nheads_k is None else nheads_k
    q = torch.randn(batch, seqlen_q, nheads, head_dim, device=dev, dtype=dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, head_dim, device=dev, dtype=dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, head_dim, device=dev, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


@dataclass
class Reference:
    """Float64 reference and same-dtype baseline of out, lse and the gradients, in the
    FlashAttention layout (B, N, H, D); lse (B, H, Nq); with return_probs, probs (B, H, Nq, Nk),
    the probabilities after dropout (P_drop, out = P_drop v)."""

    out: torch.Tensor
    lse: torch.Tensor
    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    probs: torch.Tensor | None = None


def reference_attention(q, k, v, dout=None, *, softmax_scale=None, causal=False,
                        diag_offset=None, dtype=None, **features) -> Reference:
    """attention_naive on (B, N, H, D) inputs (k, v may have fewer heads), with gradients for
    dout if given.

    dtype=torch.float64 gives the reference; dtype=None the same-dtype baseline. `features` are
    attention_naive's keywords (window_size, softcap, alibi_slopes, mask, dropout_p,
    dropout_keep, return_probs), each tensor in attention_naive's own shape: mask and
    dropout_keep (B, H, Nq, Nk) or broadcastable, alibi_slopes (H,) or (B, H)."""
    # leaves in the compute dtype: autograd returns each gradient in its leaf's dtype, and a
    # float64 reference must not be rounded back to the inputs' dtype
    Q, K, V = (t.detach().transpose(1, 2).to(dtype or t.dtype).requires_grad_(dout is not None)
               for t in (q, k, v))
    O, LSE, *probs = attention_naive(Q, K, V, softmax_scale=softmax_scale, causal=causal,
                                     diag_offset=diag_offset, dtype=dtype, **features)
    grads: tuple = (None, None, None)
    if dout is not None:
        grads = torch.autograd.grad(O, (Q, K, V), dout.transpose(1, 2).to(O.dtype))
        grads = tuple(g.transpose(1, 2) for g in grads)
    P = probs[0].detach() if probs else None
    return Reference(O.detach().transpose(1, 2), LSE.detach(), *grads, probs=P)


FLOOR = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 1e-5}


def tolerance(reference: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> float:
    """2 × (baseline error) + FLOOR[dtype] · max(1, |reference|)."""
    finite = torch.isfinite(reference)
    ref, base = reference[finite].double(), baseline[finite].double()
    if ref.numel() == 0:
        return 0.0
    scale = max(1.0, ref.abs().max().item())
    return 2 * (base - ref).abs().max().item() + FLOOR[dtype] * scale


def assert_close(name: str, actual: torch.Tensor, reference: torch.Tensor, atol: float) -> None:
    """Max |actual - reference| <= atol, with non-finite reference entries matched exactly.

    On failure the message gives the max and mean difference and where the worst one is."""
    assert actual.shape == reference.shape, (
        f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    actual, reference = actual.detach().double().cpu(), reference.detach().double().cpu()
    finite = torch.isfinite(reference)
    same_nonfinite = (actual[~finite] == reference[~finite]) | (
        actual[~finite].isnan() & reference[~finite].isnan())
    assert bool(same_nonfinite.all()), (
        f"{name}: {int((~same_nonfinite).sum())} non-finite reference entries differ")
    diff = (actual - reference).abs().masked_fill(~finite, 0.0)
    assert not bool(actual[finite].isnan().any()), f"{name}: NaN where the reference is finite"
    worst = diff.max().item() if diff.numel() else 0.0
    if worst > atol:
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max |diff| {worst:.3e} > tolerance {atol:.3e} (mean {diff.mean():.3e}); "
            f"worst at {where}: got {actual[where].item():.6g}, "
            f"reference {reference[where].item():.6g}")


def run_flashtile(q, k, v, dout, **kwargs) -> dict[str, torch.Tensor]:
    """flash_attn_func(q, k, v, **kwargs)'s out and lse and the gradients of q, k and v for
    dout, as the dict check_attention takes."""
    from flashtile.interface import flash_attn_func

    out, lse = flash_attn_func(q, k, v, return_lse=True, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def check_attention(name: str, actual, reference: Reference, baseline: Reference,
                    dtype: torch.dtype, fields=("out", "lse", "dq", "dk", "dv")) -> None:
    """Apply the FlashAttention rule to every field: actual is a dict or object of tensors."""
    for field in fields:
        got = actual[field] if isinstance(actual, dict) else getattr(actual, field)
        ref, base = getattr(reference, field), getattr(baseline, field)
        assert_close(f"{name} {field}", got, ref, tolerance(ref, base, dtype))
