"""Plans (kernels/plans.py, configs.features["replay"]): a forward or backward whose signature
was seen replays the launches recorded for it. For new inputs of that signature its out, lse
and gradients are the FlashAttention rule's and bitwise those of the launches made anew, with
every element written; a new layout, length, dtype, option, feature or config choice records a
plan of its own; calls with tensors among their options, or with dropout, record none."""

import contextlib
import threading

import pytest
import torch
from conftest import needs_hopper, record_calls

from flashtile import flash_attn_func
from flashtile.kernels import backward, configs, forward, hopper_backward, plans
from flashtile.kernels.params import AttnOptions
from flashtile.testing import check_attention, random_qkv, reference_attention

FIELDS = ("out", "lse", "dq", "dk", "dv")


@pytest.fixture(autouse=True)
def _replay(monkeypatch):
    monkeypatch.setitem(configs.features, "replay", True)
    plans.forget()
    yield
    plans.forget()


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty_like and torch.empty give NaN-filled floating tensors: an output element
    that no launch writes shows."""
    for name in ("empty_like", "empty"):
        make = getattr(torch, name)

        def poisoned_make(*args, make=make, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, poisoned_make)


def _run(q, k, v, dout, replay: bool, **kwargs):
    """out, lse, dq, dk, dv of flash_attn_func with replay on or off."""
    configs.features["replay"] = replay  # the fixture's monkeypatch restores it
    out, lse = flash_attn_func(q, k, v, return_lse=True, **kwargs)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))


def _replayed_and_launched(q, k, v, dout, **kwargs):
    """The results from plans, and from launches made anew. A call that launches anew comes
    first: on a GPU it also gives Launcher the signatures it remembers, and only a call whose
    launches all went through those is recorded; the next call records, the one after replays."""
    launched = _run(q, k, v, dout, False, **kwargs)
    _run(q, k, v, dout, True, **kwargs)
    return _run(q, k, v, dout, True, **kwargs), launched


def _assert_same(replayed, launched):
    for name, a, b in zip(FIELDS, replayed, launched):
        assert not a.isnan().any(), f"{name}: an element the replay did not write"
        assert torch.equal(a, b), f"{name}: replayed {a.flatten()[:4]} launched {b.flatten()[:4]}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_replayed_calls_are_the_launched_ones(dtype, causal, dev, poisoned, monkeypatch):
    q, k, v = random_qkv(2, 40, 40, 3, 32, dtype, dev)
    _replayed_and_launched(q, k, v, torch.randn_like(q), causal=causal)  # records the plans
    assert len(forward._plans) == 1 and len(backward._plans) == 1
    launched = record_calls(monkeypatch, [(forward, "_launch_forward"),
                                          (backward, "_launch_backward")])
    for call in range(2):  # new inputs of the same signature
        q, k, v = random_qkv(2, 40, 40, 3, 32, dtype, dev)
        dout = torch.randn_like(q)
        replayed = _run(q, k, v, dout, True, causal=causal)
        assert not launched, f"call {call}: {launched} launched anew, not replayed"
        _assert_same(replayed, _run(q, k, v, dout, False, causal=causal))
        launched.clear()  # the replay-off call launched anew, as it should
        check_attention(f"replayed call {call}", dict(zip(FIELDS, replayed)),
                        reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64),
                        reference_attention(q, k, v, dout, causal=causal), dtype)
    assert len(forward._plans) == 1 and len(backward._plans) == 1


def test_each_signature_has_its_own_plan(dev, poisoned):
    """Layouts, lengths, dtypes, options and grouped heads each decide a launch's arguments:
    each new one records a plan per pass, and every call's results are the launched ones."""
    q, k, v = random_qkv(1, 24, 24, 2, 32, torch.float16, dev)
    calls = [
        dict(),
        dict(causal=True),
        dict(softmax_scale=0.3),
        dict(window_size=(5, 0)),
        dict(softcap=2.0),
        dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)),  # (B, H, N, D) memory
        dict(seqlen=32),
        dict(dtype=torch.float32),
        dict(gqa=True),
    ]
    seen = 0
    for kwargs in calls:
        kwargs = dict(kwargs)
        seqlen, dtype = kwargs.pop("seqlen", 24), kwargs.pop("dtype", torch.float16)
        gqa = kwargs.pop("gqa", False)
        q, k, v = random_qkv(1, seqlen, seqlen, 2, 32, dtype, dev, nheads_k=1 if gqa else 2)
        if "q" in kwargs:
            q = kwargs.pop("q").detach().requires_grad_()
        _assert_same(*_replayed_and_launched(q, k, v, torch.randn_like(q), **kwargs))
        seen += 1
        assert len(forward._plans) == len(backward._plans) == seen, f"{kwargs}: a plan shared"


def test_features_and_overrides_key_the_plans(dev, poisoned, monkeypatch):
    q, k, v = random_qkv(1, 24, 24, 2, 32, torch.float16, dev)
    dout = torch.randn_like(q)
    _assert_same(*_replayed_and_launched(q, k, v, dout))
    assert len(forward._plans) == len(backward._plans) == 1
    monkeypatch.setitem(configs.features, "overlap_dq", not configs.features["overlap_dq"])
    _assert_same(*_replayed_and_launched(q, k, v, dout))
    assert len(forward._plans) == len(backward._plans) == 2
    monkeypatch.setattr(configs, "_override", {})
    configs.set_override("bwd_dq", configs.KernelConfig(BLOCK_M=16, BLOCK_N=16))
    _assert_same(*_replayed_and_launched(q, k, v, dout))
    assert len(forward._plans) == len(backward._plans) == 3


@pytest.mark.parametrize("case", ["alibi", "dropout"])
def test_calls_with_option_tensors_or_dropout_record_no_plan(case, dev):
    q, k, v = random_qkv(1, 24, 24, 2, 32, torch.float32, dev)
    dout = torch.randn_like(q)
    kwargs = (dict(alibi_slopes=torch.rand(2, device=dev)) if case == "alibi"
              else dict(dropout_p=0.2))
    for _ in range(3):
        torch.manual_seed(7)  # dropout's mask from the same seed both times
        first = _run(q, k, v, dout, True, **kwargs)
        torch.manual_seed(7)
        _assert_same(first, _run(q, k, v, dout, False, **kwargs))
    assert not forward._plans and not backward._plans


def test_a_plan_keeps_no_tensor_of_the_recorded_call(dev):
    """The recorded call's tensors become positions: a plan must not hold on to a step's
    activations and gradients."""
    q, k, v = random_qkv(1, 24, 24, 2, 32, torch.float16, dev)
    _replayed_and_launched(q, k, v, torch.randn_like(q))
    (forward_plan,) = forward._plans.values()
    (plan,) = backward._plans.values()
    for replay in (forward_plan.attention, plan.preprocess, plan.dkdv, plan.dq):
        assert replay.slots and not any(isinstance(a, torch.Tensor) for a in replay.args)
        assert not any(isinstance(a, torch.Tensor) for a in replay.trailing)


def test_a_call_with_one_tensor_in_several_places_records_no_plan(dev, poisoned):
    """flash_attn_func(x, x, x) cannot tell which of q, k, v each launch argument was: such a
    call records nothing, a later call with three tensors records the plan, and the plan
    replays for both kinds."""
    x = random_qkv(1, 24, 24, 2, 32, torch.float16, dev)[0]
    dout = torch.randn_like(x)
    for _ in range(3):
        _assert_same(_run(x, x, x, dout, True), _run(x, x, x, dout, False))
    assert not forward._plans and not backward._plans
    q, k, v = random_qkv(1, 24, 24, 2, 32, torch.float16, dev)
    _assert_same(*_replayed_and_launched(q, k, v, dout))
    assert len(forward._plans) == len(backward._plans) == 1
    _assert_same(_run(x, x, x, dout, True), _run(x, x, x, dout, False))
    assert len(forward._plans) == len(backward._plans) == 1


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
def test_replayed_gluon_backward_is_the_launched_one(causal, poisoned):
    """D 128, N 512: dK/dV in the Gluon kernel (hopper_backward.preferred), through
    launcher_for's Launcher, beside the Triton dQ on the second stream."""
    q, k, v = random_qkv(4, 512, 512, 4, 128, torch.bfloat16)
    opts = AttnOptions(softmax_scale=128**-0.5, diag_offset=0, window_right=0 if causal else -1)
    assert hopper_backward.preferred("dkdv", q, k, v, q, (k, v), opts)
    for _ in range(2):
        q, k, v = random_qkv(4, 512, 512, 4, 128, torch.bfloat16)
        _assert_same(*_replayed_and_launched(q, k, v, torch.randn_like(q), causal=causal))
    assert len(forward._plans) == len(backward._plans) == 1


def test_threads_record_and_replay_their_own_plans(dev):
    """A recording belongs to its thread (launch.recording), the plans to every thread: two
    threads calling with different signatures at once each get their own plan, and every call's
    results are the launched ones."""
    shapes = {"a": (1, 24, 2, 32), "b": (2, 40, 3, 16)}
    inputs = {}
    for name, (batch, seqlen, nheads, head_dim) in shapes.items():
        q, k, v = random_qkv(batch, seqlen, seqlen, nheads, head_dim, torch.float16, dev)
        inputs[name] = (q, k, v, torch.randn_like(q))
    results, errors = {name: [] for name in shapes}, []
    # Triton's interpreter patches triton.language while a kernel runs, so on the CPU one call
    # runs at a time (the threads' calls interleave); on a GPU they overlap
    one_at_a_time = threading.Lock() if dev.type == "cpu" else contextlib.nullcontext()

    def calls(name):
        try:
            if dev.type == "cuda":  # a new thread starts on device 0; the inputs' device
                torch.cuda.set_device(inputs[name][0].device)
            for _ in range(4):
                with one_at_a_time:
                    results[name].append(_run(*inputs[name], True, causal=True))
        except Exception as e:  # re-raised by the test below, on its own thread
            errors.append(e)

    threads = [threading.Thread(target=calls, args=(name,)) for name in shapes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(forward._plans) == len(backward._plans) == 2
    for name in shapes:
        launched = _run(*inputs[name], False, causal=True)
        for replayed in results[name]:
            _assert_same(replayed, launched)
