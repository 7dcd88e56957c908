"""Padding-free attention for packed training, registered with transformers as `peftcli_varlen`.

A packed batch is one flat sequence of whole examples laid end to end; position ids restart at 0
where each example starts. This kernel gets the example boundaries as `cu_seqlens` (TRL's collator
sends them; otherwise they are read off `position_ids`) and attends within each example only, so
no (tokens x tokens) mask is ever built and the cost grows with the sum of squared example lengths,
not with the square of the whole batch.

- CUDA, half precision: PyTorch's own varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`),
  whose keywords changed between releases, so they are feature-detected.
- Anywhere else (CPU, fp32, pre-Ampere GPUs): an exact reference, sdpa over each example's segment.
  The tests run it on CPU and the GPU test checks the kernel against it.
"""

from __future__ import annotations

import inspect
from functools import cache

from peftcli.model.speed import VARLEN as NAME  # no "flash"/"sdpa" in it: transformers treats such names specially


@cache
def _kernel():
    """varlen_attn and the keywords this torch release takes, or None where it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def register() -> None:
    """Make `attn_implementation="peftcli_varlen"` loadable (idempotent; call before loading the model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, padding_only_mask)


def padding_only_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function transformers calls for this kernel: never a dense mask. None when there is no
    padding (packed batches), else the 2D padding mask, from which the kernel takes each row's length."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if attention_mask.shape[1] == kv_length and bool(attention_mask.all()) else attention_mask


_boundaries_cache: list = [None, None]  # (position_ids it was computed from, result): one per forward


def _boundaries_from_positions(given, batch: int):
    """cu_seqlens and the longest example: a new example starts wherever the position does not follow
    the previous one (and at every row start). Every layer gets the same tensor, so compute it once."""
    import torch

    if _boundaries_cache[0] is given:
        return _boundaries_cache[1]
    position_ids = given.expand(batch, -1)
    tokens = position_ids.numel()
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    indices = starts.reshape(-1).nonzero().flatten().to(torch.int32)
    cu = torch.cat([indices, torch.tensor([tokens], dtype=torch.int32, device=indices.device)])
    result = (cu, int(cu.diff().max()))
    _boundaries_cache[0], _boundaries_cache[1] = given, result
    return result


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention-function contract: q (B, H, L, D), k/v (B, Hkv, L, D) -> ((B, L, H, D), None)."""
    import torch

    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{NAME} attention has no logit soft-capping or attention sinks; set model.attn_implementation: eager"
        )
    batch, heads, length, dim = query.shape
    if key.shape[2] != length:
        raise ValueError(f"{NAME} attention is for training (no KV cache); load the model with sdpa to generate")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    tokens = batch * length
    q = query.transpose(1, 2).reshape(tokens, heads, dim)
    k = key.transpose(1, 2).reshape(tokens, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(tokens, value.shape[1], value.shape[-1])

    keep = None
    if attention_mask is not None:  # a padded (unpacked) batch: each row's real tokens are one example
        keep = attention_mask.reshape(-1).bool().nonzero().flatten()
        lengths = attention_mask.sum(dim=1, dtype=torch.int32)
        cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())
        q, k, v = q[keep], k[keep], v[keep]
    elif kwargs.get("cu_seq_lens_q") is not None and batch == 1:
        cu, given = kwargs["cu_seq_lens_q"], kwargs.get("max_length_q")
        longest = int(given) if given is not None else int(cu.diff().max())
    elif kwargs.get("position_ids") is not None:
        cu, longest = _boundaries_from_positions(kwargs["position_ids"], batch)
    else:  # plain rows, one example each
        cu = torch.arange(0, tokens + 1, length, dtype=torch.int32, device=q.device)
        longest = length

    window = sliding_window if sliding_window is not None and sliding_window < longest else None
    out = attend(q, k, v, cu.to(device=q.device, dtype=torch.int32), longest, scaling, is_causal, window, dropout)
    if keep is not None:
        full = out.new_zeros(tokens, heads, out.shape[-1])
        out = full.index_copy(0, keep, out)
    return out.view(batch, length, heads, -1), None


def attend(q, k, v, cu, longest: int, scale, causal: bool, window: int | None, dropout: float = 0.0):
    """Attention within each [cu[i], cu[i+1]) segment of flat (T, H, D) tensors; GQA when k/v have fewer heads."""
    import torch

    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # As sdpa does under autocast (and transformers' flash path for PEFT's fp32 norms): half precision.
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if _kernel() is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout:
        if torch.cuda.get_device_capability(q.device)[0] >= 8:
            return _flash(q, k, v, cu, longest, scale, causal, window)
    return reference(q, k, v, cu, scale, causal, window, dropout)


def _flash(q, k, v, cu, longest, scale, causal, window):
    varlen_attn, keywords = _kernel()
    kwargs = {}
    if "window_size" in keywords:  # torch >= 2.11: (-1, 0) is causal, (W, 0) a causal window of W + 1
        kwargs["window_size"] = ((window - 1) if window else -1, 0) if causal else (-1, -1)
    elif window:
        return reference(q, k, v, cu, scale, causal, window)
    else:
        kwargs["is_causal"] = causal
    if "scale" in keywords:
        kwargs["scale"] = scale
    elif scale is not None:  # the kernel's own scale is 1/sqrt(D): fold ours into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in keywords:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def reference(q, k, v, cu, scale, causal: bool, window: int | None, dropout: float = 0.0):
    """Exact attention per example with sdpa: what the kernel computes, without a kernel."""
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))
        if groups > 1:
            ki, vi = ki.repeat_interleave(groups, dim=0), vi.repeat_interleave(groups, dim=0)
        mask = None
        if window:
            i = torch.arange(end - start, device=q.device)
            gap = i[:, None] - i[None, :]
            mask = (gap >= 0) & (gap < window) if causal else gap.abs() < window
        out = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, scale=scale
        )
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces) if pieces else q.new_zeros(0, q.shape[1], v.shape[-1])
