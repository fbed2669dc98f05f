"""The Gluon dK/dV pass (kernels/hopper_backward.py) on a Hopper GPU: against the float64
reference by FlashAttention's rule and against backward.py's dK/dV pass, into poisoned buffers;
the gradients of flash_attn_func with it switched on; and when backward.py hands it the pass.
The interpreter cannot run it (on the CPU, test_compile_sm90 compiles it for sm_90)."""

import pytest
import torch

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

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")

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
# the head dim's chosen config (CONFIG), a smaller query step and a deeper ring
CONFIGS = [None, (32, 128, 3), (64, 128, 3)]


def _options(q, k, causal: bool) -> AttnOptions:
    return AttnOptions(softmax_scale=q.shape[-1] ** -0.5, diag_offset=k.shape[1] - q.shape[1],
                       window_right=0 if causal else -1)


@needs_hopper
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gluon_dkdv_matches_reference(case, config, monkeypatch):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, dtype = case
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype,
                         requires_grad=False, nheads_k=nheads_k)
    dout = torch.randn_like(q)
    opts = _options(q, k, causal)
    assert hopper.supports(q, k, v, opts)
    out, lse = forward.attention_forward(q, k, v, opts)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dk, dv = poison_(torch.empty_like(k)), poison_(torch.empty_like(v))
    hopper_backward.dkdv(q, k, v, dout, lse, delta, dk, dv, opts, config)
    reference = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, dout, causal=causal)
    check_attention("gluon", dict(dk=dk, dv=dv), reference, baseline, dtype,
                    fields=("dk", "dv"))
    # and as close to backward.py's pass (which the interpreter checks on the CPU) as the rule
    # allows either of them to be to the reference
    monkeypatch.setitem(configs.features, "gluon_backward", False)
    _, triton_dk, triton_dv = backward.attention_backward(dout, q, k, v, out, lse, opts)
    for name, got, theirs, ref, base in (("dk", dk, triton_dk, reference.dk, baseline.dk),
                                         ("dv", dv, triton_dv, reference.dv, baseline.dv)):
        assert_close(f"gluon {name} against triton", got, theirs, tolerance(ref, base, dtype))


@needs_hopper
def test_gluon_dkdv_is_deterministic():
    """Each program is the sole writer of its rows (no atomics): two runs are bitwise equal."""
    q, k, v = random_qkv(2, 1500, 1500, 4, 128, torch.bfloat16, requires_grad=False,
                         nheads_k=1)
    dout = torch.randn_like(q)
    opts = _options(q, k, True)
    out, lse = forward.attention_forward(q, k, v, opts)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    first = hopper_backward.dkdv(q, k, v, dout, lse, delta, torch.empty_like(k),
                                 torch.empty_like(v), opts)
    second = hopper_backward.dkdv(q, k, v, dout, lse, delta, torch.empty_like(k),
                                  torch.empty_like(v), opts)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def _recording(monkeypatch) -> list:
    """Make hopper_backward.dkdv note each call (k's shape) in the list returned."""
    calls = []
    gluon_dkdv = hopper_backward.dkdv

    def recording(*args, **kwargs):
        calls.append(tuple(args[1].shape))
        return gluon_dkdv(*args, **kwargs)

    monkeypatch.setattr(hopper_backward, "dkdv", recording)
    return calls


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_with_the_gluon_backward(causal, head_dim, monkeypatch):
    """Every output and gradient of a call whose dK/dV pass runs in Gluon (dQ in
    backward.py), with the Gluon forward's O and LSE where it takes that path too."""
    monkeypatch.setitem(configs.features, "gluon_backward", True)
    calls = _recording(monkeypatch)
    q, k, v = random_qkv(1, 700, 2100, 4, head_dim, torch.bfloat16, nheads_k=2)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, causal=causal)
    assert calls == [tuple(k.shape)]
    reference = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, dout, causal=causal)
    check_attention("flash_attn_func, gluon dK/dV", got, reference, baseline, torch.bfloat16)


@needs_hopper
def test_calls_outside_its_coverage_keep_backward_py(monkeypatch):
    """A window (not covered) and a float32 call run backward.py's pass, and are right."""
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


@pytest.mark.parametrize("head_dim,causal,seqlen_k,taken", [
    (128, False, 1024, True), (128, False, 1023, False), (128, True, 1024, True),
    (64, False, 1024, True), (64, True, 1023, False),
    (96, False, 4096, False)])  # a head dim without a config
def test_preferred_follows_the_measured_thresholds(head_dim, causal, seqlen_k, taken,
                                                   monkeypatch):
    """hopper_backward.preferred on any machine: coverage stubbed to True, so only the key
    length and head dim decide (MIN_SEQLEN_K, CONFIG)."""
    monkeypatch.setattr(hopper, "supports", lambda *args: True)
    monkeypatch.setattr(hopper_backward, "_tma_ready", lambda t: True)
    q = torch.empty(1, 512, 1, head_dim)
    k = torch.empty(1, seqlen_k, 1, head_dim)
    opts = AttnOptions(softmax_scale=0.1, diag_offset=seqlen_k - 512,
                       window_right=0 if causal else -1)
    assert hopper_backward.preferred(q, k, k, q, k, k, opts) is taken


def test_preferred_wants_tma_ready_gradients(monkeypatch):
    """dO, dK and dV are read and written through TMA too: a misaligned one keeps
    backward.py (coverage of q, k, v stubbed to True)."""
    monkeypatch.setattr(hopper, "supports", lambda *args: True)
    q = torch.empty(1, 512, 1, 128)
    k = torch.empty(1, 2048, 1, 128)
    opts = AttnOptions(softmax_scale=0.1, diag_offset=2048 - 512)
    assert hopper_backward.preferred(q, k, k, q, k, k, opts)
    odd = torch.empty(1, 512, 1, 129)[..., 1:]  # rows of 129 elements: 258 bytes
    assert not hopper_backward.preferred(q, k, k, odd, k, k, opts)
