"""What any kernel can reach when it only reads a decoding step's KV cache: the floor under
issue 5's decode target (docs/performance.md, v5.14).

Usage: python scripts/decode_floor.py [--cases 1x16384,8x16384,...]

For each case of `flashtile bench --decode` (batch x cache length; 4 kv heads, D 128, bf16),
timed as the bench times decoding (one replay of a CUDA graph, L2 flushed before each):
- an empty Triton kernel (the launch alone);
- a read of the case's K and V bytes (kv_bytes) by a Triton kernel that sums them, one chunk
  per program, the best over programs in {132, 264, 528, 1056} and two tile sizes: no
  attention kernel can read the same bytes faster than the fastest plain read;
- torch's copy of the same bytes (read + write, as the 1 GiB copy the bench divides by).
Each as a fraction of the 1 GiB copy bandwidth measured in the same run (bench's ceilings).
"""

import argparse

import torch
import triton
import triton.language as tl

from flashtile.bench.decode import DecodeCase, time_graph
from flashtile.bench.measure import _copy_gbps


@triton.jit
def _empty(X):
    pass


@triton.jit
def _read_sum(X, Out, n, chunk, BLOCK: tl.constexpr):
    """Program p sums elements [p · chunk, (p + 1) · chunk) of X (chunk a multiple of BLOCK)."""
    start = tl.program_id(0).to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    offs = tl.arange(0, BLOCK)
    for i in tl.range(0, chunk, BLOCK, num_stages=3):
        idx = start + i + offs
        acc += tl.load(X + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(Out + tl.program_id(0), tl.sum(acc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="1x16384,8x16384,64x16384,1x131072,8x131072")
    args = parser.parse_args()
    copy = _copy_gbps(25, 200)
    print(f"device copy (1 GiB, read + write): {copy:.0f} GB/s")
    print(f"{'case':>10} {'MiB':>6} | {'launch µs':>9} | {'best read µs':>12} {'% copy':>6} "
          f"{'(programs, block)':>17} | {'torch copy µs':>13} {'% copy':>6}")
    for spec in args.cases.split(","):
        batch, cache_len = (int(x) for x in spec.split("x"))
        case = DecodeCase(batch, cache_len)
        nbytes = case.kv_bytes()
        x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        launch = time_graph(lambda x=x: _empty[(1,)](x), 25, 200) * 1e3
        best = None
        for programs in (132, 264, 528, 1056):
            out = torch.empty(programs, device="cuda", dtype=torch.float32)
            for block in (2048, 8192):
                chunk = triton.cdiv(triton.cdiv(x.numel(), programs), block) * block
                us = time_graph(lambda x=x, out=out, chunk=chunk, block=block, p=programs:
                                _read_sum[(p,)](x, out, x.numel(), chunk, BLOCK=block,
                                                num_warps=8), 25, 200) * 1e3
                if best is None or us < best[0]:
                    best = (us, programs, block)
        # a copy of half the bytes reads and writes nbytes in all, as the 1 GiB copy counts
        src, dst = x[: x.numel() // 2], y[: x.numel() // 2]
        copy_us = time_graph(lambda src=src, dst=dst: dst.copy_(src), 25, 200) * 1e3
        read_pct = nbytes / (best[0] * 1e-6) / 1e9 / copy
        copy_pct = nbytes / (copy_us * 1e-6) / 1e9 / copy
        print(f"{spec:>10} {nbytes / 2**20:>6.0f} | {launch:>9.1f} | {best[0]:>12.1f} "
              f"{read_pct:>6.0%} {str(best[1:]):>17} | {copy_us:>13.1f} {copy_pct:>6.0%}",
              flush=True)


if __name__ == "__main__":
    main()
