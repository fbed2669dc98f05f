"""FlashAttention-2's packed entry points (flashtile/packed.py): the same results as the
unpacked functions' float64 references by FlashAttention's rule, the packed tensor's gradient
in its own layout, and clear errors for a tensor that is not packed as documented."""

import pytest
import torch
from conftest import ON_GPU

import flashtile
from flashtile.testing import check_attention, reference_attention

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


def _grads_of(packed: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, axis: int):
    """The packed tensor's gradient, unbound along its stacking axis."""
    (grad,) = torch.autograd.grad(out, (packed,), dout)
    assert grad.shape == packed.shape
    return grad.unbind(axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_is_attention_of_its_three_parts(causal, dtype, dev):
    qkv = torch.randn(2, 45, 3, 2, 32, device=dev, dtype=dtype, requires_grad=True)
    q, k, v = qkv.detach().unbind(2)
    dout = torch.randn_like(q)
    out, lse = flashtile.flash_attn_qkvpacked_func(qkv, causal=causal, return_lse=True)
    dq, dk, dv = _grads_of(qkv, out, dout, 2)
    ref = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    base = reference_attention(q, k, v, dout, causal=causal)
    check_attention("qkvpacked", dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv), ref, base, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kvpacked_with_grouped_heads_and_a_window(dtype, dev):
    q = torch.randn(2, 37, 4, 32, device=dev, dtype=dtype, requires_grad=True)
    kv = torch.randn(2, 50, 2, 2, 32, device=dev, dtype=dtype, requires_grad=True)
    k, v = kv.detach().unbind(2)
    dout = torch.randn_like(q)
    out = flashtile.flash_attn_kvpacked_func(q, kv, softmax_scale=0.3, window_size=(20, 5))
    (dq,) = torch.autograd.grad(out, (q,), dout, retain_graph=True)
    dk, dv = _grads_of(kv, out, dout, 2)
    options = dict(softmax_scale=0.3, window_size=(20, 5))
    ref = reference_attention(q, k, v, dout, dtype=torch.float64, **options)
    base = reference_attention(q, k, v, dout, **options)
    check_attention("kvpacked", dict(out=out, dq=dq, dk=dk, dv=dv), ref, base, dtype,
                    fields=("out", "dq", "dk", "dv"))


def _cumulative(lengths, dev):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=dev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_qkvpacked_per_sequence(dtype, dev):
    """Sequences of 30, 0 (empty) and 51 tokens, causal, each against its own reference."""
    lengths = [30, 0, 51]
    cu = _cumulative(lengths, dev)
    qkv = torch.randn(sum(lengths), 3, 2, 16, device=dev, dtype=dtype, requires_grad=True)
    dout = torch.randn(sum(lengths), 2, 16, device=dev, dtype=dtype)
    out, lse = flashtile.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lengths), causal=True,
                                                          return_lse=True)
    dq, dk, dv = _grads_of(qkv, out, dout, 1)
    q, k, v = qkv.detach().unbind(1)
    for i in range(len(lengths)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        if rows.stop == rows.start:
            continue
        qi, ki, vi, doi = q[rows][None], k[rows][None], v[rows][None], dout[rows][None]
        ref = reference_attention(qi, ki, vi, doi, causal=True, dtype=torch.float64)
        base = reference_attention(qi, ki, vi, doi, causal=True)
        got = dict(out=out[rows][None], lse=lse[:, rows][None], dq=dq[rows][None],
                   dk=dk[rows][None], dv=dv[rows][None])
        check_attention(f"varlen qkvpacked sequence {i}", got, ref, base, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_kvpacked_per_sequence(dtype, dev):
    """Queries 20 and 7 tokens against 33 and 40 keys, MQA, each against its own reference."""
    lens_q, lens_k = [20, 7], [33, 40]
    cu_q, cu_k = _cumulative(lens_q, dev), _cumulative(lens_k, dev)
    q = torch.randn(sum(lens_q), 2, 16, device=dev, dtype=dtype, requires_grad=True)
    kv = torch.randn(sum(lens_k), 2, 1, 16, device=dev, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)
    out = flashtile.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 20, 40, causal=True)
    (dq,) = torch.autograd.grad(out, (q,), dout, retain_graph=True)
    dk, dv = _grads_of(kv, out, dout, 1)
    k, v = kv.detach().unbind(1)
    for i in range(2):
        rows, keys = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi, ki, vi, doi = q[rows][None], k[keys][None], v[keys][None], dout[rows][None]
        ref = reference_attention(qi, ki, vi, doi, causal=True, dtype=torch.float64)
        base = reference_attention(qi, ki, vi, doi, causal=True)
        got = dict(out=out[rows][None], dq=dq[rows][None], dk=dk[keys][None], dv=dv[keys][None])
        check_attention(f"varlen kvpacked sequence {i}", got, ref, base, dtype,
                        fields=("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("call,message", [
    (lambda t: flashtile.flash_attn_qkvpacked_func(t(2, 8, 2, 2, 16)),
     r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\), got \(2, 8, 2, 2, 16\)"),
    (lambda t: flashtile.flash_attn_qkvpacked_func(t(8, 3, 2, 16)),
     r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\), got \(8, 3, 2, 16\)"),
    (lambda t: flashtile.flash_attn_kvpacked_func(t(1, 8, 2, 16), t(1, 8, 3, 2, 16)),
     r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\)"),
    (lambda t: flashtile.flash_attn_varlen_qkvpacked_func(
        t(1, 8, 3, 2, 16), torch.tensor([0, 8], dtype=torch.int32), 8),
     r"qkv must have shape \(total, 3, nheads, headdim\)"),
    (lambda t: flashtile.flash_attn_varlen_kvpacked_func(
        t(8, 2, 16), t(8, 2, 2), torch.tensor([0, 8], dtype=torch.int32),
        torch.tensor([0, 8], dtype=torch.int32), 8, 8),
     r"kv must have shape \(total_k, 2, nheads_k, headdim\)"),
])
def test_a_tensor_not_packed_as_documented_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(lambda *shape: torch.randn(*shape, dtype=torch.float16))


def test_a_packed_argument_that_is_not_a_tensor_is_named():
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor, got list"):
        flashtile.flash_attn_qkvpacked_func([[1.0]])
