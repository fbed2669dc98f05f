"""The Gluon kernels' launchers on any machine: the interpreter cannot run Gluon, and a wrong
argument order in hopper.attention_forward, hopper_backward.dkdv or hopper_backward.dq would
only show on a Hopper GPU. Here each kernel is replaced by a recorder, the launcher runs on CPU
tensors, and the arguments it passed are bound to the kernel's own parameters: every parameter
given once, every tensor on a pointer parameter and the right one, the strides and lengths
those of the tensors (dense and packed)."""

import inspect

import pytest
import torch

from flashtile.kernels import configs, hopper, hopper_backward
from flashtile.kernels.launch import Launcher, launcher_for
from flashtile.kernels.params import AttnOptions

POINTERS = {"Q", "K", "V", "O", "LSE", "CuSeqQ", "CuSeqK", "dO", "Delta", "dK", "dV", "dQ"}


@pytest.fixture(autouse=True, params=[False, True], ids=["triton_launch", "gluon_launcher"])
def _launch_path(request, monkeypatch):
    """Each call both ways: Triton's own launch, and through launch.Launcher (which, for a
    kernel that is not compiled, here a Recorder, hands the call on unchanged)."""
    monkeypatch.setitem(configs.features, "gluon_launcher", request.param)


def test_launcher_for_keeps_one_launcher_per_kernel():
    first, second = Recorder(hopper._attn_fwd_hopper), Recorder(hopper._attn_fwd_hopper)
    launcher = launcher_for(first)
    assert isinstance(launcher, Launcher) and launcher.fn is first
    assert launcher_for(first) is launcher
    assert launcher_for(second) is not launcher and launcher_for(second).fn is second


class Recorder:
    """Stands in for a Gluon JITFunction: `kernel[grid](*args, **kwargs)` binds the call to the
    real kernel's signature and keeps it."""

    def __init__(self, kernel):
        self.signature = inspect.signature(kernel.fn)
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if "num_warps" not in self.signature.parameters:  # then only a launch option
                kwargs.pop("num_warps")
            bound = self.signature.bind(*args, **kwargs)
            self.calls.append((grid, dict(bound.arguments)))
        return launch


def _record(monkeypatch, module, name: str) -> Recorder:
    recorder = Recorder(getattr(module, name))
    monkeypatch.setattr(module, name, recorder)
    return recorder


def _check_kinds(arguments: dict) -> None:
    for name, value in arguments.items():
        if name in POINTERS:
            assert isinstance(value, torch.Tensor), f"{name} got {type(value).__name__}"
        else:
            assert not isinstance(value, torch.Tensor), f"{name} got a tensor"


def _dense(causal=True):
    q = torch.randn(2, 300, 4, 64, dtype=torch.float16)
    k, v = torch.randn(2, 500, 2, 64, dtype=torch.float16), torch.randn(2, 500, 2, 64,
                                                                         dtype=torch.float16)
    opts = AttnOptions(softmax_scale=0.125, diag_offset=200, window_right=0 if causal else -1)
    return q, k, v, opts


def _packed():
    lengths = [300, 0, 77]
    cu = torch.tensor([0, 300, 300, 377], dtype=torch.int32)
    q = torch.randn(1, sum(lengths), 4, 128, dtype=torch.bfloat16)
    k, v = torch.randn(1, sum(lengths), 2, 128, dtype=torch.bfloat16), torch.randn(
        1, sum(lengths), 2, 128, dtype=torch.bfloat16)
    opts = AttnOptions(softmax_scale=0.1, diag_offset=0, window_right=0,
                       varlen=(cu, cu, 300, 300))
    return q, k, v, opts


@pytest.mark.parametrize("ws", [False, True], ids=["pipelined", "warp_specialized"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_forward_launch_binds_to_the_kernel(ws, packed, monkeypatch):
    q, k, v, opts = _packed() if packed else _dense()
    name = "_attn_fwd_hopper_ws" if ws else "_attn_fwd_hopper"
    recorder = _record(monkeypatch, hopper, name)
    out, lse = hopper.attention_forward(q, k, v, opts, ws=ws)
    (grid, args), = recorder.calls
    _check_kinds(args)
    assert args["Q"] is q and args["K"] is k and args["V"] is v and args["O"] is out
    assert args["LSE"] is lse and lse.shape == (q.shape[0], 4, q.shape[1])
    batch_stride = 0 if packed else None
    for t, p in ((q, "q"), (k, "k"), (v, "v"), (out, "o")):
        expect_b = t.stride(0) if batch_stride is None else batch_stride
        assert (args[f"stride_{p}b"], args[f"stride_{p}m" if p in "qo" else f"stride_{p}n"],
                args[f"stride_{p}h"]) == (expect_b, t.stride(1), t.stride(2))
    assert args["stride_lh"] == lse.stride(1)
    assert args["VARLEN"] is packed and args["CAUSAL"] is True
    assert args["group"] == 2 and args["HEAD_DIM"] == q.shape[-1]
    longest = 300 if packed else q.shape[1]
    assert args["seqlen_q"] == longest and grid[2] == (3 if packed else 2)
    if packed:
        assert args["CuSeqQ"] is opts.varlen[0] and args["CuSeqK"] is opts.varlen[1]


@pytest.mark.parametrize("pass_name", ["dkdv", "dq"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_backward_launches_bind_to_the_kernels(pass_name, packed, monkeypatch):
    q, k, v, opts = _packed() if packed else _dense()
    name = "_attn_bwd_dkdv_hopper" if pass_name == "dkdv" else "_attn_bwd_dq_hopper"
    recorder = _record(monkeypatch, hopper_backward, name)
    do = torch.randn_like(q)
    lse = torch.randn(q.shape[0], 4, q.shape[1])
    delta = torch.randn_like(lse)
    if pass_name == "dkdv":
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        hopper_backward.dkdv(q, k, v, do, lse, delta, dk, dv, opts)
        written = {"dK": dk, "dV": dv}
    else:
        dq = torch.empty_like(q)
        hopper_backward.dq(q, k, v, do, lse, delta, dq, opts)
        written = {"dQ": dq}
    (grid, args), = recorder.calls
    _check_kinds(args)
    for param, t in {"Q": q, "K": k, "V": v, "dO": do, "LSE": lse, "Delta": delta,
                     **written}.items():
        assert args[param] is t, param
    for param, t in {"q": q, "k": k, "v": v, "do": do,
                     **{p.lower(): t for p, t in written.items()}}.items():
        rows = "m" if param in ("q", "do", "dq") else "n"
        assert (args[f"stride_{param}b"], args[f"stride_{param}{rows}"],
                args[f"stride_{param}h"]) == (0 if packed else t.stride(0), t.stride(1),
                                               t.stride(2)), param
    assert args["stride_lh"] == lse.stride(1) and args["VARLEN"] is packed
    assert args["softmax_scale"] == opts.softmax_scale and args["group"] == 2
    if packed:
        assert args["CuSeqQ"] is opts.varlen[0] and args["seqlen_k"] == 300
