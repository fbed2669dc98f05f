"""The custom ops flashtile::fwd and flashtile::bwd (flashtile/ops.py): their registration
(schema, fake tensors, autograd) through torch.library.opcheck, and the public functions under
torch.compile(fullgraph=True) and torch.export against eager mode.

Compiled and eager runs launch the same kernels on the same values, so they are compared
exactly with aot_eager (the same ATen ops around the kernels) and to 2 · FLOOR[dtype] (one unit
in the last place of a 16-bit result) with inductor, which may fuse those ops. Shapes are
interpreter-sized, since opcheck runs each op several times: one block of the interpreter's 32
queries, keys across a 16-key block edge, lengths multiples of nothing, grouped-query heads, and
a packed batch with an empty sequence and sequences longer and shorter than their keys.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU
from torch._dynamo.testing import CompileCounterWithBackend

import flashtile
from flashtile import masks
from flashtile.testing import FLOOR, assert_close, reference_attention, tolerance

FWD, BWD = torch.ops.flashtile.fwd.default, torch.ops.flashtile.bwd.default


# -- opcheck: schema, fake tensors, autograd registration, AOT dispatch ------------------------

def _fwd_args(dev, *, nheads_k=2, varlen=False, dropout_p=0.0, alibi=False):
    """Arguments of flashtile::fwd: (1, 9, 2, 16) queries against 19 keys, or a packed batch
    of lengths (4, 0, 5) queries and (17, 1, 1) keys; causal, softcap 5."""
    seqlen_q, seqlen_k = 9, 19
    q = torch.randn(1, seqlen_q, 2, 16, device=dev, requires_grad=True)
    k, v = (torch.randn(1, seqlen_k, nheads_k, 16, device=dev, requires_grad=True)
            for _ in range(2))
    cu_q = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=dev) if varlen else None
    cu_k = torch.tensor([0, 17, 18, 19], dtype=torch.int32, device=dev) if varlen else None
    slopes = torch.tensor([0.5, 0.25], device=dev) if alibi else None
    seed = torch.tensor(1234) if dropout_p else None
    diag_offset = 0 if varlen else seqlen_k - seqlen_q
    max_q, max_k = (5, 17) if varlen else (0, 0)
    return (q, k, v, slopes, cu_q, cu_k, seed, 0.25, diag_offset, -1, 0, 5.0, dropout_p,
            max_q, max_k)


OPCHECK_CASES = {
    "causal+softcap": {},
    "gqa2:1+alibi": dict(nheads_k=1, alibi=True),
    "varlen": dict(varlen=True),
    "dropout": dict(dropout_p=0.25),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, dev):
    args = _fwd_args(dev, **OPCHECK_CASES[case])
    torch.library.opcheck(FWD, args)
    q, k, v, *options = args
    out, lse = FWD(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(BWD, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                *options))


def _kvcache_args(dev, *, paged=False, num_splits=1):
    """Arguments of flashtile::fwd_kvcache: 2 entries of 3 queries, 4 heads over 2, against 19
    and 33 cached keys; a contiguous cache read in rows (2, 0), or 16-key pages shuffled."""
    q = torch.randn(2, 3, 4, 16, device=dev)
    if paged:
        k_pages, v_pages = (torch.randn(6, 16, 2, 16, device=dev) for _ in range(2))
        k_cache, v_cache = (t.view(1, -1, 2, 16) for t in (k_pages, v_pages))
        block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32, device=dev)
        batch_idx = torch.zeros(2, dtype=torch.int32, device=dev)
    else:
        k_cache, v_cache = (torch.randn(3, 40, 2, 16, device=dev) for _ in range(2))
        block_table = None
        batch_idx = torch.tensor([2, 0], dtype=torch.int32, device=dev)
    seqlens_k = torch.tensor([19, 33], dtype=torch.int32, device=dev)
    return (q, k_cache, v_cache, seqlens_k, batch_idx, block_table, None, 0.25, -1, 0, 0.0,
            16 if paged else 0, num_splits)


@pytest.mark.parametrize("paged,num_splits", [(False, 1), (False, 2), (True, 1)],
                         ids=["contiguous", "contiguous_split2", "paged"])
def test_opcheck_kvcache(paged, num_splits, dev):
    torch.library.opcheck(torch.ops.flashtile.fwd_kvcache.default,
                          _kvcache_args(dev, paged=paged, num_splits=num_splits))


def test_lse_is_not_differentiable(dev):
    q, k, v = (torch.randn(1, 9, 2, 16, device=dev, requires_grad=True) for _ in range(3))
    out, lse = flashtile.flash_attn_func(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# -- the public functions, compiled and exported -----------------------------------------------
# Each case: a function of tensors only (what torch.compile and torch.export take as inputs)
# and the inputs it gets; the first three inputs are differentiated.

def _func(q, k, v, slopes):
    return flashtile.flash_attn_func(q, k, v, causal=True, window_size=(6, -1), softcap=5.0,
                                     alibi_slopes=slopes)


def _gqa(q, k, v):
    return flashtile.flash_attn_func(q, k, v, softmax_scale=0.3)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k):
    return flashtile.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, 7, 17,
                                            causal=True)


def _sdpa(query, key, value):
    return flashtile.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                  enable_gqa=True)


def _dropout(q, k, v):
    return flashtile.flash_attn_func(q, k, v, dropout_p=0.25)


def _kvpacked(q, k, v):  # k and v stacked inside the graph: the call reads strided views
    return flashtile.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2), causal=True)


CASES = {"func": _func, "gqa4:1": _gqa, "varlen": _varlen, "sdpa": _sdpa, "dropout": _dropout,
         "kvpacked": _kvpacked}


def _inputs(case: str, dev, dtype=torch.float32, seqlen_q: int = 9) -> tuple:
    seqlen_k = seqlen_q + 10
    if case == "varlen":  # lengths (7, 0, 5) queries, (17, 4, 3) keys
        q, k, v = (torch.randn(n, 2, 16, device=dev, dtype=dtype) for n in (12, 24, 24))
        return (q, k, v, torch.tensor([0, 7, 7, 12], dtype=torch.int32, device=dev),
                torch.tensor([0, 17, 21, 24], dtype=torch.int32, device=dev))
    if case == "sdpa":  # (B, H, L, E), 4 query heads over 2 key heads
        return (torch.randn(1, 4, seqlen_q, 16, device=dev, dtype=dtype),
                *(torch.randn(1, 2, seqlen_k, 16, device=dev, dtype=dtype) for _ in range(2)))
    nheads_k = 1 if case == "gqa4:1" else 4
    q = torch.randn(2, seqlen_q, 4, 16, device=dev, dtype=dtype)
    k, v = (torch.randn(2, seqlen_k, nheads_k, 16, device=dev, dtype=dtype) for _ in range(2))
    if case == "func":
        return q, k, v, torch.tensor([0.5, 0.25, 0.125, 0.0625], device=dev)
    return q, k, v


def _run(fn, inputs: tuple, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """out and the gradients of sum(out · weight) for q, k, v, on fresh leaves, after
    torch.manual_seed(0) (so that dropout draws one seed in every run)."""
    q, k, v = (t.detach().requires_grad_() for t in inputs[:3])
    torch.manual_seed(0)
    out = fn(q, k, v, *inputs[3:])
    weight = torch.randn_like(out) if weight is None else weight
    (out * weight).sum().backward()
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, weight=weight)


def _assert_same(name: str, got: dict, want: dict, atol_floor: float) -> None:
    for field in ("out", "dq", "dk", "dv"):
        atol = atol_floor * max(1.0, want[field].abs().max().item())
        assert_close(f"{name} {field}", got[field], want[field], atol)


def _compiled(fn, backend: str, **kwargs):
    """fn under torch.compile(fullgraph=True) and a counter of the graphs dynamo made."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True, **kwargs), counter


def _ops_in(graph: torch.fx.GraphModule) -> set:
    return {node.target for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_eager(case, dev):
    """aot_eager: one graph with flashtile::fwd in it, forward and backward equal to eager."""
    inputs = _inputs(case, dev)
    eager = _run(CASES[case], inputs)
    fn, counter = _compiled(CASES[case], "aot_eager")
    _assert_same(f"compiled {case}", _run(fn, inputs, eager["weight"]), eager, 0.0)
    assert counter.frame_count == 1 and FWD in _ops_in(counter.graphs[0])


def test_compiled_dynamic_shapes_do_not_recompile(dev):
    """With dynamic=True a second sequence length reuses the graph (the validation does not
    specialize on it), and both match eager."""
    fn, counter = _compiled(_func, "aot_eager", dynamic=True)
    graphs = []
    for seqlen_q in (9, 14):
        inputs = _inputs("func", dev, seqlen_q=seqlen_q)
        eager = _run(_func, inputs)
        _assert_same(f"dynamic seqlen_q={seqlen_q}", _run(fn, inputs, eager["weight"]), eager,
                     0.0)
        graphs.append(counter.frame_count)
    assert graphs[0] > 0 and graphs[1] == graphs[0], f"graphs made after each call: {graphs}"


@pytest.mark.parametrize("case", list(CASES))
def test_exported_matches_eager(case, dev):
    class Attention(torch.nn.Module):
        def forward(self, *inputs):
            return CASES[case](*inputs)

    inputs = _inputs(case, dev)
    program = torch.export.export(Attention(), inputs)
    assert FWD in _ops_in(program.graph_module)
    torch.manual_seed(0)
    want = CASES[case](*inputs)
    torch.manual_seed(0)
    assert_close(f"exported {case}", program.module()(*inputs), want, 0.0)


def _decode_step(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, num_splits):
    return flashtile.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, block_table=block_table,
        causal=True, num_splits=num_splits, return_softmax_lse=True)


@pytest.mark.parametrize("paged,num_splits", [(False, 1), (False, 2), (True, 1)],
                         ids=["contiguous", "contiguous_split2", "paged"])
def test_compiled_decode_step_matches_eager(paged, num_splits, dev):
    """flash_attn_with_kvcache, append included, is one graph: the append as in-place ATen
    ops, the attention as flashtile::fwd_kvcache. Same out, lse and cache as eager."""
    if paged:
        k_cache, v_cache = (torch.randn(6, 16, 2, 16, device=dev) for _ in range(2))
        block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32, device=dev)
    else:
        k_cache, v_cache = (torch.randn(2, 40, 2, 16, device=dev) for _ in range(2))
        block_table = None
    q = torch.randn(2, 1, 4, 16, device=dev)
    k_new, v_new = (torch.randn(2, 1, 2, 16, device=dev) for _ in range(2))
    cache_seqlens = torch.tensor([15, 31], dtype=torch.int32, device=dev)  # appends at a page end
    runs = {}
    fn, counter = _compiled(_decode_step, "aot_eager")
    for name, step in (("eager", _decode_step), ("compiled", fn)):
        caches = k_cache.clone(), v_cache.clone()
        out, lse = step(q, *caches, k_new, v_new, cache_seqlens, block_table, num_splits)
        runs[name] = dict(out=out, lse=lse, k_cache=caches[0], v_cache=caches[1])
    for field, want in runs["eager"].items():
        assert_close(f"compiled decode step {field}", runs["compiled"][field], want, 0.0)
    assert counter.frame_count == 1
    assert torch.ops.flashtile.fwd_kvcache.default in _ops_in(counter.graphs[0])


def test_mask_mod_runs_eagerly_under_compile(dev):
    """A mask predicate cannot cross the ops: torch.compile runs that call eagerly behind a
    graph break, so fullgraph=True refuses it with the reason, and torch.export raises."""
    mask = masks.sliding_window(5, device=dev)

    def masked(q, k, v):
        return flashtile.flash_attn_func(q, k, v, mask_mod=mask)

    inputs = _inputs("gqa4:1", dev)
    eager = _run(masked, inputs)
    torch._dynamo.reset()
    broken = torch.compile(masked, backend="aot_eager")
    _assert_same("mask_mod with a graph break", _run(broken, inputs, eager["weight"]), eager,
                 0.0)
    fn, _ = _compiled(masked, "aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="eager mode only"):
        fn(*inputs)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return masked(q, k, v)

    with pytest.raises(NotImplementedError, match="eager mode only"):
        torch.export.export(Attention(), inputs)


def test_attn_probs_run_eagerly_under_compile(dev):
    """return_attn_probs launches the probabilities kernel outside the ops: torch.compile runs
    it behind a graph break, with the dropout seed of the compiled forward."""
    def with_probs(q, k, v):
        return flashtile.flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)

    inputs = _inputs("gqa4:1", dev)
    torch.manual_seed(0)
    want = with_probs(*inputs)
    torch._dynamo.reset()
    torch.manual_seed(0)
    got = torch.compile(with_probs, backend="aot_eager")(*inputs)
    for name, actual, expected in zip(("out", "lse", "probs"), got, want):
        assert_close(f"compiled return_attn_probs {name}", actual, expected, 0.0)


@pytest.mark.skipif(not ON_GPU, reason="inductor's GPU code: CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_inductor_matches_eager(case, dtype, dev):
    """The default backend: one graph, forward and backward equal to eager up to 2 · FLOOR[dtype]
    (inductor may fuse the ops around the kernels). Inductor draws random numbers its own way;
    with fallback_random it draws dropout's seed as eager does, so dropout is compared too."""
    inputs = _inputs(case, dev, dtype)
    eager = _run(CASES[case], inputs)
    fn, counter = _compiled(CASES[case], "inductor")
    with torch._inductor.config.patch(fallback_random=True):
        compiled = _run(fn, inputs, eager["weight"])
    _assert_same(f"inductor {case}", compiled, eager, 2 * FLOOR[dtype])
    assert counter.frame_count == 1 and FWD in _ops_in(counter.graphs[0])


@pytest.mark.skipif(not ON_GPU, reason="inductor's GPU code: CUDA only")
@pytest.mark.parametrize("num_splits", [1, 3, 0], ids=["one", "split3", "auto"])
def test_inductor_decode_step_matches_eager(num_splits, dev):
    """The decode step under the default backend, num_splits=0 choosing splits from the GPU's
    SM count while tracing."""
    k_cache, v_cache = (torch.randn(2, 600, 2, 64, device=dev, dtype=torch.float16)
                        for _ in range(2))
    q = torch.randn(2, 1, 8, 64, device=dev, dtype=torch.float16)
    k_new, v_new = (torch.randn(2, 1, 2, 64, device=dev, dtype=torch.float16) for _ in range(2))
    cache_seqlens = torch.tensor([100, 513], dtype=torch.int32, device=dev)
    runs = {}
    fn, counter = _compiled(_decode_step, "inductor")
    for name, step in (("eager", _decode_step), ("compiled", fn)):
        caches = k_cache.clone(), v_cache.clone()
        out, lse = step(q, *caches, k_new, v_new, cache_seqlens, None, num_splits)
        runs[name] = dict(out=out, lse=lse, k_cache=caches[0], v_cache=caches[1])
    for field, want in runs["eager"].items():
        atol = 2 * FLOOR[torch.float16] * max(1.0, want.abs().max().item())
        assert_close(f"inductor decode step {field}", runs["compiled"][field], want, atol)
    assert counter.frame_count == 1


def test_eager_calls_skip_the_op_dispatch(dev, monkeypatch):
    """In eager mode the kernels run through the autograd Function, not the ops (whose dispatch
    costs more host time); the compiler alone sees the ops (tests above)."""
    from flashtile import ops

    def no_op(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(ops, "attention", no_op)
    monkeypatch.setattr(ops, "attention_kvcache", no_op)
    q, k, v = (torch.randn(1, 9, 2, 16, device=dev, requires_grad=True) for _ in range(3))
    out = flashtile.flash_attn_func(q, k, v, causal=True)
    out.sum().backward()
    want = reference_attention(q, k, v, torch.ones_like(out), causal=True)
    assert_close("eager out", out, want.out, tolerance(want.out, want.out, torch.float32))
    flashtile.flash_attn_with_kvcache(q.detach(), k.detach(), v.detach(), cache_seqlens=9)
