"""CUDA graphs and determinism.

CUDA graphs (GPU only): forward and backward of flash_attn_func, and a decoding loop of
flash_attn_with_kvcache (append into the cache at a cache_seqlens tensor advanced in place), are
captured after a warm-up on a side stream (which also autotunes), then replayed with new values
copied into the static inputs. Every replay must equal an eager call on the same values bit for
bit (the same kernels and configs), and the rule against the float64 reference. Capture runs
with torch.cuda.set_sync_debug_mode("error"): a host synchronization inside the captured region
raises instead of passing unnoticed.

Determinism: repeated backward passes are bitwise equal (100 on a GPU, 5 under the interpreter).
The same with another process filling most of the GPU memory is scripts/determinism.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU

import flashtile
from flashtile import masks
from flashtile.testing import check_attention, reference_attention

F64 = torch.float64
FIELDS = ("out", "lse", "dq", "dk", "dv")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")


def warm_up(step, times: int = 3) -> None:
    """Run `step` on a side stream, as torch.cuda.graphs asks before a capture (autotuning and
    lazy initialization happen here, outside the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture(step):
    """A CUDA graph of `step` and its static outputs; a host synchronization raises."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            outputs = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph, outputs


def refill_(tensors) -> None:
    """New standard-normal values into static tensors, in place."""
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t))


GRAPH_CASES = {
    "causal_gqa": dict(causal=True),
    "window_softcap_alibi": dict(window_size=(96, 17), softcap=20.0, alibi=True),
    "plain": {},
    # (batch, seqlen_q, seqlen_k) long enough that a Hopper GPU runs the Gluon forward and both
    # Gluon backward passes, whose TMA descriptors are made in the kernel (global scratch)
    "gluon_causal_gqa": dict(causal=True, shape=(1, 1100, 4200)),
}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", GRAPH_CASES)
def test_flash_attn_func_forward_backward_in_a_graph(name, dtype, dev):
    kw = dict(GRAPH_CASES[name])
    batch, seqlen_q, seqlen_k = kw.pop("shape", (2, 333, 517))
    nheads, nheads_k, head_dim = 8, 2, 128
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(batch, nheads, device=dev) * 0.3
    q = torch.randn(batch, seqlen_q, nheads, head_dim, device=dev, dtype=dtype,
                    requires_grad=True)
    k, v = (torch.randn(batch, seqlen_k, nheads_k, head_dim, device=dev, dtype=dtype,
                        requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)

    def step():
        out, lse = flashtile.flash_attn_func(q, k, v, return_lse=True, **kw)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    warm_up(step)
    graph, static = capture(step)
    for replay in range(3):
        refill_((q, k, v, dout))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for field, a, b in zip(FIELDS, static, eager):
            assert torch.equal(a, b), f"replay {replay}: {field} differs from an eager call"
    ref = reference_attention(q, k, v, dout, dtype=F64, **kw)
    base = reference_attention(q, k, v, dout, **kw)
    check_attention(f"graph replay {name}", dict(zip(FIELDS, static)), ref, base, dtype)


@needs_gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decoding_in_a_graph(paged, dev):
    """One decoding step (append one token, attend) captured once and replayed for 6 tokens,
    cache_seqlens advanced in place between replays; an eager twin runs on a copy of the
    cache. Split-KV is on (num_splits=0 chooses splits for this small batch)."""
    batch, nheads, nheads_k, head_dim, steps, dtype = 3, 8, 2, 128, 6, torch.float16
    if paged:
        page, pages = 64, 4
        blocks = batch * pages + 2
        k_cache, v_cache = (torch.randn(blocks, page, nheads_k, head_dim, device=dev,
                                        dtype=dtype) for _ in range(2))
        block_table = torch.randperm(blocks, device=dev)[:batch * pages].view(batch, pages)
        block_table = block_table.to(torch.int32)
    else:
        k_cache, v_cache = (torch.randn(batch, 256, nheads_k, head_dim, device=dev,
                                        dtype=dtype) for _ in range(2))
        block_table = None
    cache_seqlens = torch.tensor([5, 100, 190], dtype=torch.int32, device=dev)
    q = torch.randn(batch, 1, nheads, head_dim, device=dev, dtype=dtype)
    k_new, v_new = (torch.randn(batch, 1, nheads_k, head_dim, device=dev, dtype=dtype)
                    for _ in range(2))
    initial = [t.clone() for t in (k_cache, v_cache, cache_seqlens)]

    def step(q, k_new, v_new, k_cache, v_cache, cache_seqlens):
        return flashtile.flash_attn_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
            block_table=block_table, causal=True, return_softmax_lse=True)

    static = (q, k_new, v_new, k_cache, v_cache, cache_seqlens)
    warm_up(lambda: step(*static))
    graph, (out, lse) = capture(lambda: step(*static))
    for t, t0 in zip((k_cache, v_cache, cache_seqlens), initial):  # undo the warm-up's appends
        t.copy_(t0)
    twin = [t.clone() for t in initial]  # k_cache, v_cache, cache_seqlens of the eager calls
    for token in range(steps):
        refill_((q, k_new, v_new))
        graph.replay()
        out_e, lse_e = step(q, k_new, v_new, *twin)
        torch.cuda.synchronize()
        assert torch.equal(out, out_e) and torch.equal(lse, lse_e), f"token {token}"
        assert torch.equal(k_cache, twin[0]) and torch.equal(v_cache, twin[1]), (
            f"token {token}: the captured append wrote elsewhere")
        cache_seqlens.add_(1)
        twin[2].add_(1)
    # the last token against the reference, entry by entry
    if paged:
        keys = k_cache[block_table.long()].flatten(1, 2)
        values = v_cache[block_table.long()].flatten(1, 2)
    else:
        keys, values = k_cache, v_cache
    for b, n in enumerate(cache_seqlens.tolist()):  # already advanced past the last token
        qi, ki, vi = q[b:b + 1], keys[b:b + 1, :n], values[b:b + 1, :n]
        ref = reference_attention(qi, ki, vi, None, causal=True, dtype=F64)
        base = reference_attention(qi, ki, vi, None, causal=True)
        check_attention(f"entry {b}", dict(out=out[b:b + 1], lse=lse[b:b + 1]), ref, base,
                        dtype, fields=("out", "lse"))


@needs_gpu
def test_dropout_in_a_graph_is_refused(dev):
    """The dropout seed is drawn on the host when the call runs: a captured call would bake one
    seed into the graph and every replay would apply the same mask. Capturing it raises."""
    q, k, v = (torch.randn(1, 256, 4, 64, device=dev, dtype=torch.float16) for _ in range(3))

    def step():
        return flashtile.flash_attn_func(q, k, v, dropout_p=0.5)

    warm_up(step)
    with pytest.raises(NotImplementedError, match="dropout_p > 0 while a CUDA graph"):
        capture(step)


# -- determinism --------------------------------------------------------------------------------

PASSES = 100 if ON_GPU else 5


def _document_ids(seqlen, dev):
    lengths = [seqlen // 3, seqlen // 5, seqlen - seqlen // 3 - seqlen // 5]
    return torch.repeat_interleave(torch.arange(3, device=dev), torch.tensor(lengths, device=dev))


def _determinism_call(name, dev):
    """(inputs, dout, a function of the inputs returning out) for one case."""
    # (seqlen, query heads, kv heads, head dim): interpreter-sized on the CPU
    n, heads, heads_k, d = (1000, 8, 2, 128) if ON_GPU else (70, 2, 1, 32)
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    if name == "varlen_dropout":
        lens_q = [n // 2, 0, n, 7]
        lens_k = [n, 3, n // 3, 0]
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32,
                            device=dev)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32,
                            device=dev)
        q = torch.randn(sum(lens_q), heads, d, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(sum(lens_k), heads_k, d, device=dev, dtype=dtype,
                            requires_grad=True) for _ in range(2))

        def call(q, k, v):
            torch.manual_seed(1234)  # the same dropout mask every pass
            return flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q),
                                                    max(lens_k), dropout_p=0.2, causal=True)
    else:
        q = torch.randn(2, n, heads, d, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, n, heads_k, d, device=dev, dtype=dtype, requires_grad=True)
                for _ in range(2))
        mask = masks.document(_document_ids(n, dev)) if name == "document_mask" else None

        def call(q, k, v):
            return flashtile.flash_attn_func(q, k, v, causal=True, mask_mod=mask)
    return (q, k, v), torch.randn_like(q), call


@pytest.mark.parametrize("name", ["causal_gqa", "varlen_dropout", "document_mask"])
def test_repeated_backward_passes_are_bitwise_equal(name, dev):
    inputs, dout, call = _determinism_call(name, dev)

    def grads():
        return torch.autograd.grad(call(*inputs), inputs, dout)

    first = grads()
    for attempt in range(1, PASSES):
        for field, a, b in zip(("dq", "dk", "dv"), first, grads()):
            assert torch.equal(a, b), f"pass {attempt}: {field} differs from pass 0"


@needs_gpu
def test_varlen_forward_backward_in_a_graph(dev):
    cu = torch.tensor([0, 100, 100, 333], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(333, 4, 64, device=dev, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        out = flashtile.flash_attn_varlen_func(q, k, v, cu, cu, 233, 233, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    warm_up(step)
    graph, static = capture(step)
    refill_((q, k, v, dout))
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["one_stream", "dq_on_second_stream"])
def test_dq_stream_changes_no_bit(overlap, dev, monkeypatch):
    """configs.features["overlap_dq"] runs dQ beside dK/dV on a second stream: the same kernels
    on the same inputs, so the gradients equal those of one stream bit for bit, and a caller's
    later work on its own stream sees them finished."""
    from flashtile.kernels import configs

    q, k, v = (torch.randn(2, 777, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    grads = {}
    for on in (not overlap, overlap):
        monkeypatch.setitem(configs.features, "overlap_dq", on)
        out = flashtile.flash_attn_func(q, k, v, causal=True)
        # the caller's stream reads dq at once: it must wait for the side stream
        grads[on] = [g.clone() for g in torch.autograd.grad(out, (q, k, v), dout)]
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
