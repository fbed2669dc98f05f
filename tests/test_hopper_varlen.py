"""Packed batches through the Gluon kernels (kernels/hopper.py and hopper_backward.py with
VARLEN), on a Hopper GPU with the gluon_varlen feature switched on: flash_attn_varlen_func's
outputs and gradients against per-sequence float64 references and against the Triton kernels,
and the kernels called directly into NaN-poisoned buffers; and,
on any machine, which packed batches the Gluon kernels take (`hopper.varlen_covered`). The
interpreter cannot run Gluon (on the CPU, test_compile_sm90 compiles the VARLEN variants)."""

import pytest
import torch
from conftest import needs_hopper, record_calls
from test_varlen import cumulative, per_sequence

import flashtile
from flashtile.kernels import configs, hopper, hopper_backward
from flashtile.kernels.params import AttnOptions
from flashtile.testing import (
    assert_close,
    check_attention,
    poison_,
    reference_attention,
    tolerance,
)

# (name, sequence lengths (queries and keys alike), nheads, nheads_k, head_dim, causal)
CASES = [
    ("ragged_gqa_causal", [700, 0, 130, 1, 2100], 4, 2, 128, True),
    ("ragged_gqa", [700, 0, 130, 1, 2100], 4, 2, 128, False),
    ("mqa_d64_causal", [64, 1000, 257], 3, 1, 64, True),
    ("one_sequence", [1537], 2, 2, 128, False),
]


def _gluon_everywhere(monkeypatch) -> list:
    """gluon_varlen on and every threshold at one key, so that each kernel of the call is a
    Gluon one; returns the list the Gluon entry points note their calls in."""
    monkeypatch.setitem(configs.features, "gluon_varlen", True)
    monkeypatch.setattr(hopper, "MIN_SEQLEN_K", dict.fromkeys(hopper.MIN_SEQLEN_K, 1))
    monkeypatch.setattr(hopper_backward, "MIN_SEQLEN_K", {
        name: dict.fromkeys(thresholds, 1)
        for name, thresholds in hopper_backward.MIN_SEQLEN_K.items()})
    return record_calls(monkeypatch, [(hopper, "attention_forward"), (hopper_backward, "dkdv"),
                                      (hopper_backward, "dq")])


def _run(q, k, v, cu, lengths, dout, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = flashtile.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths),
                                                causal=causal, return_lse=True)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,lengths,nheads,nheads_k,head_dim,causal", CASES,
                         ids=[c[0] for c in CASES])
def test_varlen_through_the_gluon_kernels(name, lengths, nheads, nheads_k, head_dim, causal,
                                          dtype, monkeypatch):
    dev = torch.device("cuda")
    cu = cumulative(lengths, dev)
    total = sum(lengths)
    q = torch.randn(total, nheads, head_dim, device=dev, dtype=dtype)
    k, v = (torch.randn(total, nheads_k, head_dim, device=dev, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    monkeypatch.setitem(configs.features, "gluon_varlen", False)
    triton_path = _run(q, k, v, cu, lengths, dout, causal)  # the Triton kernels
    calls = _gluon_everywhere(monkeypatch)
    gluon_path = _run(q, k, v, cu, lengths, dout, causal)
    assert sorted(calls) == ["attention_forward", "dkdv", "dq"]
    got = dict(zip(("out", "lse", "dq", "dk", "dv"), gluon_path))
    theirs = dict(zip(("out", "lse", "dq", "dk", "dv"), triton_path))
    for i, rows, keys in per_sequence(cu, cu):
        if rows.stop == rows.start:
            continue
        qi, ki, vi, doi = q[rows][None], k[keys][None], v[keys][None], dout[rows][None]
        ref = reference_attention(qi, ki, vi, doi, causal=causal, dtype=torch.float64)
        base = reference_attention(qi, ki, vi, doi, causal=causal)
        for field in got:
            mine, triton_s = (_sequence_of(field, t[field], rows, keys) for t in (got, theirs))
            limit = tolerance(getattr(ref, field), getattr(base, field), dtype)
            assert_close(f"{name} sequence {i} {field}", mine, getattr(ref, field), limit)
            # and as close to the Triton kernels' result as the rule allows either to be
            assert_close(f"{name} sequence {i} {field} against triton", mine, triton_s, limit)


@needs_hopper
@pytest.mark.parametrize("name,lengths,nheads,nheads_k,head_dim,causal", CASES,
                         ids=[c[0] for c in CASES])
def test_gluon_varlen_kernels_write_every_row(name, lengths, nheads, nheads_k, head_dim, causal,
                                              monkeypatch):
    """The three Gluon kernels called directly into NaN-poisoned buffers (flash_attn_varlen_func
    allocates its own, which the allocator may hand back holding an earlier call's values):
    every row of every sequence written, and right by the rule."""
    monkeypatch.setitem(configs.features, "gluon_varlen", True)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cu, total = cumulative(lengths, dev), sum(lengths)
    q = torch.randn(1, total, nheads, head_dim, device=dev, dtype=dtype)
    k, v = (torch.randn(1, total, nheads_k, head_dim, device=dev, dtype=dtype)
            for _ in range(2))
    dout = torch.randn_like(q)
    opts = AttnOptions(softmax_scale=head_dim**-0.5, diag_offset=0,
                       window_right=0 if causal else -1,
                       varlen=(cu, cu, max(lengths), max(lengths)))
    assert hopper.supports(q, k, v, opts)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(1, nheads, total, device=dev))
    hopper.attention_forward(q, k, v, opts, out=out, lse=lse)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dq = poison_(torch.empty_like(q))
    dk, dv = poison_(torch.empty_like(k)), poison_(torch.empty_like(v))
    hopper_backward.dkdv(q, k, v, dout, lse, delta, dk, dv, opts)
    hopper_backward.dq(q, k, v, dout, lse, delta, dq, opts)
    got = dict(out=out[0], lse=lse[0], dq=dq[0], dk=dk[0], dv=dv[0])
    for i, rows, keys in per_sequence(cu, cu):
        if rows.stop == rows.start:
            continue
        qi, ki, vi, doi = (t[0, part][None] for t, part in ((q, rows), (k, keys), (v, keys),
                                                             (dout, rows)))
        ref = reference_attention(qi, ki, vi, doi, causal=causal, dtype=torch.float64)
        base = reference_attention(qi, ki, vi, doi, causal=causal)
        check_attention(f"{name} sequence {i}",
                        {field: _sequence_of(field, t, rows, keys) for field, t in got.items()},
                        ref, base, dtype)


def _sequence_of(field: str, packed: torch.Tensor, rows: slice, keys: slice) -> torch.Tensor:
    """One sequence's part of a packed output, with a batch axis: lse (H, total_q) by its
    columns, dk and dv by key rows, the others by query rows."""
    if field == "lse":
        return packed[:, rows][None]
    return packed[keys if field in ("dk", "dv") else rows][None]


@needs_hopper
def test_varlen_with_two_cumulative_tensors_keeps_triton(monkeypatch):
    """Separate cu_seqlens for queries and keys (the lengths may differ: a row may see no
    key) stay on the Triton kernels even with gluon_varlen on, and are right."""
    dev = torch.device("cuda")
    calls = _gluon_everywhere(monkeypatch)
    lens_q, lens_k = [300, 40], [200, 90]
    cu_q, cu_k = cumulative(lens_q, dev), cumulative(lens_k, dev)
    q = torch.randn(sum(lens_q), 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 128, device=dev, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    out = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 200, causal=True)
    assert calls == []
    for i, rows, keys in per_sequence(cu_q, cu_k):
        ref = reference_attention(q[rows][None], k[keys][None], v[keys][None], causal=True,
                                  dtype=torch.float64)
        base = reference_attention(q[rows][None], k[keys][None], v[keys][None], causal=True)
        check_attention(f"sequence {i}", dict(out=out[rows][None]), ref, base, torch.bfloat16,
                        fields=("out",))


@pytest.mark.parametrize("feature", [False, True])
def test_which_packed_batches_the_gluon_kernels_take(feature, monkeypatch):
    """varlen_covered on any machine: the feature on, and one cumulative-lengths tensor (or
    one storage) for queries and keys."""
    monkeypatch.setitem(configs.features, "gluon_varlen", feature)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    same = AttnOptions(softmax_scale=0.1, diag_offset=0, varlen=(cu, cu, 5, 5))
    view = AttnOptions(softmax_scale=0.1, diag_offset=0, varlen=(cu, cu[:], 5, 5))
    copy = AttnOptions(softmax_scale=0.1, diag_offset=0, varlen=(cu, cu.clone(), 5, 5))
    assert hopper.varlen_covered(same) is feature
    assert hopper.varlen_covered(view) is feature
    assert not hopper.varlen_covered(copy)  # equal values, but not known without a read
