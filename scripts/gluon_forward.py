"""The Gluon forwards (kernels/hopper.py) beside the Triton forward and cuDNN, in one process.

Usage: python scripts/gluon_forward.py [--dims 128,64] [--seqlens 512,1024,...] [--json FILE]

For each shape of the grid (batch·N = 16k tokens, heads = 2048 / D, bf16, causal and not):
forward TFLOP/s of forward.py (autotuned, the Gluon path switched off), of the pipelined Gluon
kernel and the warp-specialized one at each config of CONFIGS, of SDPA's cuDNN backend and
of FlexAttention (compiled, as `flashtile bench` runs it);
kernels called directly (no autograd), timed with triton.testing.do_bench (median). What
hopper.CHOICE and hopper.MIN_SEQLEN_K were read from (docs/performance.md, v6). Needs a Hopper
GPU; every Gluon config is checked against forward.py on the shape before it is timed.
"""

import argparse
import json

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from flashtile.bench import providers
from flashtile.kernels import configs, forward, hopper
from flashtile.kernels.params import AttnOptions

# (warp-specialized, (BLOCK_M, BLOCK_N, STAGES, num_warps)) per head dim
CONFIGS = {
    128: [(False, (128, 128, 2, 8)), (True, (128, 128, 2, 4)), (True, (128, 64, 3, 4)),
          (True, (128, 128, 3, 4))],
    64: [(False, (64, 128, 2, 4)), (False, (64, 64, 2, 4)), (False, (128, 64, 2, 8)),
         (False, (128, 128, 2, 8)), (True, (128, 64, 2, 4)), (True, (128, 128, 2, 4))],
}


def name(ws: bool, config) -> str:
    return ("ws" if ws else "pipelined") + "(" + ",".join(map(str, config[:3])) + ")"


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure(head_dim: int, causal: bool, seqlen: int) -> dict:
    batch, nheads = 16384 // seqlen, 2048 // head_dim
    q = torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    opts = AttnOptions(softmax_scale=head_dim**-0.5, diag_offset=0,
                       window_right=0 if causal else -1)
    flops = 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
    row = dict(D=head_dim, causal=int(causal), N=seqlen)
    configs.features["gluon_forward"] = False
    expected, _ = forward.attention_forward(q, k, v, opts)
    row["triton"] = flops / bench(lambda: forward.attention_forward(q, k, v, opts)) / 1e9
    for ws, config in CONFIGS[head_dim]:
        out, _ = hopper.attention_forward(q, k, v, opts, config, ws=ws)
        err = (out.float() - expected.float()).abs().max().item()
        if err > 2e-2:
            raise AssertionError(f"{name(ws, config)}: max |out - forward.py's| {err:.3g}")
        ms = bench(lambda ws=ws, config=config: hopper.attention_forward(q, k, v, opts, config,
                                                                          ws=ws))
        row[name(ws, config)] = flops / ms / 1e9
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["cudnn"] = flops / bench(lambda: sdpa(qt, kt, vt, is_causal=causal)) / 1e9
    flex = providers.flex(qt, kt, vt, causal)
    err = (flex().transpose(1, 2).float() - expected.float()).abs().max().item()
    if err > 2e-2:
        raise AssertionError(f"flex: max |out - forward.py's| {err:.3g}")
    row["flex"] = flops / bench(flex) / 1e9
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
                kernels = {k: t for k, t in row.items() if k.startswith(("ws", "pipelined"))}
                best = max(kernels, key=kernels.get)
                print(f"D {head_dim} causal {int(causal)} N {seqlen:5}: triton "
                      f"{row['triton']:.0f}, cudnn {row['cudnn']:.0f}, flex {row['flex']:.0f} | "
                      + ", ".join(f"{k} {t:.0f}" for k, t in kernels.items())
                      + f" | best {best}: {kernels[best] / row['triton']:.3f}x triton, "
                      f"{kernels[best] / row['cudnn']:.3f}x cudnn", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
