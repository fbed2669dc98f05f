"""Registers and spills of each candidate config, from ptxas, on any machine (no GPU needed).

Compiles the forward, dK/dV and dQ kernels for sm_90a with Triton's bundled compiler, with the
specializations a GPU launch makes (the head dim's unit strides as constexpr 1, pointers, row
strides and sequence lengths divisible by 16), and prints what ptxas reports: registers per
thread, spill bytes and shared memory. A kernel at 255 registers that spills keeps part of its
tiles in local memory inside the inner loop (docs/performance.md, "What limits the backward").

    TRITON_INTERPRET=0 python scripts/registers.py [--kernels dkdv,dq,fwd] [--head-dim 128]
        [--causal] [--tma]

The figures are the Triton version's that runs the script: compare with the GPU's (3.6.0).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JITFunctions, not interpreted

import triton  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from flashtile.kernels import backward, compile_check, configs, forward  # noqa: E402

KERNELS = {"fwd": forward._attn_fwd, "dkdv": backward._attn_bwd_dkdv,
           "dq": backward._attn_bwd_dq}
TUNING_NAMES = {"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}


def ptx_resources(ptx: str) -> dict[str, int]:
    """registers and spill stores/loads (bytes) that ptxas reports for PTX text, for sm_90a,
    with the ptxas Triton itself compiles with (the package's, or the one its knobs name).
    Raises CalledProcessError, with ptxas' message, if ptxas refuses the PTX."""
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        text = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o",
                               os.path.join(tmp, "kernel.o")],
                              capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"),
            "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


def ptxas_report(compiled) -> dict[str, int]:
    """registers, spill stores/loads (bytes) and shared memory of a compiled kernel."""
    return {**ptx_resources(compiled.asm["ptx"]), "shared": compiled.metadata.shared}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="dkdv,dq,fwd")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--tma", action="store_true", help="key/query blocks through TMA")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90a, bf16, head dim {args.head_dim}, "
          f"causal={args.causal}, TMA={args.tma}")
    print(f"{'kernel':6} {'BLOCK_M x BLOCK_N':>17} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill st/ld (B)':>15} {'smem (KiB)':>10}")
    pad = configs.head_dim_pad(args.head_dim)
    for kernel in args.kernels.split(","):
        for block_m, block_n, warps, stages in configs.candidates(TUNING_NAMES[kernel], pad,
                                                                  "tf32"):
            flags = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=args.head_dim,
                         HEAD_DIM_PAD=pad, LOCAL_RIGHT=args.causal, USE_TMA=args.tma)
            compiled = compile_check.compile_kernel(KERNELS[kernel],
                                                    {**compile_check.BASE, **flags}, warps,
                                                    stages, "bf16", as_launched=True)
            report = ptxas_report(compiled)
            print(f"{kernel:6} {f'{block_m} x {block_n}':>17} {warps:>5} {stages:>6} "
                  f"{report['registers']:>5} "
                  f"{report['spill_stores']:>7}/{report['spill_loads']:<7} "
                  f"{report['shared'] / 1024:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
