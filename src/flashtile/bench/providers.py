"""The attention implementations `flashtile bench` times, one factory each.

Every factory takes q, k, v in SDPA's layout (batch, heads, seqlen, headdim), created with
requires_grad, and `causal`, and returns a callable with no arguments that runs the forward and
returns out (batch, heads, seqlen, headdim), differentiable with respect to q, k and v. The
benchmark's problems are square (seqlen_q = seqlen_k), where SDPA's top-left causal alignment
and FlashAttention's bottom-right one are the same mask, so every provider computes one thing.

A factory raises `Unavailable` when its provider cannot run here (not installed, too large for
the free memory). Any other exception, from the factory or the first call, is the provider
failing; the harness reports both as a skip with the message and goes on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashtile
from flashtile.reference import attention_naive

Forward = Callable[[], torch.Tensor]
Factory = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], Forward]


class Unavailable(Exception):
    """The provider cannot run this problem on this machine; the message says why."""


def flashtile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        causal: bool) -> Forward:
    """flashtile.flash_attn_func on (B, N, H, D) views of the inputs: a transpose of strides,
    never a copy, so flashtile reads the same memory SDPA does."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, D) views

    def forward() -> torch.Tensor:
        return flashtile.flash_attn_func(qt, kt, vt, causal=causal).transpose(1, 2)

    return forward


def _sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          causal: bool) -> Forward:
    """torch's scaled_dot_product_attention with only `backend` allowed: if that backend cannot
    take the problem, SDPA raises instead of silently picking another."""

    def forward() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return forward


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Forward:
    """SDPA's FlashAttention-2 backend."""
    return _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal)


def sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Forward:
    """SDPA's cuDNN backend, the fastest of torch's own on the H100."""
    return _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)


def sdpa_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Forward:
    """SDPA's memory-efficient (xformers) backend."""
    return _sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v, causal)


# Above this many score entries, create_block_mask's eager path (which materializes the whole
# seqlen_q × seqlen_k bool mask: 16 GiB at 128k) is replaced by its compiled one, which does not.
EAGER_BLOCK_MASK_LIMIT = 2**28


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False compiles once per shape, and a full grid has more shapes than dynamo's
    # default of 8 recompilations, past which flex_attention would run unfused, in eager mode.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    # The bwd mode re-runs one graph's backward (retain_graph=True, bench/measure.py), which a
    # compiled backward with donated buffers refuses: whether AOTAutograd donates depends on the
    # graph and the compile cache (one grid timed Flex's backward, a later run on another
    # machine refused every one), so Flex keeps its buffers always.
    from torch._functorch import config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(flex_attention, dynamic=False)


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _causal_block_mask(seqlen_q: int, seqlen_k: int, device: torch.device):
    """One block mask per problem size, built once: building it is not what is timed."""
    from torch.nn.attention.flex_attention import create_block_mask

    build = (create_block_mask if seqlen_q * seqlen_k <= EAGER_BLOCK_MASK_LIMIT
             else torch.compile(create_block_mask))
    return build(_causal_mask, None, None, seqlen_q, seqlen_k, device=device)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Forward:
    """FlexAttention under torch.compile(dynamic=False); causal through a cached block mask
    (fully masked blocks skipped), non-causal with none. The first call of each shape compiles;
    the harness makes that call in its correctness check, before any timing."""
    attention = _compiled_flex()
    block_mask = _causal_block_mask(q.shape[2], k.shape[2], q.device) if causal else None

    def forward() -> torch.Tensor:
        return attention(q, k, v, block_mask=block_mask)

    return forward


NAIVE_MEMORY_SHARE = 1 / 3


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Forward:
    """flashtile.reference.attention_naive in the input dtype: attention as plain PyTorch code
    writes it, with the (B, H, N, N) scores and probabilities materialized.

    On a GPU it is skipped where B·H·Nq·Nk·(bytes per element)·4, an estimate of its score-sized
    temporaries, exceeds a third of the free memory: beyond that it would only measure an
    out-of-memory error."""
    if q.is_cuda:
        need = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.element_size() * 4
        free, _ = torch.cuda.mem_get_info(q.device)
        if need > NAIVE_MEMORY_SHARE * free:
            raise Unavailable(f"needs about {need / 2**30:.1f} GiB for its score matrices, over "
                              f"a third of the {free / 2**30:.1f} GiB free")

    def forward() -> torch.Tensor:
        out, _ = attention_naive(q, k, v, causal=causal)
        return out

    return forward


def fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Forward:
    """FlashAttention-4 (`flash_attn.cute.flash_attn_func`, CuTe DSL) on (B, N, H, D) views, as
    flashtile gets them; available only where the flash-attn-4 package imports."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # ImportError, or the CuTe DSL failing to initialize
        raise Unavailable(f"flash_attn.cute does not import: {e!r}") from e
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def forward() -> torch.Tensor:
        out = flash_attn_func(qt, kt, vt, causal=causal)
        out = out[0] if isinstance(out, tuple) else out  # some versions also return lse
        return out.transpose(1, 2)

    return forward


PROVIDERS: dict[str, Factory] = {
    "flashtile": flashtile_attention,
    "sdpa-flash": sdpa_flash,
    "sdpa-cudnn": sdpa_cudnn,
    "sdpa-efficient": sdpa_efficient,
    "flex": flex,
    "naive": naive,
    "fa4": fa4,
}
