"""The Gluon backward passes (kernels/hopper_backward.py) on a Hopper GPU: each against the
float64 reference by FlashAttention's rule and against backward.py's pass, into poisoned
buffers; the gradients of flash_attn_func with them switched on; and when backward.py hands
them a pass. The interpreter cannot run them (on the CPU, test_compile_sm90 compiles them for
sm_90)."""

import pytest
import torch
from conftest import needs_hopper, record_calls

from flashtile.kernels import backward, configs, forward, hopper, hopper_backward
from flashtile.kernels.params import AttnOptions
from flashtile.testing import (
    assert_close,
    check_attention,
    poison_,
    random_qkv,
    reference_attention,
    run_flashtile,
    tolerance,
)

# batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, dtype
CASES = [
    (2, 1000, 1537, 4, 2, 128, True, torch.bfloat16),  # ragged ends, GQA, bottom-right diagonal
    (2, 1000, 1537, 4, 2, 128, False, torch.bfloat16),
    (1, 384, 384, 2, 2, 64, True, torch.float16),
    (2, 777, 300, 3, 1, 128, False, torch.float16),  # fewer keys than queries, MQA
    (1, 129, 130, 2, 2, 64, False, torch.bfloat16),  # one row and one key past a block
    (1, 1, 513, 2, 2, 128, True, torch.bfloat16),  # a single query row
    (1, 200, 1100, 2, 2, 64, True, torch.bfloat16),  # keys that no row sees get zero gradients
    (3, 2048, 2048, 2, 2, 128, True, torch.bfloat16),
]
# per pass, the head dim's chosen config, then others: (BLOCK_M, BLOCK_N, STAGES)
CONFIGS = {"dkdv": [None, (32, 128, 3), (64, 128, 3)],
           "dq": [None, (128, 64, 2), (128, 64, 3)]}
PASS_CONFIGS = [(name, config) for name, configs_ in CONFIGS.items() for config in configs_]


def _options(q, k, causal: bool) -> AttnOptions:
    return AttnOptions(softmax_scale=q.shape[-1] ** -0.5, diag_offset=k.shape[1] - q.shape[1],
                       window_right=0 if causal else -1)


def _forward(q, k, v, dout, opts):
    """out, lse of the forward and Delta = rowsum(dO ∘ O) (B, H, Nq), as backward.py has."""
    out, lse = forward.attention_forward(q, k, v, opts)
    return out, lse, (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def _run_pass(pass_name, q, k, v, dout, lse, delta, opts, config=None) -> dict:
    """The Gluon pass into poisoned buffers: {"dk": ..., "dv": ...} or {"dq": ...}."""
    if pass_name == "dkdv":
        dk, dv = poison_(torch.empty_like(k)), poison_(torch.empty_like(v))
        hopper_backward.dkdv(q, k, v, dout, lse, delta, dk, dv, opts, config)
        return dict(dk=dk, dv=dv)
    dq = poison_(torch.empty_like(q))
    hopper_backward.dq(q, k, v, dout, lse, delta, dq, opts, config)
    return dict(dq=dq)


@needs_hopper
@pytest.mark.parametrize("pass_name,config", PASS_CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gluon_pass_matches_reference(case, pass_name, config, monkeypatch):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, dtype = case
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype,
                         requires_grad=False, nheads_k=nheads_k)
    dout = torch.randn_like(q)
    opts = _options(q, k, causal)
    assert hopper.supports(q, k, v, opts)
    out, lse, delta = _forward(q, k, v, dout, opts)
    got = _run_pass(pass_name, q, k, v, dout, lse, delta, opts, config)
    reference = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, dout, causal=causal)
    check_attention(f"gluon {pass_name}", got, reference, baseline, dtype, fields=tuple(got))
    # and as close to backward.py's pass (which the interpreter checks on the CPU) as the rule
    # allows either of them to be to the reference
    monkeypatch.setitem(configs.features, "gluon_backward", False)
    theirs = dict(zip(("dq", "dk", "dv"),
                      backward.attention_backward(dout, q, k, v, out, lse, opts)))
    for name in got:
        ref, base = getattr(reference, name), getattr(baseline, name)
        assert_close(f"gluon {name} against triton", got[name], theirs[name],
                     tolerance(ref, base, dtype))


@needs_hopper
@pytest.mark.parametrize("pass_name", list(CONFIGS))
def test_gluon_pass_is_deterministic(pass_name):
    """Each program is the sole writer of its rows (no atomics): two runs are bitwise equal."""
    q, k, v = random_qkv(2, 1500, 1500, 4, 128, torch.bfloat16, requires_grad=False,
                         nheads_k=1)
    dout = torch.randn_like(q)
    opts = _options(q, k, True)
    _, lse, delta = _forward(q, k, v, dout, opts)
    first = _run_pass(pass_name, q, k, v, dout, lse, delta, opts)
    second = _run_pass(pass_name, q, k, v, dout, lse, delta, opts)
    assert all(torch.equal(first[name], second[name]) for name in first)


def _recording(monkeypatch) -> list:
    """Make hopper_backward.dkdv and .dq note each call (the pass's name) in the list
    returned."""
    return record_calls(monkeypatch, [(hopper_backward, name) for name in CONFIGS])


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_with_the_gluon_backward(causal, head_dim, monkeypatch):
    """Every output and gradient of a call whose backward passes both run in Gluon (the
    thresholds lowered to 1024 keys for every pass), with the Gluon forward's O and LSE where
    it takes that path too."""
    monkeypatch.setitem(configs.features, "gluon_backward", True)
    monkeypatch.setattr(hopper_backward, "MIN_SEQLEN_K", {
        name: dict.fromkeys(thresholds, 1024)
        for name, thresholds in hopper_backward.MIN_SEQLEN_K.items()})
    calls = _recording(monkeypatch)
    q, k, v = random_qkv(1, 700, 4200, 4, head_dim, torch.bfloat16, nheads_k=2)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, causal=causal)
    assert sorted(calls) == ["dkdv", "dq"]
    reference = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, dout, causal=causal)
    check_attention("flash_attn_func, gluon backward", got, reference, baseline,
                    torch.bfloat16)


@needs_hopper
def test_calls_outside_its_coverage_keep_backward_py(monkeypatch):
    """A window (not covered) and a float32 call run backward.py's passes, and are right."""
    monkeypatch.setitem(configs.features, "gluon_backward", True)
    calls = _recording(monkeypatch)
    for dtype, window in ((torch.bfloat16, (256, 0)), (torch.float32, (-1, -1))):
        q, k, v = random_qkv(1, 1024, 1024, 2, 128, dtype)
        dout = torch.randn_like(q)
        got = run_flashtile(q, k, v, dout, window_size=window)
        reference = reference_attention(q, k, v, dout, window_size=window, dtype=torch.float64)
        baseline = reference_attention(q, k, v, dout, window_size=window)
        check_attention(f"{dtype} window {window}", got, reference, baseline, dtype)
    assert calls == []


@pytest.mark.parametrize("pass_name", list(CONFIGS))
@pytest.mark.parametrize("head_dim,causal", [(64, False), (64, True), (128, False), (128, True)])
def test_preferred_follows_the_measured_thresholds(pass_name, head_dim, causal, monkeypatch):
    """hopper_backward.preferred on any machine: coverage stubbed to True, so only the key
    length and head dim decide (MIN_SEQLEN_K)."""
    monkeypatch.setattr(hopper, "supports", lambda *args: True)
    monkeypatch.setattr(hopper_backward, "_tma_ready", lambda t: True)
    threshold = hopper_backward.MIN_SEQLEN_K[pass_name][head_dim, causal]
    q = torch.empty(1, 512, 1, head_dim)
    lengths = [(1 << 17, False)] if threshold is None else [(threshold, True),
                                                             (threshold - 1, False)]
    for seqlen_k, taken in lengths:
        k = torch.empty(1, seqlen_k, 1, head_dim)
        opts = AttnOptions(softmax_scale=0.1, diag_offset=seqlen_k - 512,
                           window_right=0 if causal else -1)
        assert hopper_backward.preferred(pass_name, q, k, k, q, (k,), opts) is taken
    q96 = torch.empty(1, 512, 1, 96)  # a head dim without a config
    assert not hopper_backward.preferred(pass_name, q96, q96, q96, q96, (q96,), opts)


@pytest.mark.parametrize("pass_name", list(CONFIGS))
def test_preferred_wants_tma_ready_gradients(pass_name, monkeypatch):
    """dO and the gradients are read and written through TMA too: a misaligned one keeps
    backward.py (coverage of q, k, v stubbed to True)."""
    monkeypatch.setattr(hopper, "supports", lambda *args: True)
    q = torch.empty(1, 512, 1, 128)
    k = torch.empty(1, 4096, 1, 128)
    opts = AttnOptions(softmax_scale=0.1, diag_offset=4096 - 512)
    assert hopper_backward.preferred(pass_name, q, k, k, q, (k,), opts)
    odd = torch.empty(1, 512, 1, 129)[..., 1:]  # starts 4 bytes in
    assert not hopper_backward.preferred(pass_name, q, k, k, odd, (k,), opts)
    assert not hopper_backward.preferred(pass_name, q, k, k, q, (odd,), opts)
