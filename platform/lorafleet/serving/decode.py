"""The batched decoding loop: one prefill and one forward per step for every row, each row with its own routing,
sampling parameters, seed, stop strings and length.

A manual loop (rather than ``model.generate``) because the rows of one batch differ in temperature, top-p, seed,
stop strings and ``max_new_tokens``. Prompts are left-padded; position ids come from the attention mask, so a
padded row computes what it would alone. A row ends at a stop string, at its length, or at any end-of-turn id
(``backbone.chat.end_of_turn_ids``: the eos ids, and the chat template's end of turn such as ``<|im_end|>``),
which is kept in ``token_ids`` but, being special, not in the text. The KV cache is a ``DynamicCache``; when rows finish, they are dropped
from the cache, the mask and the routing plan, so the remaining rows do not pay for them.

**One row's failure is its own.** A row whose logits hold a NaN or an infinity (a broken adapter), or whose
sampling fails, ends at that step with ``RowOutput.error`` set; the other rows of the batch decode on unchanged
(their logits do not depend on it: rows share weights, never activations).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafleet.adapters.bank import AdapterBank
from lorafleet.adapters.routing import Route, RoutingPlan
from lorafleet.backbone.chat import end_of_turn_ids
from lorafleet.serving.requests import FinishReason


@dataclass(frozen=True)
class RowSpec:
    """One sequence to decode: prompt tokens, routes through the bank (empty = base) and decoding parameters."""

    prompt_ids: tuple[int, ...]
    routes: tuple[Route, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    keep_logits: bool = False


@dataclass
class RowOutput:
    """What a row produced."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    logits: list[torch.Tensor] = field(default_factory=list)  # each [vocab]
    #: decoding steps whose logits held a NaN or an infinity (the row ends at the first one)
    nonfinite_steps: int = 0
    #: why the row ended early without an answer (non-finite logits, a sampling failure); None when it did not
    error: str | None = None


class RowSampler:
    """Greedy when temperature is 0, else temperature + nucleus (top-p) sampling from the row's own generator."""

    def __init__(self, spec: RowSpec) -> None:
        self.temperature, self.top_p = spec.temperature, spec.top_p
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sample(self, logits: torch.Tensor) -> int:
        """One token id from a row's logits ``[vocab]`` (float32, CPU)."""
        probs = torch.softmax(logits / self.temperature, dim=-1)  # [vocab]
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)  # [vocab]
            before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)  # keeps at least the top token
            pick = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[pick])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def pick_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int | str]:
    """Next token per row from ``logits [batch, vocab]``: one argmax for all, then sampled rows one by one. A row
    whose sampling fails gets the failure's message instead of a token (the other rows are unaffected)."""
    tokens: list[int | str] = list(logits.argmax(dim=-1).tolist())  # [batch]
    rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if rows:
        cpu = logits.detach().to("cpu", torch.float32)
        for i in rows:
            try:
                tokens[i] = samplers[i].sample(cpu[i])
            except RuntimeError as exc:  # e.g. torch's "invalid multinomial distribution"
                tokens[i] = f"sampling failed: {exc}"
    return tokens


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@dataclass
class _Live:
    """The rows still decoding (indices into the batch's rows) and their state in the model."""

    rows: list[int]
    mask: torch.Tensor  # [batch, seq] attention mask, prompt and generated tokens
    positions: torch.Tensor  # [batch, seq] at the prefill, then [batch, 1]
    plan: RoutingPlan
    cache: Any  # transformers' DynamicCache

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the rows at positions ``keep`` (finished rows leave the KV cache, mask and plan)."""
        index = torch.tensor(list(keep), dtype=torch.long)  # [n_keep] on CPU, for the plan
        on_device = index.to(self.mask.device)
        self.cache.batch_select_indices(on_device)
        self.mask, self.positions = self.mask[on_device], self.positions[on_device]
        self.plan = RoutingPlan(self.plan.slot_ids[index], self.plan.weights[index])
        self.rows = [self.rows[j] for j in keep]


class BatchDecoder:
    """Runs rows through the model together: ``BatchDecoder(...).run(rows) -> list[RowOutput]``."""

    def __init__(self, model: Any, bank: AdapterBank | None, tokenizer: Any, *, device: torch.device) -> None:
        """``bank`` None: a model without adapters (every row's routes must be empty)."""
        self.model, self.bank, self.tokenizer, self.device = model, bank, tokenizer, device
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.eos_ids = end_of_turn_ids(model, tokenizer)

    @torch.inference_mode()
    def run(self, rows: Sequence[RowSpec]) -> list[RowOutput]:
        """Decode every row to its end (stop, end of sequence or length)."""
        outputs = [RowOutput() for _ in rows]
        samplers = [RowSampler(r) for r in rows]
        live, logits = self._prefill(rows)
        while True:
            broken = (~torch.isfinite(logits).all(dim=-1)).tolist()  # [batch]
            picked = pick_tokens(logits, [samplers[i] for i in live.rows])
            keep, tokens = [], []
            for j, (i, token) in enumerate(zip(live.rows, picked, strict=True)):
                if broken[j]:
                    outputs[i].nonfinite_steps += 1
                    outputs[i].error = f"non-finite logits at step {len(outputs[i].token_ids) + 1}"
                elif isinstance(token, str):
                    outputs[i].error = token
                elif not self._advance(rows[i], outputs[i], token, logits[j]):
                    keep.append(j)
                    tokens.append(token)
            if not keep:
                break
            if len(keep) < len(live.rows):
                live.select(keep)
            logits = self._step(live, tokens)
        for spec, out in zip(rows, outputs, strict=True):
            self._finish_text(spec, out)
        return outputs

    def _prefill(self, rows: Sequence[RowSpec]) -> tuple[_Live, torch.Tensor]:
        """One forward over the left-padded prompts; the rows' state and their next-token logits."""
        from transformers import DynamicCache

        ids, mask = left_pad([r.prompt_ids for r in rows], pad_id=self.pad_id, device=self.device)
        live = _Live(
            rows=list(range(len(rows))),
            mask=mask,
            positions=(mask.cumsum(-1) - 1).clamp(min=0),  # [batch, seq]: padding does not shift positions
            plan=RoutingPlan.from_rows([list(r.routes) for r in rows]),
            cache=DynamicCache(config=self.model.config),
        )
        return live, self._forward(live, ids)

    def _step(self, live: _Live, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each live row its new token; next-token logits ``[batch, vocab]``."""
        step = torch.tensor(list(tokens), device=self.device).unsqueeze(1)  # [batch, 1]
        live.mask = torch.cat([live.mask, torch.ones_like(step)], dim=1)  # [batch, seq + 1]
        live.positions = live.positions[:, -1:] + 1  # [batch, 1]
        return self._forward(live, step)

    def _forward(self, live: _Live, ids: torch.Tensor) -> torch.Tensor:
        """Logits of each row's last position, ``[batch, vocab]`` float32."""
        routing = nullcontext() if self.bank is None else self.bank.routing(live.plan)
        with routing:
            out = self.model(
                input_ids=ids,
                attention_mask=live.mask,
                position_ids=live.positions,
                cache=live.cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill's lm_head runs on the last position only
            )
        return out.logits[:, -1, :].float()  # [batch, vocab]

    def _advance(self, spec: RowSpec, out: RowOutput, token: int, logits: torch.Tensor) -> bool:
        """Append a token to a row; True when the row has finished."""
        out.token_ids.append(token)
        if spec.keep_logits:
            out.logits.append(logits.detach().to("cpu").clone())
        if token in self.eos_ids:
            out.finish_reason = "stop"
            return True
        if spec.stop and find_stop(self._decode(out.token_ids), spec.stop) is not None:
            out.finish_reason = "stop"
            return True
        if len(out.token_ids) >= spec.max_new_tokens:
            out.finish_reason = "length"
            return True
        return False

    def _finish_text(self, spec: RowSpec, out: RowOutput) -> None:
        text = self._decode(out.token_ids)
        cut = find_stop(text, spec.stop) if spec.stop else None
        out.text = text if cut is None else text[:cut]

    def _decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


def left_pad(
    prompts: Sequence[Sequence[int]], *, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``[batch, seq]`` with every prompt right-aligned (padding on the left)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [batch, seq]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [batch, seq]
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


__all__ = ["BatchDecoder", "RowOutput", "RowSampler", "RowSpec", "find_stop", "left_pad", "pick_tokens"]
