"""Peak GPU memory of flashtile forward + backward against sequence length.

Batch 1, 16 heads, head dim 128, bf16, causal off. Two figures per length:
- the peak allocated during forward and backward above what q, k, v and dout occupy: it should
  grow linearly with seqlen (out, dq, dk, dv, lse and Delta), never with seqlen²;
- the whole peak over the sum of q, k, v, out, their gradients (dq, dk, dv, dout) and lse: the
  long-context target is at most 1.1.
"""

import torch

import flashtile

print(f"{'seqlen':>7} {'inputs MiB':>11} {'peak above inputs MiB':>22} {'per token KiB':>14} "
      f"{'peak / tensors':>15}")
for n in (8192, 16384, 32768, 131072):
    q, k, v = (torch.randn(1, n, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    flashtile.flash_attn_func(q, k, v).backward(dout)  # warm-up: compile and tune
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, lse = flashtile.flash_attn_func(q, k, v, return_lse=True)
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    tensors = 8 * q.numel() * q.element_size() + lse.numel() * lse.element_size()
    print(f"{n:>7} {base / 2**20:>11.0f} {(peak - base) / 2**20:>22.1f} "
          f"{(peak - base) / n / 1024:>14.1f} {peak / tensors:>15.3f}", flush=True)
    del q, k, v, dout, out, lse
