"""Context parallelism (flashtile.distributed) on the CPU: gloo process groups of 2 and 4 ranks
spawned with torch.multiprocessing, every rank's shard run through the Triton interpreter.

Starting a process that imports torch, Triton and flashtile costs seconds, so every case of one
world size runs inside one spawned group (`_run_group`, once per session); the ranks save their
shards' results and this process unshards them and applies FlashAttention's rule
(flashtile.testing) against the float64 reference, and the same bound against single-process
flash_attn_func on the whole sequence. The sequences are short (48 tokens: zig-zag chunks of 12
and 6 rows, against the interpreter's 32 × 16 tiles) because the interpreter is slow.

The block plans, the merge and the layouts are also checked directly, without processes.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ON_GPU, SEED

import flashtile
import flashtile.distributed as fd
from flashtile.distributed.blocks import (
    FULL,
    NONE,
    PARTIAL,
    merge_,
    plan,
    segments,
    visibility,
)
from flashtile.testing import assert_close, reference_attention, tolerance

FIELDS = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    name: str
    causal: bool
    layout: str
    kv_exchange: str
    nheads_k: int = 2
    window_size: tuple[int, int] = (-1, -1)
    batch: int = 1
    seqlen: int = 48
    nheads: int = 2
    head_dim: int = 16


CASES = {
    2: [
        Case("full", False, "contiguous", "ring"),
        Case("causal_zigzag_gqa", True, "zigzag", "ring", nheads_k=1),
        Case("causal_contiguous", True, "contiguous", "ring"),
        Case("window_gqa_batch2", False, "contiguous", "ring", nheads_k=1, window_size=(5, 3),
             batch=2),
        Case("allgather_causal_zigzag_gqa", True, "zigzag", "allgather", nheads_k=1),
        Case("allgather_window_zigzag", True, "zigzag", "allgather", window_size=(9, -1)),
    ],
    4: [
        Case("causal_zigzag_gqa", True, "zigzag", "ring", nheads_k=1),
        Case("full_gqa", False, "contiguous", "ring", nheads_k=1),
        Case("causal_contiguous", True, "contiguous", "ring"),
        Case("window_causal_zigzag", True, "zigzag", "ring", window_size=(10, -1)),
        Case("allgather_causal_zigzag", True, "zigzag", "allgather"),
    ],
}
GROUP_TIMEOUT_S = 300  # a group takes 10-40 s on two cores
REPEATED = "causal_zigzag_gqa"  # its backward runs twice: the ring's sums are deterministic


def _shard_inputs(inputs, case: Case, world_size: int, rank: int):
    return [fd.shard_sequence(t, world_size, rank, case.layout).requires_grad_(i < 3)
            for i, t in enumerate(inputs)]


def _errors(world_size: int, rank: int) -> dict[str, str]:
    """The messages of calls every rank makes wrongly, in the same way (so that none hangs)."""
    q = torch.randn(1, 8 + rank, 2, 16)  # rank 1 holds one token more
    odd = torch.randn(1, 7, 2, 16)
    calls = {
        "shard_lengths": lambda: fd.ring_flash_attn_func(q, q, q, kv_exchange="ring"),
        "zigzag_odd": lambda: fd.ring_flash_attn_func(odd, odd, odd, causal=True),
        "kv_exchange": lambda: fd.ring_flash_attn_func(odd, odd, odd, kv_exchange="gather"),
        "layout": lambda: fd.ring_flash_attn_func(odd, odd, odd, layout="striped"),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = ""
        except ValueError as e:
            messages[name] = str(e)
    return messages


def _worker(rank: int, world_size: int, init_file: str, cases: list[Case], workdir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        inputs = torch.load(os.path.join(workdir, "inputs.pt"))
        results = {}
        for case in cases:
            q, k, v, dout = _shard_inputs(inputs[case.name], case, world_size, rank)
            out, lse = fd.ring_flash_attn_func(q, k, v, causal=case.causal,
                                               window_size=case.window_size, return_lse=True,
                                               layout=case.layout, kv_exchange=case.kv_exchange)
            grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            results[case.name] = dict(zip(FIELDS, (out.detach(), lse, *grads)))
            if case.name == REPEATED:
                again = torch.autograd.grad(out, (q, k, v), dout)
                results[case.name]["repeat_equal"] = all(
                    torch.equal(a, b) for a, b in zip(grads, again))
        if world_size == 2:
            results["errors"] = _errors(world_size, rank)
        torch.save(results, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_group(world_size: int):
    """Inputs (whole sequences) and every rank's results, for CASES[world_size]. A failed group
    fails every test that needs it, with the rank's traceback, without being spawned again."""
    if ON_GPU:
        pytest.skip("the gloo ranks run the Triton interpreter on CPU tensors (numpy < 2.4); "
                    "on GPUs ring attention runs over NCCL, one process per GPU")
    outcome = _spawn_group(world_size)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@functools.cache
def _spawn_group(world_size: int):
    gen = torch.Generator().manual_seed(SEED + world_size)
    inputs = {}
    for c in CASES[world_size]:
        shapes = [(c.batch, c.seqlen, h, c.head_dim) for h in (c.nheads, c.nheads_k,
                                                                c.nheads_k, c.nheads)]
        inputs[c.name] = [torch.randn(*s, generator=gen) for s in shapes]
    with tempfile.TemporaryDirectory() as workdir:
        torch.save(inputs, os.path.join(workdir, "inputs.pt"))
        # the ranks run the kernels through the interpreter on CPU tensors, GPU or not
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            group = mp.start_processes(_worker, args=(world_size, os.path.join(workdir, "init"),
                                                      CASES[world_size], workdir),
                                       nprocs=world_size, join=False, start_method="spawn")
            deadline = time.monotonic() + GROUP_TIMEOUT_S
            while not group.join(timeout=1):
                if time.monotonic() > deadline:  # a hang in an exchange: end our ranks
                    for process in group.processes:
                        process.kill()
                    raise TimeoutError(f"the {world_size}-rank group did not finish in "
                                       f"{GROUP_TIMEOUT_S} s")
        except Exception as e:  # kept, and raised by every test of this group
            return e
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        ranks = [torch.load(os.path.join(workdir, f"rank{r}.pt")) for r in range(world_size)]
    return inputs, ranks


def _expected(case: Case, inputs, dev):
    """Single-process flashtile, the float64 reference and the float32 baseline."""
    q, k, v, dout = (t.to(dev).requires_grad_(i < 3) for i, t in enumerate(inputs))
    out, lse = flashtile.flash_attn_func(q, k, v, causal=case.causal,
                                         window_size=case.window_size, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    flash = dict(zip(FIELDS, (out.detach(), lse, *grads)))
    features = dict(causal=case.causal, window_size=case.window_size)
    reference = reference_attention(q, k, v, dout, dtype=torch.float64, **features)
    baseline = reference_attention(q, k, v, dout, **features)
    return flash, reference, baseline


@pytest.mark.parametrize("world_size,case", [(w, c) for w, cases in CASES.items()
                                             for c in cases],
                         ids=[f"world{w}-{c.name}" for w, cases in CASES.items() for c in cases])
def test_ring_matches_flashtile_and_reference(world_size, case, dev):
    inputs, ranks = _run_group(world_size)
    flash, reference, baseline = _expected(case, inputs[case.name], dev)
    for field in FIELDS:
        dim = 2 if field == "lse" else 1  # lse is (B, H, N)
        got = fd.unshard_sequence([r[case.name][field] for r in ranks], case.layout, dim=dim)
        ref, base = getattr(reference, field), getattr(baseline, field)
        atol = tolerance(ref, base, torch.float32)
        assert_close(f"{case.name} {field} vs float64", got, ref, atol)
        assert_close(f"{case.name} {field} vs flash_attn_func", got, flash[field], atol)
    if case.name == REPEATED:
        assert all(r[case.name]["repeat_equal"] for r in ranks), "backward not bitwise repeatable"


def test_errors_name_the_argument():
    _, ranks = _run_group(2)
    for errors in (r["errors"] for r in ranks):
        assert "ranks disagree on seqlen" in errors["shard_lengths"]
        assert "layout='zigzag'" in errors["zigzag_odd"] and "even" in errors["zigzag_odd"]
        assert "kv_exchange must be one of" in errors["kv_exchange"]
        assert "layout must be one of" in errors["layout"]


def test_needs_an_initialized_process_group(dev):
    q = torch.randn(1, 8, 2, 16, device=dev)
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fd.ring_flash_attn_func(q, q, q)
    with pytest.raises(ValueError, match="k has seqlen 4 but q has 8"):
        fd.ring_flash_attn_func(q, q[:, :4], q[:, :4])


@pytest.mark.parametrize("kv_exchange", ["ring", "allgather"])
def test_world_of_one_is_flash_attn_func(kv_exchange, tmp_path, dev):
    """A group of one rank (in this process): one block, the zig-zag shard is the sequence, and
    nothing is sent."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q, k, v = (torch.randn(1, 20, 2, 16, device=dev).requires_grad_() for _ in range(3))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        out = fd.ring_flash_attn_func(q, k, v, causal=True, kv_exchange=kv_exchange)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        dist.destroy_process_group()
    want = flashtile.flash_attn_func(q, k, v, causal=True)
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        assert_close(f"world of one {name}", got, ref, 1e-6)


# ---------------------------------------------------------------------------------------------
# Without processes: layouts, plans, merge.


def _mask(rows: int, cols: int, diag_offset: int, window: tuple[int, int]) -> torch.Tensor:
    i, j = torch.arange(rows)[:, None], torch.arange(cols)[None]
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if window[0] >= 0:
        keep &= j >= i + diag_offset - window[0]
    if window[1] >= 0:
        keep &= j <= i + diag_offset + window[1]
    return keep


def test_visibility_matches_the_mask():
    for rows, cols, d, left, right in itertools.product(range(1, 5), range(1, 5), range(-6, 7),
                                                        range(-1, 4), range(-1, 4)):
        keep = _mask(rows, cols, d, (left, right))
        want = NONE if not keep.any() else FULL if keep.all() else PARTIAL
        assert visibility(rows, cols, d, (left, right)) == want, (rows, cols, d, left, right)


WINDOWS = [(-1, -1), (-1, 0), (3, 0), (0, 0), (2, 5), (-1, 3), (5, -1), (1, -1)]


@pytest.mark.parametrize("layout", fd.LAYOUTS)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_plan_covers_the_mask_exactly(layout, window):
    """Every kept (query, key) pair of every (rank, block) in exactly one call, nothing else."""
    for world_size, shard_len in itertools.product((1, 2, 3, 4, 8), (2, 6)):
        seqlen = world_size * shard_len
        whole = _mask(seqlen, seqlen, 0, window)
        for rank, source in itertools.product(range(world_size), repeat=2):
            q_runs = segments(layout, world_size, rank, shard_len)
            k_runs = segments(layout, world_size, source, shard_len)
            covered = torch.zeros(shard_len, shard_len, dtype=torch.int64)
            for c in plan(q_runs, k_runs, window):
                rows, cols = c.rows.stop - c.rows.start, c.cols.stop - c.cols.start
                covered[c.rows, c.cols] += _mask(rows, cols, c.diag_offset, c.window)
            q_pos = torch.cat([torch.arange(s.start, s.start + s.length) for s in q_runs])
            k_pos = torch.cat([torch.arange(s.start, s.start + s.length) for s in k_runs])
            assert torch.equal(covered, whole[q_pos][:, k_pos].long()), (
                world_size, shard_len, rank, source)


def test_zigzag_causal_is_one_balanced_call_per_step():
    """Zig-zag: at most one kernel call per ring step, and every rank keeps as many pairs."""
    world_size, shard_len = 4, 8
    work = []
    for rank in range(world_size):
        kept = 0
        for source in range(world_size):
            calls = plan(segments("zigzag", world_size, rank, shard_len),
                         segments("zigzag", world_size, source, shard_len), (-1, 0))
            assert len(calls) == 1
            for c in calls:
                rows, cols = c.rows.stop - c.rows.start, c.cols.stop - c.cols.start
                kept += int(_mask(rows, cols, c.diag_offset, c.window).sum())
        work.append(kept)
    assert len(set(work)) == 1, work


def test_merge_is_the_split_kv_combine(dev):
    """merge_, one block at a time, equals §16's combine of all blocks at once (float64):
    LSE = log Σ_s exp(LSE_s), O = Σ_s exp(LSE_s − LSE) O_s (kernels/forward.py combine_splits)."""
    B, Nq, H, D, splits = 2, 5, 3, 4, 3
    out_s = torch.randn(splits, B, Nq, H, D, dtype=torch.float64, device=dev)
    lse_s = torch.randn(splits, B, H, Nq, dtype=torch.float64, device=dev) * 3
    lse_s[:, 0, 0, 0] = float("-inf")  # a row that sees nothing anywhere
    lse_s[1, 1] = float("-inf")  # a block that one batch entry sees nothing of
    out_s[:, 0, 0, 0] = 0.0
    out_s[1, 1] = 0.0
    out = torch.zeros(B, Nq, H, D, dtype=torch.float64, device=dev)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float64, device=dev)
    for s in range(splits):
        merge_(out, lse, out_s[s], lse_s[s])
    want_lse = torch.logsumexp(lse_s, 0)  # (B, H, Nq)
    finite = want_lse.masked_fill(want_lse == float("-inf"), 0.0)
    weight = torch.exp(lse_s - finite).transpose(2, 3).unsqueeze(-1)  # (S, B, Nq, H, 1)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, (weight * out_s).sum(0), rtol=0, atol=1e-12)
    assert bool((out[0, 0, 0] == 0).all()) and lse[0, 0, 0] == float("-inf")


def test_merge_into_a_slice_leaves_the_other_rows(dev):
    """As forward_block calls it: out and lse are slices (rows 40..99 of 130, past one block
    of the kernel's rows) of float32 tensors, out_s a bf16 partial; rows outside the slice
    keep their poison, rows inside get §16's merge (float64 on the same values)."""
    B, N, H, D = 2, 130, 3, 48
    out = torch.randn(B, N, H, D, device=dev)
    lse = torch.randn(B, H, N, device=dev) * 2
    out_s = torch.randn(B, 60, H, D, device=dev).to(torch.bfloat16)
    lse_s = torch.randn(B, H, 60, device=dev) * 2
    lse_s[1, 2, :7] = float("-inf")  # rows this block gives nothing
    rows = slice(40, 100)
    want_lse = torch.logaddexp(lse[:, :, rows].double(), lse_s.double())
    want = (torch.exp(lse[:, :, rows].double() - want_lse).transpose(1, 2)[..., None]
            * out[:, rows].double()
            + torch.exp(lse_s.double() - want_lse).transpose(1, 2)[..., None] * out_s.double())
    before_out, before_lse = out.clone(), lse.clone()
    merge_(out[:, rows], lse[:, :, rows], out_s, lse_s)
    torch.testing.assert_close(out[:, rows].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, rows].double(), want_lse, rtol=1e-6, atol=1e-6)
    for keep in (slice(0, 40), slice(100, N)):
        assert torch.equal(out[:, keep], before_out[:, keep])
        assert torch.equal(lse[:, :, keep], before_lse[:, :, keep])


@pytest.mark.parametrize("layout", fd.LAYOUTS)
def test_shard_unshard_round_trip(layout):
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [fd.shard_sequence(x, 4, r, layout) for r in range(4)]
    assert torch.equal(fd.unshard_sequence(shards, layout), x)
    if layout == "zigzag":  # chunks of 3 tokens: rank 0 holds the first and the last
        assert shards[0][0, :, 0].tolist() == [0, 3, 6, 63, 66, 69]
    with pytest.raises(ValueError, match="not divisible by"):
        fd.shard_sequence(x[:, :23], 4, 0, layout)


def test_auto_exchange_gathers_short_shards():
    short = torch.empty(1, 1024, 8, 128, dtype=torch.bfloat16, device="meta")  # K+V: 4 MiB
    assert fd.choose_kv_exchange(short[:, :256], 8) == "allgather"  # 1 MiB
    assert fd.choose_kv_exchange(short, 8) == "ring"
    assert fd.choose_kv_exchange(short[:, :256], 1) == "ring"
