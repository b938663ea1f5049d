"""One forward for a decoding step and a join: the running rows' next tokens and the newcomers' prompts together.

Continuous batching lets newcomers join a running batch between steps. Done naively, a join is a prefill
forward of its own, and the running rows wait for it. Its price is not its tokens but the forward itself: a
forward reads every frozen weight once (a 4-bit backbone dequantises each one, and on a CPU that costs about as
much as a decode step of 16 rows), so one join per step nearly halves the running rows' pace. Here both go
through *one* forward, as vLLM's and Sarathi's mixed prefill-decode batches do:

- **Linear layers** (the weights, where the time goes) see one flattened input ``[tokens, 1, d]``: the ``R``
  running rows' next tokens, then the ``k`` newcomers' left-padded prompts (``k x L`` tokens). Each part keeps
  its own adapter routing through a ``PartsPlan``, so the base weights are read once for both.
- **Attention** is computed per part, with the same masks the separate forwards would use: each running row's
  new token against its KV cache (padding masked out), and the newcomers' prompts causally among themselves.
  The running rows' caches grow by one column; the newcomers' caches are built for ``DecodeBatch`` to merge.

Rows therefore decode what they would in separate forwards (up to float rounding: the test compares logits and
greedy tokens). The running rows are never padded to the prompts' length, which a plain batched forward of both
would need (that costs ``R x L`` tokens of work).

The layer loop follows the Llama architecture (SmolLM2 and the built-in tiny backbone): pre-norm decoder
layers with rotary embeddings, no sliding window. ``fusable`` says whether a model is one; for other models, or
a bank with merged slots, ``DecodeBatch`` joins with a forward of its own as before.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorafleet.adapters.bank import AdapterBank
from lorafleet.adapters.plan import PartsPlan, PlanPart, SlotPlan

#: model types whose decoder layers ``fused_forward`` knows (attention and MLP as transformers' Llama)
FUSABLE_MODEL_TYPES = frozenset({"llama"})


def fusable(model: Any, bank: AdapterBank | None) -> bool:
    """Whether ``fused_forward`` can run ``model`` (a Llama-architecture causal LM; a bank without merged slots)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (
        getattr(config, "model_type", None) in FUSABLE_MODEL_TYPES
        and getattr(config, "sliding_window", None) is None
        and inner is not None
        and all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
        and hasattr(model, "lm_head")
        and (bank is None or not bank.merged_slots)
    )


@dataclass
class Running:
    """The running rows of a step: the token each is fed, its position, its attention mask over the cache with
    that token appended (``[R, seq + 1]``, 0 = padding), its KV cache (``DynamicCache``, grown in place) and
    its routing plan (None: base only)."""

    tokens: torch.Tensor  # [R] int64
    positions: torch.Tensor  # [R] int64
    mask: torch.Tensor  # [R, seq + 1]
    cache: Any
    plan: SlotPlan | None


@dataclass
class Joining:
    """The newcomers: the prompt tokens they still run, left-padded ``[k, L]``, their attention mask over what
    their KV cache already holds and those tokens (``[k, P + L]``: ``P`` > 0 when they start with cached prompt
    starts, ``serving.prefix_cache``), the tokens' positions, the KV cache that the forward fills, and their
    routing plan (None: base only)."""

    ids: torch.Tensor  # [k, L] int64
    mask: torch.Tensor  # [k, P + L]
    positions: torch.Tensor  # [k, L]
    cache: Any
    plan: SlotPlan | None


@torch.inference_mode()
def fused_forward(model: Any, bank: AdapterBank | None, running: Running, joining: Joining) -> torch.Tensor:
    """Logits ``[R + k, vocab]`` (float32): each running row's next token, then each newcomer's first token."""
    inner = model.model
    n_run, (n_new, width) = running.tokens.numel(), joining.ids.shape
    ids = torch.cat([running.tokens, joining.ids.reshape(-1)])  # [N]
    positions = torch.cat([running.positions, joining.positions.reshape(-1)]).unsqueeze(1)  # [N, 1]
    hidden = inner.embed_tokens(ids).unsqueeze(1)  # [N, 1, d]
    cos, sin = inner.rotary_emb(hidden, position_ids=positions)  # each [N, 1, head_dim]
    run_mask = running.mask.bool()[:, None, None, :]  # [R, 1, 1, seq + 1]
    past = joining.mask.shape[1] - width  # cached start columns the newcomers' cache holds already
    new_mask = _prompt_mask(joining.mask[:, past:])  # [k, 1, L, L]
    if past:  # each prompt token also attends to its row's cached start
        cached = joining.mask[:, :past].bool()[:, None, None, :].expand(n_new, 1, width, past)  # [k, 1, L, P]
        new_mask = torch.cat([cached, new_mask], dim=-1)  # [k, 1, L, P + L]
    parts = PartsPlan(
        (
            PlanPart(0, n_run, n_run, 1, running.plan, reuse=True),
            PlanPart(n_run, n_run + n_new * width, n_new, width, joining.plan),
        )
    )
    routing = nullcontext() if bank is None else bank.use(parts)
    with routing:
        for index, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            query, key, value = (
                _heads(proj(normed), attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            query, key = _rotary(query, key, cos, sin)  # [N, heads, 1, head_dim]
            keys, values = running.cache.update(key[:n_run], value[:n_run], index)  # [R, kv, seq + 1, hd]
            run_out = _attend(query[:n_run], keys, values, run_mask, attn.scaling)  # [R, heads, 1, hd]
            new_q, new_k, new_v = (_prompts(t[n_run:], n_new, width) for t in (query, key, value))
            new_keys, new_values = joining.cache.update(new_k, new_v, index)  # [k, kv, P + L, hd]
            new_out = _attend(new_q, new_keys, new_values, new_mask, attn.scaling)  # [k, heads, L, hd]
            mixed = torch.cat(
                [run_out.reshape(n_run, -1), new_out.transpose(1, 2).reshape(n_new * width, -1)]
            )
            hidden = hidden + attn.o_proj(mixed.unsqueeze(1))  # [N, 1, d]
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = torch.cat(
            [
                torch.arange(n_run, device=ids.device),
                n_run + torch.arange(n_new, device=ids.device) * width + (width - 1),
            ]
        )  # each row's last token: the running rows', then each prompt's (right-aligned)
        logits = model.lm_head(inner.norm(hidden[last]))  # [R + k, 1, vocab]
    return logits[:, -1, :].float()


def _heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[N, 1, heads * head_dim]`` -> ``[N, heads, 1, head_dim]``."""
    return states.view(states.shape[0], -1, head_dim).unsqueeze(2)


def _rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding, as transformers' Llama applies it (``cos``/``sin`` ``[N, 1, head_dim]``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, 1, head_dim]
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _prompts(flat: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """The newcomers' part ``[k * L, heads, 1, head_dim]`` -> ``[k, heads, L, head_dim]``."""
    return flat.view(rows, width, flat.shape[1], flat.shape[3]).transpose(1, 2)


def _prompt_mask(mask: torch.Tensor) -> torch.Tensor:
    """Causal attention among each prompt's real tokens, ``[k, 1, L, L]`` (True = attend). A padding position
    attends to itself only: its output is never used, and a query with no key at all would make NaNs that
    reach the real tokens through its keys and values in the next layers."""
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()  # [L, L]
    keys = mask.bool()[:, None, None, :]  # [k, 1, 1, L]
    itself = torch.eye(width, dtype=torch.bool, device=mask.device)  # [L, L]
    return (causal & keys) | itself


def _attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention with grouped key/value heads (``[b, heads, q, hd]`` against ``[b, kv, s,
    hd]``); ``mask`` is True where a query attends."""
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:  # as transformers' repeat_kv: each key/value head serves ``groups`` query heads
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


__all__ = ["FUSABLE_MODEL_TYPES", "Joining", "Running", "fusable", "fused_forward"]
