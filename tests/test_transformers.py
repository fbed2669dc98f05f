"""flashtile as a transformers attention backend: tiny random Llama and Qwen2 models (2 layers,
4 query heads on 2 key/value heads, so every case is grouped-query attention), nothing
downloaded. Logits and parameter gradients follow FlashAttention's rule: against a float64 run
of the model with transformers' sdpa, flashtile's float32 error is at most twice sdpa's float32
error plus the floor. Padded positions are left out of the comparison and of the loss (their
outputs are don't-cares: sdpa returns something, flashtile zeros).

Sequences of 13 tokens, a window of 4 and batches of 2 keep the file at interpreter size; the
weights are drawn wider than transformers' default (std 0.2, not 0.02) so that attention is
peaked and a wrong mask shows."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashtile.integrations.transformers import NAME, register  # noqa: E402
from flashtile.testing import assert_close, tolerance  # noqa: E402

SEQLEN, VOCAB, WINDOW = 13, 97, 4


@pytest.fixture(autouse=True)
def on_device(dev):
    """Models and inputs on the test device (the GPU where there is one)."""
    torch.set_default_device(dev)
    yield
    torch.set_default_device(None)


def config(family: str):
    """A fresh config per model: from_config keeps the object and sets its implementation."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    # Layer 0 full attention, layer 1 a sliding window of WINDOW positions.
    return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1)


def models(family: str) -> dict:
    """The same weights under flashtile (float32), sdpa (float32) and sdpa in float64."""
    tile = transformers.AutoModelForCausalLM.from_config(config(family),
                                                         attn_implementation=register())
    out = {"tile": tile.eval()}
    for name, dtype in (("sdpa", torch.float32), ("reference", torch.float64)):
        model = transformers.AutoModelForCausalLM.from_config(config(family),
                                                              attn_implementation="sdpa")
        model.load_state_dict(tile.state_dict())
        out[name] = model.to(dtype).eval()
    return out


def batch(padding: str):
    """input_ids, attention_mask (None without padding) and position_ids, as generate makes
    them: row 1 has 5 padding tokens on the left or the right."""
    ids = torch.randint(0, VOCAB, (2, SEQLEN))
    if padding == "none":
        return ids, None, torch.arange(SEQLEN)[None].expand(2, -1)
    mask = torch.ones(2, SEQLEN, dtype=torch.long)
    mask[1, :5] = 0 if padding == "left" else 1
    mask[1, -5:] = 0 if padding == "right" else 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def logits_and_grads(model, ids, mask, position_ids, weights):
    """Logits at the real tokens and the gradients of sum(weights · logits) over them."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    logits = logits[real]
    loss = (logits * weights[real].to(logits.dtype)).sum()
    params = [p for _, p in sorted(model.named_parameters())]
    grads = torch.autograd.grad(loss, params)
    names = [n for n, _ in sorted(model.named_parameters())]
    return {"logits": logits.detach(), **dict(zip(names, grads))}


CASES = [("llama", "none"), ("llama", "left"), ("llama", "right"), ("qwen2", "left"),
         ("qwen2_sliding", "none"), ("qwen2_sliding", "left")]


@pytest.mark.parametrize("family,padding", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_logits_and_gradients_match_sdpa(family, padding):
    runs = models(family)
    ids, mask, position_ids = batch(padding)
    weights = torch.randn(2, SEQLEN, VOCAB, dtype=torch.float64)
    got = {name: logits_and_grads(model, ids, mask, position_ids, weights)
           for name, model in runs.items()}
    for field, ref in got["reference"].items():
        atol = tolerance(ref, got["sdpa"][field], torch.float32)
        assert_close(f"{family} {padding} {field}", got["tile"][field], ref, atol)


def test_sliding_window_cuts():
    """Qwen2's second layer has the window, and it changes the result: the sliding case above
    tests something."""
    runs = models("qwen2_sliding")
    assert runs["tile"].config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in runs["tile"].model.layers] == [None,
                                                                                      WINDOW]
    unwindowed = transformers.AutoModelForCausalLM.from_config(config("qwen2"),
                                                               attn_implementation="sdpa")
    unwindowed.load_state_dict(runs["tile"].state_dict())
    ids = torch.randint(0, VOCAB, (1, SEQLEN))
    with torch.no_grad():
        windowed, full = runs["tile"](ids).logits, unwindowed.eval()(ids).logits
    assert (windowed[:, WINDOW:] - full[:, WINDOW:]).abs().max() > 0.1
    assert_close("first WINDOW positions", windowed[:, :WINDOW], full[:, :WINDOW], 1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding"])
def test_decoding_with_a_cache_matches_sdpa(family):
    """Left-padded prefill, then two tokens at a time through a DynamicCache: queries sit at the
    end of the keys, and the sliding layer's cache drops its oldest keys (a key offset)."""
    runs = models(family)
    ids, mask, _ = batch("left")
    steps = [ids[:, :9], ids[:, 9:11], ids[:, 11:]]
    caches = {name: transformers.DynamicCache(config=model.config)
              for name, model in runs.items()}
    seen = 0
    for step in steps:
        seen += step.shape[1]
        got = {}
        for name, model in runs.items():
            with torch.no_grad():
                position_ids = (mask[:, :seen].cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1]:]
                got[name] = model(input_ids=step, attention_mask=mask[:, :seen],
                                  position_ids=position_ids, cache=caches[name],
                                  use_cache=True).logits
        real = mask[:, seen - step.shape[1]:seen].bool()
        ref = got["reference"][real]
        assert_close(f"{family} step to {seen}", got["tile"][real], ref,
                     tolerance(ref, got["sdpa"][real], torch.float32))


def test_attention_dropout_in_training():
    """The module's attention_dropout reaches the kernels in train mode only, seeded by torch."""
    cfg = config("llama")
    cfg.attention_dropout = 0.5
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
    ids = torch.randint(0, VOCAB, (1, SEQLEN))
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(model.train()(ids).logits.detach())
    with torch.no_grad():
        evaluated = model.eval()(ids).logits
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], evaluated)


def test_what_it_cannot_do_raises():
    """Masks it cannot express fail loudly instead of being dropped: a custom 4-D mask; and
    flash_attention_2's packed-batch arguments given in part."""
    model = transformers.AutoModelForCausalLM.from_config(config("llama"),
                                                          attn_implementation=register())
    ids = torch.randint(0, VOCAB, (1, 8))
    custom = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match=NAME):
        model(ids, attention_mask=custom)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="come together or not at all"):
        model(ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


# Two rows of packed sequences (position_ids restart where a sequence starts): 5 + 8 tokens and
# 3 + 6 + 4. transformers finds packing only without attention_mask and cache.
PACKED_LENGTHS = [[5, 8], [3, 6, 4]]


def packed_positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED_LENGTHS])


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding"])
def test_packed_sequences_match_sdpa(family):
    """Logits and gradients of packed rows against sdpa, which applies transformers'
    packed-sequence mask; and no token sees another sequence: each sequence run alone gives
    its logits."""
    runs = models(family)
    ids, positions = torch.randint(0, VOCAB, (2, SEQLEN)), packed_positions()
    weights = torch.randn(2, SEQLEN, VOCAB, dtype=torch.float64)
    got = {}
    for name, model in runs.items():
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        params = [p for _, p in sorted(model.named_parameters())]
        grads = torch.autograd.grad((logits * weights.to(logits.dtype)).sum(), params)
        got[name] = {"logits": logits.detach(),
                     **dict(zip([n for n, _ in sorted(model.named_parameters())], grads))}
    for field, ref in got["reference"].items():
        atol = tolerance(ref, got["sdpa"][field], torch.float32)
        assert_close(f"{family} packed {field}", got["tile"][field], ref, atol)
    start = PACKED_LENGTHS[1][0]  # the second sequence of row 1, on its own
    with torch.no_grad():
        alone = runs["tile"](input_ids=ids[1:, start:start + PACKED_LENGTHS[1][1]],
                             use_cache=False).logits
    assert_close("a packed sequence alone", got["tile"]["logits"][1, start:start + 6], alone[0],
                 1e-4)


def test_packed_lengths_are_found_once_per_forward():
    """Every layer gets the same sequence indices: their cumulative lengths are computed once
    (the same tensor comes back, so flash_attn_varlen_func checks it once), and again after an
    in-place change."""
    from flashtile.integrations import transformers as ft_hf

    sequences = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    cu, longest = ft_hf._cumulative_lengths(sequences)
    assert cu.tolist() == [0, 3, 5, 6, 10] and longest == 4
    assert ft_hf._cumulative_lengths(sequences)[0] is cu
    sequences[0, 2] = 1
    cu, longest = ft_hf._cumulative_lengths(sequences)
    assert cu.tolist() == [0, 2, 5, 6, 10] and longest == 4


def test_flash_attention_2_packed_arguments():
    """DataCollatorWithFlattening's explicit cu_seq_lens_q/k and max_length_q/k (one row of
    5 + 8 tokens) give the same logits as the packing found in position_ids."""
    runs = models("llama")
    ids = torch.randint(0, VOCAB, (1, SEQLEN))
    positions = packed_positions()[:1]
    cu = torch.tensor([0, 5, SEQLEN], dtype=torch.int32)
    with torch.no_grad():
        explicit = runs["tile"](input_ids=ids, position_ids=positions, use_cache=False,
                                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8,
                                max_length_k=8).logits
        found = runs["tile"](input_ids=ids, position_ids=positions, use_cache=False).logits
        ref = runs["reference"](input_ids=ids, position_ids=positions, use_cache=False).logits
        base = runs["sdpa"](input_ids=ids, position_ids=positions, use_cache=False).logits
    assert torch.equal(explicit, found)
    assert_close("explicit cu_seq_lens", explicit, ref, tolerance(ref, base, torch.float32))


def test_both_forms_of_the_packed_overlay_are_recognized(monkeypatch):
    """transformers 5.25 wraps the pattern in remap_positions_for_packed_sequence before the
    packed-sequence mask; 5.0 to 5.17 apply the mask to the pattern as it is. Both reduce to
    (pattern, sequence indices); a pattern under another overlay is left alone."""
    from transformers import masking_utils as mu

    from flashtile.integrations import transformers as ft_hf

    sequences = torch.tensor([[0, 0, 1, 1, 1]])
    window = mu.sliding_window_causal_mask_function(3)
    unremapped = mu.and_masks(window, mu.packed_sequence_mask_function(sequences))
    other = mu.and_masks(window, mu.padding_mask_function(torch.ones(1, 5, dtype=torch.bool)))
    if ft_hf._REMAP_CODE is not None:  # this transformers remaps: its own form is recognized
        remapped = mu.and_masks(mu.remap_positions_for_packed_sequence(window, sequences),
                                mu.packed_sequence_mask_function(sequences))
        pattern, found = ft_hf._packed_overlay(remapped)
        assert pattern is window and found is sequences
        assert ft_hf._packed_overlay(unremapped) == (unremapped, None)
    monkeypatch.setattr(ft_hf, "_REMAP_CODE", None)  # as with transformers 5.0 to 5.17
    pattern, found = ft_hf._packed_overlay(unremapped)
    assert pattern is window and found is sequences
    assert ft_hf._packed_overlay(other) == (other, None)
