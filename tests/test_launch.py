"""kernels/launch.py: a remembered launch runs the kernel Triton would have chosen, and a new
signature (value, dtype, alignment, keyword) goes through Triton again."""

import contextlib

import pytest
import torch
import triton
import triton.language as tl

from flashtile.kernels.configs import interpreting
from flashtile.kernels.launch import Launcher, Recorded, Replay, recording

DEVICE = "cpu" if interpreting() else "cuda"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled launches need a GPU")


@triton.jit
def _scaled_copy(X, Y, n, alpha, BLOCK: tl.constexpr, TWICE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    y = x * alpha
    if TWICE:
        y = y * 2.0
    tl.store(Y + offs, y, mask=offs < n)


class Counting:
    """Stands in for the JITFunction and counts the launches that go through Triton."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.fn[grid]


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def _run(launcher, x, n, alpha, **kwargs):
    y = torch.full_like(x, float("nan"))  # poisoned: an unwritten element shows
    launcher[_grid(n)](x, y, n, alpha, BLOCK=128, **kwargs)
    return y


def test_launch_matches_the_formula():
    x = torch.randn(1000, device=DEVICE)
    launcher = Launcher(_scaled_copy)
    for _ in range(3):
        y = _run(launcher, x, 1000, 1.5)
        torch.testing.assert_close(y, x * 1.5, rtol=0, atol=0)
    y = _run(launcher, x, 1000, 1.5, TWICE=True)
    torch.testing.assert_close(y, x * 3.0, rtol=0, atol=0)


@needs_gpu
def test_same_signature_skips_triton_and_new_ones_do_not():
    launcher = Launcher(_scaled_copy)
    launcher.fn = counting = Counting(_scaled_copy)
    x = torch.randn(1000, device="cuda")
    torch.testing.assert_close(_run(launcher, x, 1000, 1.5), x * 1.5, rtol=0, atol=0)
    assert counting.calls == 1 and len(launcher.entries) == 1
    other = torch.randn(1000, device="cuda")  # another aligned tensor: the same signature
    torch.testing.assert_close(_run(launcher, other, 1000, 1.5), other * 1.5, rtol=0, atol=0)
    assert counting.calls == 1
    # each of these changes what Triton specializes on (or might): a new entry each
    buffer = torch.randn(1001, device="cuda")
    misaligned = buffer[1:]  # 4 bytes past a 16-byte boundary
    assert misaligned.data_ptr() % 16 == 4
    cases = [
        (misaligned, 1000, 1.5, {}),           # alignment
        (x, 1000, 2.5, {}),                     # a scalar's value
        (x, 992, 1.5, {}),                      # an integer's divisibility by 16
        (x.half(), 1000, 1.5, {}),              # dtype
        (x, 1000, 1.5, {"TWICE": True}),        # a keyword
    ]
    for i, (t, n, alpha, kwargs) in enumerate(cases, start=2):
        y = _run(launcher, t, n, alpha, **kwargs)
        want = t[:n].float() * alpha * (2 if kwargs else 1)
        torch.testing.assert_close(y[:n].float(), want, rtol=1e-3 if t.dtype == torch.half
                                   else 0, atol=0)
        assert counting.calls == i and len(launcher.entries) == i
    # and each remembered one launches without Triton, still right
    for t, n, alpha, kwargs in cases:
        y = _run(launcher, t, n, alpha, **kwargs)
        want = t[:n].float() * alpha * (2 if kwargs else 1)
        torch.testing.assert_close(y[:n].float(), want, rtol=1e-3 if t.dtype == torch.half
                                   else 0, atol=0)
    assert counting.calls == len(cases) + 1


@needs_gpu
def test_a_launch_hook_goes_through_triton():
    from triton import knobs

    launcher = Launcher(_scaled_copy)
    launcher.fn = counting = Counting(_scaled_copy)
    x = torch.randn(1000, device="cuda")
    _run(launcher, x, 1000, 1.5)
    _run(launcher, x, 1000, 1.5)
    assert counting.calls == 1
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        torch.testing.assert_close(_run(launcher, x, 1000, 1.5), x * 1.5, rtol=0, atol=0)
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert counting.calls == 2 and len(seen) == 1


@needs_gpu
def test_attention_again_takes_the_remembered_launches_and_agrees():
    """The second identical call launches every kernel (forward, Delta, dK/dV, dQ; the
    KV cache's split forward and combine) without Triton's path, bit for bit as the first."""
    from flashtile import flash_attn_with_kvcache
    from flashtile.kernels import backward, forward
    from flashtile.testing import random_qkv, run_flashtile

    launchers = {"fwd": forward._attn_fwd_tunable.launcher, "combine": forward._combine,
                 "delta": backward._preprocess, "dkdv": backward._attn_bwd_dkdv_tunable.launcher,
                 "dq": backward._attn_bwd_dq_tunable.launcher}
    spies = {}
    for name, launcher in launchers.items():
        launcher.entries.clear()
        spies[name] = launcher.fn = Counting(launcher.fn)
    try:
        q, k, v = random_qkv(2, 300, 500, 4, 64, torch.bfloat16, "cuda", nheads_k=2)
        dout = torch.randn_like(q)
        first = run_flashtile(q, k, v, dout, causal=True)
        cache_k, cache_v = (torch.randn(2, 4096, 2, 64, device="cuda", dtype=torch.bfloat16)
                            for _ in range(2))
        lengths = torch.tensor([4000, 1234], device="cuda", dtype=torch.int32)
        decode = [flash_attn_with_kvcache(q[:, :1], cache_k, cache_v, cache_seqlens=lengths,
                                          num_splits=4, return_softmax_lse=True)]
        through_triton = {name: spy.calls for name, spy in spies.items()}
        assert all(through_triton.values()), through_triton
        second = run_flashtile(q, k, v, dout, causal=True)
        decode.append(flash_attn_with_kvcache(q[:, :1], cache_k, cache_v,
                                              cache_seqlens=lengths, num_splits=4,
                                              return_softmax_lse=True))
        assert {name: spy.calls for name, spy in spies.items()} == through_triton
        for field in first:
            assert torch.equal(first[field], second[field]), field
        for a, b in zip(*decode):
            assert torch.equal(a, b)
    finally:
        for name, launcher in launchers.items():
            launcher.fn = spies[name].fn


def test_a_recorded_launch_replays_for_other_tensors():
    """recording() keeps a launch through Launcher (compiled: the remembered kernel; under the
    interpreter: the function), and Replay makes it again with other tensors in its place."""
    x = torch.randn(1000, device=DEVICE)
    launcher = Launcher(_scaled_copy)
    _run(launcher, x, 1000, 1.5)  # compiled: Launcher remembers the signature
    y = torch.full_like(x, float("nan"))
    with recording() as launches:
        launcher[_grid(1000)](x, y, 1000, 1.5, BLOCK=128)
    assert launches.complete and len(launches) == 1
    replay = Replay(launches[0], (x, y))
    for _ in range(2):
        other = torch.randn(1000, device=DEVICE)
        out = torch.full_like(other, float("nan"))  # poisoned: an unwritten element shows
        replay.replay((other, out))
        torch.testing.assert_close(out, other * 1.5, rtol=0, atol=0)


def test_a_replay_wants_each_tensor_once_among_the_calls():
    """A tensor argument must be one of the call's tensors, and only one: with one tensor in
    two places, which one the launch took could not be told."""
    x, y = torch.zeros(2), torch.zeros(2)
    recorded = Recorded(object(), (1, 1, 1), (x, y, 3), kwargs={})
    with pytest.raises(LookupError, match="argument 1 is 0 of the call's tensors"):
        Replay(recorded, (x,))
    with pytest.raises(LookupError, match="argument 0 is 2 of the call's tensors"):
        Replay(recorded, (x, x, y))
    assert Replay(recorded, (y, x)).slots == [(0, 1), (1, 0)]
    holder = Recorded(object(), (1, 1, 1), (x, [y]), kwargs={})  # a tensor inside an object
    with pytest.raises(LookupError, match="argument 1 is a list"):
        Replay(holder, (x, y))


@needs_gpu
def test_a_launch_through_triton_leaves_the_recording_incomplete():
    """A first signature launches through Triton's own path, which is not recorded."""
    launcher = Launcher(_scaled_copy)
    x = torch.randn(1000, device="cuda")
    with recording() as launches:
        _run(launcher, x, 1000, 1.5)
    assert not launches.complete and not launches


def test_on_device_leaves_cpu_tensors_and_the_current_device_alone():
    from flashtile.kernels.launch import on_device

    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)
    if torch.cuda.is_available():
        here = torch.device("cuda", torch.cuda.current_device())
        assert isinstance(on_device(here), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """A model split across GPUs in one process calls attention on a GPU that is not the
    current device: the launches follow the tensors (as FlashAttention's device guard does),
    and give what the same call gives with that GPU current."""
    from flashtile.testing import random_qkv, run_flashtile

    q, k, v = random_qkv(2, 300, 300, 4, 64, torch.bfloat16, "cuda:1")
    dout = torch.randn_like(q)
    with torch.cuda.device(0):
        elsewhere = run_flashtile(q, k, v, dout, causal=True)
    with torch.cuda.device(1):
        here = run_flashtile(q, k, v, dout, causal=True)
    for field in here:
        assert elsewhere[field].device == q.device
        assert torch.equal(elsewhere[field], here[field]), field
