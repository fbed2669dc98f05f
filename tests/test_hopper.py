"""The Gluon forward (kernels/hopper.py) on a Hopper GPU: against the float64 reference by
FlashAttention's rule and against the Triton forward, on poisoned buffers; the gradients of
flash_attn_func with it switched on; and which calls it covers. The interpreter cannot run it
(on the CPU, test_compile_sm90 compiles it for sm_90)."""

import pytest
import torch
from conftest import needs_hopper, record_calls

from flashtile import flash_attn_func
from flashtile.kernels import configs, forward, hopper
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
    (3, 2048, 2048, 2, 2, 128, True, torch.bfloat16),
    (1, 4096, 4096, 2, 2, 64, False, torch.bfloat16),
]
# the head dim's chosen config (hopper.CHOICE), and others of both shapes of key block
CONFIGS = [None, (128, 64, 3, 8), (128, 128, 2, 8)]


def _options(q, k, causal: bool) -> AttnOptions:
    return AttnOptions(softmax_scale=q.shape[-1] ** -0.5, diag_offset=k.shape[1] - q.shape[1],
                       window_right=0 if causal else -1)


@needs_hopper
@pytest.mark.parametrize("ws", [False, True], ids=["pipelined", "warp_specialized"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gluon_forward_matches_reference(case, config, ws, monkeypatch):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, dtype = case
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype,
                         requires_grad=False, nheads_k=nheads_k)
    opts = _options(q, k, causal)
    assert hopper.supports(q, k, v, opts)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(batch, nheads, seqlen_q, device=q.device))
    hopper.attention_forward(q, k, v, opts, config, out=out, lse=lse, ws=ws)
    reference = reference_attention(q, k, v, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, causal=causal)
    check_attention("gluon", dict(out=out, lse=lse), reference, baseline, dtype,
                    fields=("out", "lse"))
    # and as close to the Triton forward (which the interpreter checks on the CPU) as the
    # rule allows either of them to be to the reference
    monkeypatch.setitem(configs.features, "gluon_forward", False)
    triton_out, triton_lse = forward.attention_forward(q, k, v, opts)
    for name, got, theirs, ref, base in (("out", out, triton_out, reference.out, baseline.out),
                                         ("lse", lse, triton_lse, reference.lse, baseline.lse)):
        assert_close(f"gluon {name} against triton", got, theirs, tolerance(ref, base, dtype))


@needs_hopper
@pytest.mark.parametrize("ws", [False, True], ids=["pipelined", "warp_specialized"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gluon_forward_float32_out_is_the_unrounded_output(case, ws):
    """out in float32 (ring attention's partial results) is written from the registers, not
    through TMA: rounded to q's dtype it is bitwise the q-dtype run's out, with the same lse,
    and it meets the rule against the float64 reference."""
    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal, dtype = case
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype,
                         requires_grad=False, nheads_k=nheads_k)
    opts = _options(q, k, causal)
    out32 = poison_(torch.empty_like(q, dtype=torch.float32))
    lse32 = poison_(torch.empty(batch, nheads, seqlen_q, device=q.device))
    hopper.attention_forward(q, k, v, opts, out=out32, lse=lse32, ws=ws)
    out, lse = hopper.attention_forward(q, k, v, opts, ws=ws)
    assert torch.equal(out32.to(dtype), out)
    assert torch.equal(lse32, lse)
    reference = reference_attention(q, k, v, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, causal=causal)
    check_attention("gluon float32 out", dict(out=out32, lse=lse32), reference, baseline, dtype,
                    fields=("out", "lse"))


@needs_hopper
def test_float32_partials_take_the_gluon_forward(monkeypatch):
    """forward.attention_forward(out_dtype=float32), as ring attention's blocks call it, takes
    the Gluon path where a q-dtype call would, and agrees with the Triton forward's float32
    out by the rule."""
    monkeypatch.setitem(configs.features, "gluon_forward", True)
    calls = _recording(monkeypatch)
    q, k, v = random_qkv(1, 1024, 2048, 4, 128, torch.bfloat16, requires_grad=False,
                         nheads_k=2)
    opts = _options(q, k, False)
    out, lse = forward.attention_forward(q, k, v, opts, out_dtype=torch.float32)
    assert calls == [tuple(q.shape)] and out.dtype == torch.float32
    monkeypatch.setitem(configs.features, "gluon_forward", False)
    triton_out, triton_lse = forward.attention_forward(q, k, v, opts, out_dtype=torch.float32)
    reference = reference_attention(q, k, v, dtype=torch.float64)
    baseline = reference_attention(q, k, v)
    for name, got, theirs, ref, base in (("out", out, triton_out, reference.out, baseline.out),
                                         ("lse", lse, triton_lse, reference.lse, baseline.lse)):
        assert_close(f"gluon float32 {name} against triton", got, theirs,
                     tolerance(ref, base, torch.bfloat16))


@needs_hopper
def test_gluon_forward_rejects_an_out_it_cannot_write():
    q, k, v = random_qkv(1, 256, 256, 2, 128, torch.bfloat16, requires_grad=False)
    with pytest.raises(ValueError, match="out must have q's shape"):
        hopper.attention_forward(q, k, v, _options(q, k, False),
                                 out=torch.empty_like(q, dtype=torch.float16))


def _recording(monkeypatch) -> list:
    """Make hopper.attention_forward note each call (q's shape) in the list returned."""
    return record_calls(monkeypatch, [(hopper, "attention_forward")],
                        lambda name, args: tuple(args[0].shape))


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_with_the_gluon_forward(causal, head_dim, monkeypatch):
    """The backward runs from the Gluon forward's O and LSE (keys past MIN_SEQLEN_K, so the
    forward takes the Gluon path: each head dim's chosen kernel)."""
    monkeypatch.setitem(configs.features, "gluon_forward", True)
    calls = _recording(monkeypatch)
    q, k, v = random_qkv(1, 300, 4100, 4, head_dim, torch.bfloat16, nheads_k=2)
    dout = torch.randn_like(q)
    got = run_flashtile(q, k, v, dout, causal=causal)
    assert calls == [tuple(q.shape)]
    reference = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, dout, causal=causal)
    check_attention("flash_attn_func, gluon forward", got, reference, baseline, torch.bfloat16)


@needs_hopper
def test_which_calls_the_gluon_forward_covers(monkeypatch):
    monkeypatch.setitem(configs.features, "gluon_forward", True)
    q, k, v = random_qkv(1, 256, 256, 2, 128, torch.bfloat16, requires_grad=False)
    assert hopper.supports(q, k, v, _options(q, k, True))
    softcap = AttnOptions(softmax_scale=0.1, diag_offset=0, softcap=30.0)
    window = AttnOptions(softmax_scale=0.1, diag_offset=0, window_left=64, window_right=0)
    assert not hopper.supports(q, k, v, softcap)
    assert not hopper.supports(q, k, v, window)
    assert not hopper.supports(q.float(), k.float(), v.float(), _options(q, k, False))
    q96, k96, v96 = random_qkv(1, 256, 256, 2, 96, torch.bfloat16, requires_grad=False)
    assert not hopper.supports(q96, k96, v96, _options(q96, k96, False))
    # causal with more queries than keys: some rows see no key
    q_long = torch.randn(1, 300, 2, 128, device=q.device, dtype=q.dtype)
    assert not hopper.supports(q_long, k[:, :200], v[:, :200],
                               _options(q_long, k[:, :200], True))
    # a flash_attn_func call it does not cover goes to the Triton forward, and is right
    with_window = flash_attn_func(q, k, v, window_size=(64, 0))
    reference = reference_attention(q, k, v, window_size=(64, 0), dtype=torch.float64)
    baseline = reference_attention(q, k, v, window_size=(64, 0))
    check_attention("window, forward.py", dict(out=with_window), reference, baseline,
                    torch.bfloat16, fields=("out",))


@needs_hopper
@pytest.mark.parametrize("head_dim,causal,seqlen,taken", [
    (128, False, 1024, True), (128, False, 512, False), (128, True, 2048, True),
    (128, True, 1024, False), (64, False, 1024, True), (64, False, 512, False),
    (64, True, 2048, False)])
def test_the_forward_takes_the_gluon_path_where_it_measured_faster(head_dim, causal, seqlen,
                                                                   taken, monkeypatch):
    """hopper.MIN_SEQLEN_K decides; the result is right either way."""
    monkeypatch.setitem(configs.features, "gluon_forward", True)
    calls = _recording(monkeypatch)
    q, k, v = random_qkv(1, seqlen, seqlen, 2, head_dim, torch.bfloat16, requires_grad=False)
    out = flash_attn_func(q, k, v, causal=causal)
    assert len(calls) == int(taken)
    reference = reference_attention(q, k, v, causal=causal, dtype=torch.float64)
    baseline = reference_attention(q, k, v, causal=causal)
    check_attention("routed forward", dict(out=out), reference, baseline, torch.bfloat16,
                    fields=("out",))


@pytest.mark.parametrize("head_dim,causal,seqlen_q,seqlen_k,taken", [
    (128, False, 1024, 1024, True), (128, False, 1024, 1023, False),
    (128, True, 2048, 2048, True), (128, True, 2048, 2047, False),
    (64, False, 1024, 1024, True), (64, False, 1024, 1023, False),
    (64, True, 4096, 4096, True), (64, True, 4096, 4095, False),
    (128, False, 127, 4096, False),  # less than one query block: forward.py
    (64, False, 63, 4096, False), (64, False, 64, 4096, True),  # D 64's blocks are 64 rows
    (96, False, 4096, 4096, False)])  # a head dim without a choice
def test_preferred_follows_the_measured_thresholds(head_dim, causal, seqlen_q, seqlen_k, taken,
                                                   monkeypatch):
    """hopper.preferred on any machine: supports() stubbed to True, so only the lengths and
    head dim decide (MIN_SEQLEN_K, CHOICE's BLOCK_M)."""
    monkeypatch.setattr(hopper, "supports", lambda *args: True)
    q = torch.empty(1, seqlen_q, 1, head_dim)
    k = torch.empty(1, seqlen_k, 1, head_dim)
    opts = AttnOptions(softmax_scale=0.1, diag_offset=seqlen_k - seqlen_q,
                       window_right=0 if causal else -1)
    assert hopper.preferred(q, k, k, opts) is taken


def test_default_config_fits_the_kernel_asked_for():
    """Each head dim's choice, except that the warp-specialized kernel (two warpgroups of 64
    query rows) gets 128-row tiles where the choice has fewer (D 64's 64-row pipelined tiles)."""
    for head_dim, (ws, config) in hopper.CHOICE.items():
        assert hopper.default_config(head_dim, ws) == config
        assert hopper.default_config(head_dim, True)[0] == 128
    assert hopper.CHOICE[64] == (False, (64, 128, 2, 4))
    assert hopper.default_config(64, False) == (64, 128, 2, 4)
    assert hopper.default_config(64, True) == hopper.WS_FALLBACK
    assert hopper.default_config(128, False) == hopper.CHOICE[128][1]
