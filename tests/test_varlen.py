"""flash_attn_varlen_func against per-sequence float64 references (FlashAttention's rule):
packed batches with empty, single-token and unequal sequences, every dense feature."""

import pytest
import torch
from conftest import ON_GPU

import flashtile
from flashtile.testing import assert_close, check_attention, reference_attention, tolerance

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])


def cumulative(lengths, dev):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=dev)


def packed(lens_q, lens_k, nheads, nheads_k, head_dim, dtype, dev):
    cu_q, cu_k = cumulative(lens_q, dev), cumulative(lens_k, dev)
    q = torch.randn(sum(lens_q), nheads, head_dim, device=dev, dtype=dtype).requires_grad_()
    k, v = (torch.randn(sum(lens_k), nheads_k, head_dim, device=dev, dtype=dtype)
            .requires_grad_() for _ in range(2))
    return q, k, v, cu_q, cu_k


def per_sequence(cu_q, cu_k):
    for i in range(cu_q.numel() - 1):
        yield i, slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))


MANY_Q = [(7 * i) % 23 for i in range(130)] + [75]
MANY_K = [n and n + (5 * i) % 19 + 16 for i, n in enumerate(MANY_Q[:-1])] + [90]

# (name, seqlens_q, seqlens_k, nheads, nheads_k, options)
CASES = [
    ("equal_with_empty", [17, 40, 0, 33], [17, 40, 0, 33], 2, 2, {}),
    ("unequal_causal", [17, 40, 5, 33], [30, 12, 9, 50], 2, 2, dict(causal=True)),
    ("single_tokens_causal", [1, 64, 1], [64, 1, 5], 2, 2, dict(causal=True)),
    ("gqa_window", [20, 70], [70, 20], 4, 1, dict(window_size=(8, 3))),
    ("softcap_alibi", [45, 30], [30, 45], 2, 2, dict(softcap=5.0, alibi=True)),
    ("empty_keys", [10, 12], [0, 12], 2, 2, {}),
    # keys with no queries: their dk, dv are zeros, written by programs that must not exit
    ("empty_queries", [0, 12], [10, 12], 2, 2, {}),
    # 131 sequences, short ones (empty among them) before a long one whose tiles most entries
    # lack: grid axis 2 past a hundred entries, nearly every program idle. Every row sees 16
    # keys or more: rows with one or two keys are 16-bit precision's known limit
    # (test_fuzz.py), not this case's subject
    ("many_sequences_causal", MANY_Q, MANY_K, 1, 1, dict(causal=True)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,lens_q,lens_k,nheads,nheads_k,options", CASES,
                         ids=[c[0] for c in CASES])
def test_varlen_matches_per_sequence_reference(name, lens_q, lens_k, nheads, nheads_k, options,
                                               dtype, dev):
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, nheads, nheads_k, 32, dtype, dev)
    options = dict(options)
    slopes = None
    if options.pop("alibi", False):  # per batch entry: (batch, nheads)
        slopes = torch.rand(len(lens_q), nheads, device=dev) * 0.3
    dout = torch.randn_like(q)
    out, lse = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                alibi_slopes=slopes, return_lse=True, **options)
    assert out.shape == q.shape and lse.shape == (nheads, q.shape[0])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for i, rows, keys in per_sequence(cu_q, cu_k):
        qi, ki, vi, doi = q[rows][None], k[keys][None], v[keys][None], dout[rows][None]
        extra = dict(options, alibi_slopes=slopes[i] if slopes is not None else None)
        ref = reference_attention(qi, ki, vi, doi, dtype=torch.float64, **extra)
        base = reference_attention(qi, ki, vi, doi, **extra)
        got = dict(out=out[rows][None], lse=lse[:, rows][None], dq=dq[rows][None],
                   dk=dk[keys][None], dv=dv[keys][None])
        fields = [f for f, n in (("out", rows), ("lse", rows), ("dq", rows), ("dk", keys),
                                 ("dv", keys)) if n.stop > n.start]
        check_attention(f"{name} sequence {i}", got, ref, base, dtype, fields=tuple(fields))


def test_varlen_dropout_and_probs(dev):
    """Dropout and return_attn_probs per sequence: probs zero beyond each sequence, out =
    probs @ v, the same seed the same mask, and gradients match the reference given it."""
    lens_q, lens_k = [30, 0, 50], [40, 7, 25]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 2, 2, 16, torch.float32, dev)
    torch.manual_seed(11)
    out, lse, probs = flashtile.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 50, 40, dropout_p=0.25, causal=True, return_attn_probs=True)
    assert probs.shape == (3, 2, 50, 40)
    torch.manual_seed(11)
    again = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 50, 40, dropout_p=0.25,
                                             causal=True)
    assert torch.equal(out, again)
    dout = torch.randn_like(q)
    dq, dk, dv = torch.autograd.grad(again, (q, k, v), dout)
    for i, rows, keys in per_sequence(cu_q, cu_k):
        nq, nk = rows.stop - rows.start, keys.stop - keys.start
        p = probs[i, :, :nq, :nk]
        assert not bool(probs[i, :, nq:].any()) and not bool(probs[i, :, :, nk:].any())
        if nq == 0:
            continue
        qi, ki, vi, doi = q[rows][None], k[keys][None], v[keys][None], dout[rows][None]
        plain = reference_attention(qi, ki, vi, None, causal=True, dtype=torch.float64,
                                    return_probs=True)
        keep = (p != 0) | (plain.probs[0] == 0)
        ref = reference_attention(qi, ki, vi, doi, causal=True, dtype=torch.float64,
                                  dropout_p=0.25, dropout_keep=keep[None])
        base = reference_attention(qi, ki, vi, doi, causal=True, dropout_p=0.25,
                                   dropout_keep=keep[None])
        got = dict(out=out[rows][None], lse=lse[:, rows][None], dq=dq[rows][None],
                   dk=dk[keys][None], dv=dv[keys][None])
        check_attention(f"dropout sequence {i}", got, ref, base, torch.float32)
        via_probs = torch.einsum("hmn,nhd->mhd", p.double(), v[keys].double())
        assert_close("out vs probs @ v", out[rows], via_probs,
                     tolerance(ref.out[0], base.out[0], torch.float32))


def _call(dev, **over):
    q, k, v, cu_q, cu_k = packed([5, 7], [6, 8], 2, 2, 16, torch.float16, dev)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7,
                max_seqlen_k=8)
    args.update({name: (f(args) if callable(f) else f) for name, f in over.items()})
    return flashtile.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), ValueError,
     r"cu_seqlens_q must be a 1-D int32 tensor"),
    (dict(cu_seqlens_q=lambda a: torch.tensor([0, 5, 11], dtype=torch.int32,
                                              device=a["q"].device)), ValueError,
     r"cu_seqlens_q must start at 0, never decrease and end at 12"),
    (dict(cu_seqlens_k=lambda a: torch.tensor([0, 14], dtype=torch.int32,
                                              device=a["q"].device)), ValueError,
     r"cu_seqlens_k must start at 0, never decrease and end at 14|cu_seqlens_k has 2 entries"),
    (dict(max_seqlen_q=6), ValueError, r"max_seqlen_q must be an int of at least the longest "
                                       r"sequence \(7\), got 6"),
    (dict(q=lambda a: a["q"][None]), ValueError, r"q must have 3 dimensions"),
    (dict(alibi_slopes=lambda a: torch.ones(3, 2, device=a["q"].device)), ValueError,
     r"alibi_slopes must have shape \(2,\) or \(2, 2\)"),
], ids=["int64_cu", "cu_not_ending_at_total", "cu_lengths_differ", "max_too_small", "rank",
        "alibi_batch"])
def test_varlen_bad_input_is_named(over, exc, match, dev):
    with pytest.raises(exc, match=match):
        _call(dev, **over)


def test_cu_seqlens_are_read_once_until_written(dev, monkeypatch):
    """The values of a cu_seqlens tensor are read on the host (a synchronization) the first time
    it is seen, not again while it is unchanged, and again after an in-place write."""
    q, k, v, cu, _ = packed([5, 9, 4], [5, 9, 4], 2, 2, 16, torch.float16, dev)
    reads = []
    tolist = torch.Tensor.tolist

    def counted(t):
        reads.append(t.data_ptr())
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    first = flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9)
    again = flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9)
    assert reads == [cu.data_ptr()]  # one read for both arguments and both calls
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="max_seqlen_q must be an int of at least the longest "
                                         r"sequence \(9\)"):
        flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 8, 9)  # the cached longest is used
    cu[1] = 12  # now [0, 12, 14, 18]: monotone, longest 12
    with pytest.raises(ValueError, match=r"at least the longest sequence \(12\)"):
        flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9)
    cu[1] = 15  # [0, 15, 14, 18]: decreasing
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease"):
        flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 15, 15)
    assert len(reads) == 3


def test_cu_seqlens_made_in_inference_mode_are_read_every_call(dev, monkeypatch):
    """An inference tensor has no version counter, so nothing is remembered: each call reads
    its values, and an in-place write is caught."""
    q, k, v, _, _ = packed([5, 9, 4], [5, 9, 4], 2, 2, 16, torch.float16, dev)
    with torch.inference_mode():
        cu = cumulative([5, 9, 4], dev)
        out = flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9)
    rows = slice(5, 14)  # the second sequence
    qi, ki, vi = q[rows][None], k[rows][None], v[rows][None]
    ref = reference_attention(qi, ki, vi, dtype=torch.float64)
    base = reference_attention(qi, ki, vi)
    check_attention("inference-mode cu_seqlens", {"out": out[rows][None]}, ref, base,
                    torch.float16, fields=("out",))
    with torch.inference_mode():
        cu[1] = 15  # [0, 15, 14, 18]: decreasing
        with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease"):
            flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 15, 15)
