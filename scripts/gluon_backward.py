"""The Gluon backward passes (kernels/hopper_backward.py) beside backward.py's and cuDNN, in
one process.

Usage: python scripts/gluon_backward.py [--dims 128,64] [--seqlens 512,1024,...] [--json FILE]

For each shape of the grid (batch·N = 16k tokens, heads = 2048 / D, bf16, causal and not):
- each pass alone: backward.py's `_attn_bwd_dkdv` and `_attn_bwd_dq` (autotuned; their kernel
  times read from the torch profiler, as they are launched inside attention_backward) and the
  Gluon kernel at each config of CONFIGS (called directly), in TFLOP/s of the pass's matmuls
  (dK/dV four: 2 × the forward's FLOP; dQ three: 1.5 ×);
- the whole backward (backward.attention_backward: Delta, dK/dV beside dQ) with the Gluon pass
  off and on, and SDPA's cuDNN backend's backward, in TFLOP/s of 2.5 × the forward's FLOP.
Timed with triton.testing.do_bench (median). What hopper_backward.CONFIG and MIN_SEQLEN_K were
read from (docs/performance.md, v7). Needs a Hopper GPU; every Gluon config is checked against
backward.py on the shape before it is timed.
"""

import argparse
import json

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.profiler import ProfilerActivity, profile

from flashtile.kernels import backward, configs, forward, hopper_backward
from flashtile.kernels.params import AttnOptions

# per pass, (BLOCK_M, BLOCK_N, STAGES), and the pass's FLOP as a multiple of the forward's
CONFIGS = {"dkdv": [(64, 128, 2), (64, 128, 3)],
           "dq": [(128, 64, 2), (128, 128, 2), (128, 64, 3)]}
FLOP = {"dkdv": 2.0, "dq": 1.5}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def triton_pass_ms(call) -> dict:
    """backward.py's dK/dV and dQ kernel times inside `call` (a whole backward), mean of 5."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    return {name: sum(e.device_time_total for e in prof.key_averages()
                      if f"_attn_bwd_{name}" in e.key) / 5 / 1000 for name in CONFIGS}


def measure(head_dim: int, causal: bool, seqlen: int) -> dict:
    batch, nheads = 16384 // seqlen, 2048 // head_dim
    q = torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v, dout = torch.randn_like(q), torch.randn_like(q), torch.randn_like(q)
    opts = AttnOptions(softmax_scale=head_dim**-0.5, diag_offset=0,
                       window_right=0 if causal else -1)
    fwd_flops = 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
    row = dict(D=head_dim, causal=int(causal), N=seqlen)
    out, lse = forward.attention_forward(q, k, v, opts)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()

    def whole():
        return backward.attention_backward(dout, q, k, v, out, lse, opts)

    configs.features["gluon_backward"] = False
    expected = dict(zip(("dq", "dk", "dv"), whole()))
    for name, ms in triton_pass_ms(whole).items():
        row[f"triton {name}"] = FLOP[name] * fwd_flops / ms / 1e9
    row["triton bwd"] = 2.5 * fwd_flops / bench(whole) / 1e9
    for name, pass_configs in CONFIGS.items():
        for config in pass_configs:
            outs = dict(dk=torch.empty_like(k), dv=torch.empty_like(v), dq=torch.empty_like(q))

            def run(config=config, name=name, o=outs):
                if name == "dkdv":
                    hopper_backward.dkdv(q, k, v, dout, lse, delta, o["dk"], o["dv"], opts,
                                         config)
                else:
                    hopper_backward.dq(q, k, v, dout, lse, delta, o["dq"], opts, config)

            run()
            written = ("dk", "dv") if name == "dkdv" else ("dq",)
            err = max((outs[t].float() - expected[t].float()).abs().max().item()
                      for t in written)
            label = f"gluon {name} " + ",".join(map(str, config))
            if not err <= 5e-2:  # reported, not timed
                print(f"{label}: max error against backward.py's {err:.3g}", flush=True)
                continue
            row[label] = FLOP[name] * fwd_flops / bench(run) / 1e9
    configs.features["gluon_backward"] = True
    row["gluon bwd"] = 2.5 * fwd_flops / bench(whole) / 1e9
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = sdpa(qt, kt, vt, is_causal=causal)
        grad = dout.transpose(1, 2)
        row["cudnn bwd"] = 2.5 * fwd_flops / bench(
            lambda: torch.autograd.grad(ref, (qt, kt, vt), grad, retain_graph=True)) / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    rows = []
    for head_dim in map(int, args.dims.split(",")):
        for causal in (False, True):
            for seqlen in map(int, args.seqlens.split(",")):
                row = measure(head_dim, causal, seqlen)
                rows.append(row)
                passes = []
                for name in CONFIGS:
                    gluon = {k: t for k, t in row.items() if k.startswith(f"gluon {name} ")}
                    best = max(gluon, key=gluon.get, default=None)
                    if best is None:
                        continue
                    passes.append(f"{name} triton {row[f'triton {name}']:.0f}, " + ", ".join(
                        f"({k.split()[-1]}) {t:.0f}" for k, t in gluon.items())
                        + f" [best {gluon[best] / row[f'triton {name}']:.2f}x]")
                print(f"D{head_dim} causal={int(causal)} N{seqlen}: " + "; ".join(passes)
                      + f"; bwd triton {row['triton bwd']:.0f}, gluon {row['gluon bwd']:.0f} "
                      f"({row['gluon bwd'] / row['triton bwd']:.2f}x), cudnn "
                      f"{row['cudnn bwd']:.0f} (÷cudnn {row['gluon bwd'] / row['cudnn bwd']:.2f})"
                      " TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
