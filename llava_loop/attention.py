"""``sdpa_varlen``: attention for packed rows that never crosses a sample boundary and costs sum(length^2).

Transformers reads a packed row (``position_ids`` restarting at 0, no attention mask) as packed sequences. Under
plain sdpa that becomes one dense block-diagonal mask, so attention still costs (row length)^2 and packing buys
nothing. This kernel runs each sample on its own:

* on a GPU, one varlen kernel per layer over the whole row: flash-attn's ``flash_attn_varlen_func`` where it is
  installed, else torch's ``varlen_attn`` (both take the row's ``cu_seqlens``);
* elsewhere (CPU, fp32, dropout), sdpa once per sample with ``is_causal``: the same numbers.

The sample boundaries come from the collator, computed once per batch on the host (``PackedSamples``, passed to
the model as the ``packed_samples`` keyword, which transformers hands down to every attention layer), so no layer
reads them back from the device. A packed row without them (a caller's own batch) falls back to reading them
from ``position_ids`` in every layer.

Anything that is not a plain packed causal row (padding masks, a KV cache, sliding windows, custom mask overlays)
goes to transformers' own sdpa mask and kernel unchanged, so generation and padded batches behave as under sdpa.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_varlen"
PACKED = "packed_samples"  # the model keyword that carries a packed row's boundaries


@dataclass
class PackedSamples:
    """One packed row's samples: ``bounds`` (start offsets plus the row length, on the host) and the same as
    ``cu_seq_lens`` (int32, on the model's device: what varlen kernels take), with the longest sample's length."""

    bounds: list[int]
    cu_seq_lens: torch.Tensor
    max_length: int


def packed_kwargs(batch: dict) -> dict:
    """The model keyword for a packed batch from the collator (``data/collate.py``); nothing for a padded one."""
    if "sample_bounds" not in batch:
        return {}
    bounds = batch["sample_bounds"]
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return {PACKED: PackedSamples(bounds, batch["cu_seq_lens"], longest)}


def _mask(batch_size, q_length, kv_length, *args, attention_mask=None, local_size=None, use_vmap=False, **kwargs):
    # use_vmap marks custom or/and overlays; a sliding window or a cache also needs the real mask
    plain_row = batch_size == 1 and attention_mask is None and local_size is None and not use_vmap
    if plain_row and q_length == kv_length and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0:
        return None  # the kernel below takes the sample boundaries instead
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        *args,
        attention_mask=attention_mask,
        local_size=local_size,
        use_vmap=use_vmap,
        **kwargs,
    )


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the samples in one packed row, plus its length: a sample starts where positions restart."""
    row = position_ids[0]
    starts = (torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist()
    return [0, *starts, row.numel()]


@functools.cache
def varlen_kernel():
    """The GPU varlen kernel installed here, as ``fn(q, k, v, cu_seq_lens, max_length, scale) -> out`` over
    (tokens, heads, dim) tensors, or None (flash-attn and torch's varlen_attn both need CUDA)."""
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:  # takes grouped KV heads as they are
        return lambda q, k, v, cu, n, scale: flash_attn_varlen_func(
            q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True
        )
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.11 vs 2.13

    def torch_varlen(q, k, v, cu, n, scale):
        if k.shape[1] != q.shape[1]:  # grouped KV heads
            if "enable_gqa" in params:
                return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, enable_gqa=True, **causal)
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, **causal)

    return torch_varlen


def _one_kernel(module, query, key, value, packed: PackedSamples, kwargs) -> torch.Tensor | None:
    """The whole row through the GPU varlen kernel, or None where it cannot run this call exactly."""
    kernel = varlen_kernel()
    exact = (
        kernel is not None
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and not (module.training and kwargs.get("dropout", 0.0))
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
    )
    if not exact:
        return None
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    scale = kwargs.get("scaling", getattr(module, "scaling", None))
    return kernel(q, k, v, packed.cu_seq_lens.to(torch.int32), packed.max_length, scale)[None]


@torch.compiler.disable  # a loop over this batch's boundaries: compiled, it would recompile for every batch
def _per_sample(module, query, key, value, bounds: list[int], kwargs) -> torch.Tensor:
    rest = {k: v for k, v in kwargs.items() if k != "is_causal"}
    parts = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True, **rest
        )[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=1)  # sdpa_attention_forward returns (batch, seq, heads, dim)


def _attention(module, query, key, value, attention_mask, **kwargs):
    packed = kwargs.pop(PACKED, None)
    position_ids = kwargs.get("position_ids")
    plain_row = attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if plain_row and packed is not None and packed.bounds[-1] == query.shape[2]:
        out = _one_kernel(module, query, key, value, packed, kwargs)
        if out is not None:
            return out, None
        return _per_sample(module, query, key, value, packed.bounds, kwargs), None
    if plain_row and position_ids is not None and position_ids.shape[-1] == query.shape[2]:
        return _per_sample(module, query, key, value, sample_bounds(position_ids), kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)


def use_for_llm(model) -> bool:
    """Run a LLaVA model's LLM under sdpa_varlen (its vision tower keeps sdpa). False, and nothing changed, where
    the LLM does not run sdpa to begin with (transformers picks eager for Gemma 2)."""
    if model.config.text_config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation({"text_config": NAME})
    return True
