"""``sdpa_varlen``: sdpa that runs each sample of a packed row on its own.

Transformers reads a packed row (``position_ids`` restarting at 0, no attention mask) as packed sequences. Under
flash_attention_2 that becomes varlen flash-attention; under plain sdpa it becomes one dense block-diagonal mask,
so attention still costs (row length)^2 and packing buys nothing on a CPU. This kernel splits the row at the
position restarts and calls sdpa once per sample with ``is_causal``: the same numbers (each sample attends to its
own prefix only), at sum(length^2) cost, the way varlen flash-attention does on a GPU.

Anything that is not a plain packed causal row (padding masks, a KV cache, sliding windows, custom mask overlays)
goes to transformers' own sdpa mask and kernel unchanged, so generation and padded batches behave as under sdpa.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"


def _mask(batch_size, q_length, kv_length, *args, attention_mask=None, local_size=None, use_vmap=False, **kwargs):
    # use_vmap marks custom or/and overlays; a sliding window or a cache also needs the real mask
    plain_row = batch_size == 1 and attention_mask is None and local_size is None and not use_vmap
    if plain_row and q_length == kv_length and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0:
        return None  # the kernel below derives the sample boundaries from position_ids
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask, local_size=local_size,
                     use_vmap=use_vmap, **kwargs)


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the samples in one packed row, plus its length: a sample starts where positions restart."""
    row = position_ids[0]
    starts = (torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist()
    return [0, *starts, row.numel()]


def _attention(module, query, key, value, attention_mask, **kwargs):
    position_ids = kwargs.get("position_ids")
    packed = (attention_mask is None and position_ids is not None and query.shape[0] == 1
              and query.shape[2] == key.shape[2] == position_ids.shape[-1])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = sample_bounds(position_ids)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True,
                                    **{k: v for k, v in kwargs.items() if k != "is_causal"})[0]
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1), None  # sdpa_attention_forward returns (batch, seq, heads, dim)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)


def use_for_llm(model) -> bool:
    """Run a LLaVA model's LLM under sdpa_varlen (its vision tower keeps sdpa). False, and nothing changed, where
    the LLM does not run sdpa to begin with (transformers picks eager for Gemma 2)."""
    if model.config.text_config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation({"text_config": NAME})
    return True
