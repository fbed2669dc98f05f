"""flashtile as a Hugging Face transformers attention backend.

    import flashtile.integrations.transformers as ft_hf
    name = ft_hf.register()                      # "tile_attention"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

The name avoids "flash": transformers 5 sends every attn_implementation containing "flash" to
its FlashAttention loader (the flash_attn package or a kernel from the Hub), and many models
branch on it. It also avoids "sdpa", "flex", "paged|" and "/" (each has its own meaning there).

Two functions are registered under the name:

- `tile_attention_mask` in AttentionMaskInterface. transformers' mask builders call it with the
  2-D padding mask, the mask pattern (`mask_function`) and where queries and keys sit in the
  sequence. It accepts the causal and the sliding-window causal patterns and returns what the
  kernels need: None (no padding) or a (batch, L) bool key mask, True = a real token (the
  convention of transformers' flash_attention_2). Packed sequences (transformers finds them in
  position_ids that restart inside a row, with no padding mask and no cache, and overlays its
  packed-sequence mask on the pattern) give that overlay's (batch, S) integer sequence index
  of each token. Any other pattern (bidirectional or chunked attention, image-token overlays)
  raises NotImplementedError.
- `tile_attention_forward` in AttentionInterface, called by every attention layer with query
  (B, H, Sq, D), key and value (B, H_k, Sk, D) and that mask; it returns (B, Sq, H, D). As in
  flash_attention_2, causality comes from the module (`is_causal`) and the window from the
  `sliding_window` argument. Without a mask it runs flash_attn_func; with a key mask it
  gathers the real tokens into a packed batch (cu_seqlens), runs flash_attn_varlen_func, and
  scatters the result back, so no work is spent on padding. Padded query rows come back as
  zeros. With sequence indices, or with flash_attention_2's explicit `cu_seq_lens_q`,
  `cu_seq_lens_k`, `max_length_q` and `max_length_k` (DataCollatorWithFlattening's
  `return_flash_attn_kwargs=True`; these take precedence, as in flash_attention_2), every row's
  tokens are split into their sequences and run through flash_attn_varlen_func as one packed
  batch: no token attends across a sequence boundary.

The causal mask in transformers compares positions in the sequence, kv_idx <= q_idx; a sliding
window of w keeps q_idx - kv_idx < w, i.e. flashtile's window_size (w - 1, 0). Both are
aligned to the last query and the last real key, as the kernels' bottom-right corner is.
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    packed_sequence_mask_function,
    prepare_padding_mask,
    sliding_window_causal_mask_function,
)

# transformers 5.25 remaps positions inside packed sequences; 5.0 to 5.17 do not (the pattern
# sees the row's positions: the same mask once the packed-sequence mask is applied)
try:
    from transformers.masking_utils import remap_positions_for_packed_sequence
except ImportError:
    remap_positions_for_packed_sequence = None

from flashtile import flash_attn_func, flash_attn_varlen_func

NAME = "tile_attention"

# Keyword arguments that change the attention's result and that the kernels do not take.
_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias")
# flash_attention_2's packed-batch arguments: all four or none.
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def register() -> str:
    """Register flashtile with transformers' AttentionInterface and AttentionMaskInterface.

    Returns the name to pass as `attn_implementation` ("tile_attention"). Calling it again is
    harmless."""
    AttentionInterface.register(NAME, tile_attention_forward)
    AttentionMaskInterface.register(NAME, tile_attention_mask)
    return NAME


# ---------------------------------------------------------------------------------------------
# The mask: which pattern transformers asked for, reduced to a key mask.


def _same_predicate(fn, ref) -> bool:
    """Whether mask function `fn` is `ref`, or a closure over the same code capturing equal
    values (transformers builds a fresh closure for each sliding window mask)."""
    if fn is ref:
        return True
    if not (inspect.isfunction(fn) and inspect.isfunction(ref)) or fn.__code__ is not ref.__code__:
        return False
    cells = zip(fn.__closure__ or (), ref.__closure__ or ())
    return all(_same_value(a.cell_contents, b.cell_contents) for a, b in cells)


def _same_value(a, b) -> bool:
    if inspect.isfunction(a) or inspect.isfunction(b):
        return _same_predicate(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(_same_value, a, b))
    return type(a) is type(b) and isinstance(a, (bool, int, str)) and a == b


# The code of the closures transformers builds for packed sequences (each call of a factory
# returns a new closure over the same code object).
_AND_CODE = and_masks(causal_mask_function).__code__
_REMAP_CODE = None
if remap_positions_for_packed_sequence is not None:
    _REMAP_CODE = remap_positions_for_packed_sequence(causal_mask_function,
                                                      torch.zeros(1, 1)).__code__
_PACKED_CODE = packed_sequence_mask_function(torch.zeros(1, 1)).__code__


def _cells(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _packed_overlay(fn):
    """(pattern, sequence indices (B, S)) when `fn` is transformers' packed-sequence overlay,
    and_masks(remap_positions_for_packed_sequence(pattern, position_ids),
    packed_sequence_mask_function(sequence indices)), or in transformers 5.0 to 5.17
    and_masks(pattern, packed_sequence_mask_function(sequence indices)); else (fn, None).
    Within one sequence the pattern compares the same differences either way: the row's
    positions and the sequence's differ by the sequence's start."""
    if not (inspect.isfunction(fn) and fn.__code__ is _AND_CODE):
        return fn, None
    parts = _cells(fn).get("mask_functions", ())
    if not (len(parts) == 2 and all(inspect.isfunction(p) for p in parts)
            and parts[1].__code__ is _PACKED_CODE):
        return fn, None
    pattern = parts[0]
    if _REMAP_CODE is not None:
        if pattern.__code__ is not _REMAP_CODE:
            return fn, None
        pattern = _cells(pattern)["mask_function"]
    return pattern, _cells(parts[1])["packed_sequence_mask"]


def _is_supported_pattern(mask_function, local_size: int | None) -> bool:
    if _same_predicate(mask_function, causal_mask_function):
        return True
    return local_size is not None and _same_predicate(
        mask_function, sliding_window_causal_mask_function(local_size))


def tile_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask tile_attention_forward receives: None, or a (batch_size, L) bool key mask.

    Queries sit at positions q_offset .. q_offset + q_length - 1 of the sequence, keys at
    kv_offset .. kv_offset + kv_length - 1; attention_mask (batch, positions) marks real
    tokens. The last query is at position q_offset + q_length - 1, so only the first
    L = q_offset + q_length - kv_offset keys can be seen (a static cache holds more: the rest
    are empty slots). The key mask covers those L keys; the queries are its last q_length
    entries. None means no padding and L = kv_length. For packed sequences: the (batch_size,
    q_length) sequence index of each token (transformers' packed_sequence_mask)."""
    mask_function, sequences = _packed_overlay(mask_function)
    if not _is_supported_pattern(mask_function, local_size):
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise NotImplementedError(
            f"attn_implementation={NAME!r} (flashtile) runs causal and sliding-window causal "
            f"attention with padding; this model asked for another mask pattern ({name}: "
            "bidirectional or chunked attention, or a custom overlay). Use "
            "attn_implementation='sdpa' for it.")
    if sequences is not None:  # transformers packs only without padding mask and cache
        if not (attention_mask is None and q_length == kv_length
                and tuple(sequences.shape) == (batch_size, q_length)):
            raise NotImplementedError(
                f"attn_implementation={NAME!r}: packed sequences with a padding mask or a "
                f"cache (queries {q_length}, keys {kv_length}, sequence indices of shape "
                f"{tuple(sequences.shape)})")
        return sequences
    seen = int(q_offset) + q_length - kv_offset  # keys up to the last query's position
    if not q_length <= seen <= kv_length:
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: queries at positions {int(q_offset)}.. "
            f"{int(q_offset) + q_length - 1} and keys at {kv_offset}..{kv_offset + kv_length - 1}"
            " are not aligned at the last query, which the kernels need")
    if attention_mask is None:
        if seen == kv_length:
            return None
        return torch.ones(batch_size, seen, dtype=torch.bool, device=kwargs.get("device"))
    padding = prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
    keys = padding[:, kv_offset:kv_offset + seen]  # (B, L): absolute positions -> key indices
    if seen == kv_length and bool(keys.all()):
        return None
    return keys


# ---------------------------------------------------------------------------------------------
# The attention function.

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def tile_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, run by flashtile's kernels.

    query: (B, H, Sq, D); key, value: (B, H_k, Sk, D), H % H_k == 0 (grouped-query attention
    without repeating k and v). attention_mask: None, the (B, L) key mask of
    tile_attention_mask (L <= Sk: keys past L are ignored), or its (B, S) sequence indices of
    packed sequences. cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k (keywords, all
    or none): flash_attention_2's packed batch over the B · S flattened tokens. dropout: the
    attention dropout probability (the model passes 0 in eval mode). scaling: the softmax scale
    (default 1/sqrt(D)). sliding_window w: each query sees its last w positions, itself
    included.
    softcap: tanh soft-capping of the scores. Returns (out (B, Sq, H, D), None): attention
    weights are not materialized."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation={NAME!r} (flashtile) does not support `{name}`; use "
                "attn_implementation='sdpa' or 'eager' for this model")
    if kwargs.get("output_attentions", False):
        _warn_once(f"attn_implementation={NAME!r} (flashtile) does not return attention "
                   "weights (output_attentions=True); they are None")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if sliding_window is not None and not causal:
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: a sliding window without causal masking is not "
            "supported")
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window,
                   softcap=softcap or 0.0)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    varlen = [kwargs.get(name) for name in _VARLEN_KWARGS]
    if any(x is not None for x in varlen):
        if not all(x is not None for x in varlen):
            raise ValueError(f"attn_implementation={NAME!r}: {', '.join(_VARLEN_KWARGS)} come "
                             "together or not at all")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            raise NotImplementedError(
                f"attn_implementation={NAME!r}: cu_seq_lens_q/k with a padding mask (packed "
                "sequences are not padded)")
        return _flattened(q, k, v, *varlen, options), None
    if attention_mask is None:
        return flash_attn_func(q, k, v, **options), None
    if (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and not attention_mask.dtype.is_floating_point and attention_mask.dtype != torch.bool):
        return _packed(q, k, v, attention_mask, options), None
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and attention_mask.dtype == torch.bool):
        shape = tuple(getattr(attention_mask, "shape", ()))
        raise NotImplementedError(
            f"attn_implementation={NAME!r} takes the (batch, keys) bool padding mask that "
            f"its mask function builds, or None; got a {type(attention_mask).__name__} of "
            f"shape {shape} (a custom 4-D mask, say). Use attn_implementation='sdpa' for it.")
    if not causal:
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: padding masks are supported for causal attention "
            "only")
    return _padded(q, k, v, attention_mask, sliding_window is not None, options), None


def _padded(q, k, v, key_mask: torch.Tensor, windowed: bool, options: dict) -> torch.Tensor:
    """Attention over the real tokens only. q: (B, Sq, H, D), k, v: (B, Sk, H_k, D), key_mask
    (B, L), L <= Sk, the queries being its last Sq entries. Returns (B, Sq, H, D), zeros at
    padded queries.

    Packing the real tokens of each row keeps their order, so causality (key position <=
    query position) survives. A window counts positions, so a windowed row's real tokens
    must be one run (left or right padding), never padding in between."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seen = key_mask.shape[1]
    if key_mask.shape[0] != batch or not seqlen_q <= seen <= k.shape[1]:
        raise ValueError(f"the key mask has shape {tuple(key_mask.shape)}; expected ({batch}, L)"
                         f" with {seqlen_q} <= L <= {k.shape[1]} (queries, keys)")
    if windowed:
        starts = key_mask & ~torch.nn.functional.pad(key_mask, (1, 0))[:, :-1]
        if bool((starts.sum(dim=1) > 1).any()):
            raise NotImplementedError(
                f"attn_implementation={NAME!r}: with a sliding window, padding must be at the "
                "start or the end of each row (the mask has padding between real tokens)")
    query_mask = key_mask[:, seen - seqlen_q:]  # (B, Sq)
    rows_q = query_mask.flatten().nonzero().squeeze(1)  # real queries among B * Sq
    rows_k = key_mask.flatten().nonzero().squeeze(1)  # real keys among B * L
    lengths_q, lengths_k = query_mask.sum(dim=1), key_mask.sum(dim=1)
    cu_q = torch.nn.functional.pad(lengths_q.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = torch.nn.functional.pad(lengths_k.cumsum(0, dtype=torch.int32), (1, 0))
    k, v = k[:, :seen], v[:, :seen]  # (B, L, H_k, D)
    out = flash_attn_varlen_func(
        q.reshape(batch * seqlen_q, nheads, head_dim).index_select(0, rows_q),
        k.reshape(batch * seen, *k.shape[2:]).index_select(0, rows_k),
        v.reshape(batch * seen, *v.shape[2:]).index_select(0, rows_k),
        cu_q, cu_k, int(lengths_q.max()), int(lengths_k.max()), **options)
    full = out.new_zeros(batch * seqlen_q, nheads, head_dim).index_copy(0, rows_q, out)
    return full.view(batch, seqlen_q, nheads, head_dim)


def _flattened(q, k, v, cu_q, cu_k, max_q, max_k, options: dict) -> torch.Tensor:
    """flash_attention_2's explicit packed batch: the B · S tokens of q (B, S, H, D) and of k,
    v as one packed batch with cumulative lengths cu_q, cu_k. Returns (B, S, H, D)."""
    batch, seqlen_q = q.shape[:2]
    cu_q, cu_k = (c.to(torch.int32) if isinstance(c, torch.Tensor) else c for c in (cu_q, cu_k))
    out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                 v.reshape(-1, *v.shape[2:]), cu_q, cu_k, int(max_q), int(max_k),
                                 **options)
    return out.view(batch, seqlen_q, *out.shape[1:])


def _packed(q, k, v, sequences: torch.Tensor, options: dict) -> torch.Tensor:
    """Packed sequences: sequences (B, S) gives each token's sequence index within its row (a
    new sequence where it changes, and at every row's start). All B · S tokens run as one
    packed batch. q: (B, S, H, D), k, v: (B, S, H_k, D); returns (B, S, H, D)."""
    if q.shape[1] != sequences.shape[1] or k.shape[1] != sequences.shape[1]:
        raise ValueError(f"packed sequence indices of shape {tuple(sequences.shape)} for "
                         f"{q.shape[1]} queries and {k.shape[1]} keys per row")
    cu, longest = _cumulative_lengths(sequences)
    return _flattened(q, k, v, cu, cu, longest, longest, options)


# sequence indices -> (weakref, version, cumulative lengths, longest): every layer of a forward
# gets the same tensor, so the lengths are found (one host synchronization) once per forward,
# and flash_attn_varlen_func, seeing the same cu_seqlens tensor, checks it once too
_LENGTHS_KEPT = 4
_lengths: dict[int, tuple] = {}


def _cumulative_lengths(sequences: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The int32 cumulative lengths of the packed sequences of `sequences` (B, S), all rows
    one after another, and the longest sequence."""
    seen = _lengths.get(id(sequences))
    if seen is not None and seen[0]() is sequences and seen[1] == sequences._version:
        return seen[2], seen[3]
    batch, seqlen = sequences.shape
    starts = torch.ones_like(sequences, dtype=torch.bool)
    starts[:, 1:] = sequences[:, 1:] != sequences[:, :-1]
    first = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat((first, first.new_tensor([batch * seqlen]))).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    if not sequences.is_inference():  # an inference tensor has no version counter
        if len(_lengths) >= _LENGTHS_KEPT:
            _lengths.pop(next(iter(_lengths)))
        _lengths[id(sequences)] = (weakref.ref(sequences), sequences._version, cu, longest)
    return cu, longest
