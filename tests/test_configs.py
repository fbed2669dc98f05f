"""Block-size selection and autotuning set-up, checked on the CPU.

The autotuner itself only runs on a GPU, so what can go wrong before it runs is checked here:
every candidate a head dim and precision can ask for must be in the kernel's tuning space (else
pruning leaves nothing and the launch fails), and the fixed/tuned choice must follow the
interpreter and the overrides.
"""

import json

import pytest
import torch
import triton

from flashtile.kernels import backward, configs, forward
from flashtile.kernels.launch import Launcher

TUNABLES = [forward._attn_fwd_tunable, backward._attn_bwd_dkdv_tunable,
            backward._attn_bwd_dq_tunable]


@pytest.mark.parametrize("kernel", configs.KERNELS)
@pytest.mark.parametrize("head_dim", [1, 16, 24, 40, 64, 80, 128, 200, 256])
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_pruning_keeps_exactly_the_candidates(kernel, head_dim, precision):
    padded = configs.head_dim_pad(head_dim)
    wanted = configs.candidates(kernel, padded, precision)
    kept = configs.pruner(kernel)(configs.tuning_space(kernel), {}, HEAD_DIM=head_dim,
                                  HEAD_DIM_PAD=padded, DOT_PRECISION=precision)
    assert len(wanted) > 0
    assert sorted(configs._tag(c) for c in kept) == sorted(set(wanted))


def test_head_dim_pad():
    assert [configs.head_dim_pad(d) for d in (1, 16, 17, 40, 64, 65, 200, 256)] == [
        16, 16, 32, 64, 64, 128, 256, 256]


def test_cdiv():
    assert [configs.cdiv(a, 64) for a in (0, 1, 63, 64, 65, 1000)] == [0, 1, 1, 1, 2, 16]
    assert [configs.cdiv(a, 16) for a in (0, 1, 16, 17, 4096)] == [0, 1, 1, 2, 256]


def test_seqlen_bucket():
    cases = {(1, 1): 1, (1000, 17): 10, (17, 1024): 11, (16384, 1): 15, (131072, 5): 15}
    assert {k: configs.seqlen_bucket(*k) for k in cases} == cases


@pytest.mark.parametrize("tunable", TUNABLES, ids=lambda t: t.name)
def test_tunable_wraps_the_kernel(tunable):
    assert isinstance(tunable.tuned, triton.runtime.autotuner.Autotuner)
    # the shared key, then the kernel's own flags (the forward's KV-cache ones)
    assert tunable.tuned.keys[:len(configs.TUNING_KEY)] == configs.TUNING_KEY
    extra = tunable.tuned.keys[len(configs.TUNING_KEY):]
    assert extra == (["KV_CACHE", "PAGED", "PAGE", "SPLIT_KV"] if tunable.name == "fwd" else [])
    assert ({configs._tag(c) for c in tunable.tuned.configs}
            == {configs._tag(c) for c in configs.tuning_space(tunable.name)})


@pytest.mark.parametrize("tunable", TUNABLES, ids=lambda t: t.name)
def test_select_fixed_override_or_tuned(tunable, monkeypatch):
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "1")  # the GPU conftest turns tuning off
    monkeypatch.setattr(configs, "interpreting", lambda: True)  # as on the CPU
    kernel, launch = tunable.select(128, "tf32")  # the interpreter: fixed small blocks
    assert kernel is tunable.launcher and launch == {"BLOCK_M": 32, "BLOCK_N": 16}
    assert tunable.launcher.fn is tunable.kernel
    configs.set_override(tunable.name, configs.KernelConfig(64, 32))
    try:
        assert tunable.select(128, "tf32") == (tunable.launcher, {"BLOCK_M": 64, "BLOCK_N": 32})
    finally:
        configs.set_override(tunable.name, None)
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # as on a GPU
    assert tunable.select(128, "tf32") == (tunable.remembered, {})
    # FLASHTILE_AUTOTUNE=0: the first candidate of the head dim, no tuning
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "0")
    m, n, w, st = configs.candidates(tunable.name, 512, "tf32")[0]
    assert tunable.select(512, "tf32") == (
        tunable.launcher, {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st})


def test_decode_at_head_dim_128_launches_its_one_config_untuned(monkeypatch):
    """A KV-cache forward at D 128 has one candidate (measured fastest, configs.py): launched
    directly, never through the autotuner; D 64 still tunes, and so does the dense forward."""
    monkeypatch.setenv("FLASHTILE_AUTOTUNE", "1")
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # as on a GPU
    (fwd,) = [t for t in TUNABLES if t.name == "fwd"]
    assert configs.candidates("fwd", 128, "tf32", decode=True) == [(16, 128, 4, 2)]
    assert fwd.select(128, "tf32", decode=True) == (
        fwd.launcher, {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2})
    assert fwd.select(64, "tf32", decode=True) == (fwd.remembered, {})
    assert fwd.select(128, "tf32") == (fwd.remembered, {})


def test_set_override_names_the_kernel():
    with pytest.raises(ValueError, match="kernel must be one of"):
        configs.set_override("forward", configs.KernelConfig(16, 16))


def test_use_tma_follows_layout_and_flag(monkeypatch):
    x = torch.randn(2, 33, 3, 64, dtype=torch.float16)
    assert configs.use_tma("forward", x, x)
    assert not configs.use_tma("backward", x)  # measured slower: off (docs/performance.md)
    assert not configs.use_tma("forward", torch.randn(2, 33, 3, 40, dtype=torch.float16))
    assert not configs.use_tma("forward", torch.randn(2, 33, 3, 128)[..., ::2])  # stride 2
    assert not configs.use_tma("forward", torch.randn(2, 33, 3, 8, dtype=torch.float16))
    monkeypatch.setitem(configs.features, "tma_forward", False)
    assert not configs.use_tma("forward", x)


def test_decode_candidates_are_tuned_for_the_kv_cache_forward():
    """The forward against a KV cache tunes over 16-row query blocks; other kernels and fp32
    keep their lists; every decode candidate is in the forward's tuning space."""
    decode = configs.candidates("fwd", 128, "tf32", decode=True)
    assert decode and all(m in (16, 64) for m, *_ in decode) and decode[0][0] == 16
    assert configs.candidates("bwd_dq", 128, "tf32", decode=True) == configs.candidates(
        "bwd_dq", 128, "tf32")
    assert configs.candidates("fwd", 128, "ieee", decode=True) == configs.candidates(
        "fwd", 128, "ieee")
    space = {configs._tag(c) for c in configs.tuning_space("fwd")}
    assert set(decode) <= space
    prune = configs.pruner("fwd")
    kept = prune(configs.tuning_space("fwd"), {}, HEAD_DIM=128, HEAD_DIM_PAD=128,
                 DOT_PRECISION="tf32", KV_CACHE=True)
    assert {configs._tag(c) for c in kept} == set(decode)


def test_remembered_tunes_once_then_launches_the_choice(monkeypatch):
    """The autotuner runs on a key's first call; later calls launch its choice on the kernel."""
    calls = []

    class FakeKernel:
        arg_names = ["Q", "seqlen_bucket", "group"]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("kernel", args[1], kwargs))

    class FakeTuned:
        keys = ["HEAD_DIM_PAD", "seqlen_bucket", "group"]
        best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("tuned", args[1], kwargs))

    tunable = configs.Tunable.__new__(configs.Tunable)
    tunable.kernel, tunable.tuned = FakeKernel(), FakeTuned()
    tunable.launcher = Launcher(tunable.kernel)  # not a JITFunction: passes every call on
    remembered = configs.Remembered(tunable)
    q = torch.zeros(1, dtype=torch.float16)
    for bucket in (10, 10, 11, 10):
        remembered[(1,)](q, bucket, 2, HEAD_DIM_PAD=128)
    assert [(c[0], c[1]) for c in calls] == [("tuned", 10), ("kernel", 10), ("tuned", 11),
                                             ("kernel", 10)]
    assert calls[1][2] == {"HEAD_DIM_PAD": 128,
                           **FakeTuned.best_config.all_kwargs()}  # blocks, warps, stages
    assert {"BLOCK_M": 64, "num_stages": 3}.items() <= calls[1][2].items()


def test_tuned_choices_lists_each_kernels_remembered_configs(monkeypatch):
    """What `flashtile bench` records beside its rows: per kernel and tuning key, the key by
    name and the config the autotuner chose, in plain JSON values."""
    assert sorted(t.name for t in configs.TUNABLES) == ["bwd_dkdv", "bwd_dq", "fwd"]
    tunable = backward._attn_bwd_dq_tunable
    chosen = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    key = (128, "tf32", 11, *range(len(tunable.tuned.keys) - 3), torch.bfloat16)
    monkeypatch.setattr(tunable.remembered, "best", {key: chosen})
    for other in configs.TUNABLES:
        if other is not tunable:
            monkeypatch.setattr(other.remembered, "best", {})
    (entry,) = configs.tuned_choices()
    assert entry["kernel"] == "bwd_dq" and entry["config"] == chosen
    assert list(entry["key"]) == [*tunable.tuned.keys, "dtype"]
    assert entry["key"]["HEAD_DIM_PAD"] == 128 and entry["key"]["seqlen_bucket"] == 11
    assert entry["key"]["dtype"] == "torch.bfloat16"
    json.dumps(entry)  # plain values only
