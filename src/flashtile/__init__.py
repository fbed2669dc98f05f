"""flashtile: exact FlashAttention, forward and backward, in Python with Triton.

On a machine without a CUDA GPU the kernels run through Triton's interpreter: if
TRITON_INTERPRET is unset there, importing flashtile sets it to 1 (before any kernel is
defined), so that the same kernel code runs on the CPU.
"""

import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

from flashtile import masks  # noqa: E402
from flashtile.interface import (  # noqa: E402
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from flashtile.packed import (  # noqa: E402
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

__version__ = "0.1.0"

__all__ = ["__version__", "flash_attn_func", "flash_attn_kvpacked_func",
           "flash_attn_qkvpacked_func", "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache", "masks",
           "scaled_dot_product_attention"]
