"""Run forward + backward once with every candidate config of every kernel forced, each in its
own process (a config that faults the GPU cannot take the others down with it).

Usage: python scripts/config_scan.py [D,causal,N ...]   (default: 64,1,1024 128,1,1024)
Prints one line per (shape, kernel, config): ok, or the error's last line.
"""

import os
import subprocess
import sys

from flashtile.kernels import configs

RUN_ONE = """
import sys, torch, flashtile
from flashtile.kernels import configs
kern, m, n, w, s, D, causal, N = sys.argv[1], *map(int, sys.argv[2:])
configs.set_override(kern, configs.KernelConfig(m, n, w, s))
B, H = 16384 // N, 2048 // D
q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
o = flashtile.flash_attn_func(q, k, v, causal=bool(causal))
o.backward(torch.randn_like(o))
torch.cuda.synchronize()
print("ok")
"""

shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[1:]] or [(64, 1, 1024),
                                                                          (128, 1, 1024)]
env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
for D, causal, N in shapes:
    for kern in configs.KERNELS:
        for cfg in configs.candidates(kern, configs.head_dim_pad(D), "tf32"):
            r = subprocess.run([sys.executable, "-c", RUN_ONE, kern, *map(str, cfg), str(D),
                                str(causal), str(N)], capture_output=True, text=True, env=env)
            res = "ok" if "ok" in r.stdout else (r.stderr.strip().splitlines() or ["?"])[-1]
            print(D, causal, N, kern, cfg, res[:120], flush=True)
