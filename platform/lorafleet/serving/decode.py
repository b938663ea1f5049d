"""The decoding loop: rows join a running batch between steps and leave it when done (continuous batching).

``DecodeBatch`` holds the rows being decoded. ``join`` prefills newcomers in one forward of their own (their
prompts left-padded among themselves), picks their first token and merges their KV cache, attention mask and
routes into the running batch; ``step`` runs one forward for every running row; ``drop`` removes rows (a client
that went away). ``join_and_step`` does a join and a step in one forward where the model allows it
(``serving/fused.py``), so the running rows do not wait for a prefill forward of its own.

Every row keeps its own routing (adapter slots and weights), sampling parameters, seed, stop strings and
length, so a row decodes exactly what it would alone, whatever joins or leaves around it: position
ids come from each row's own attention mask, and the KV caches of rows of different lengths are aligned by
padding on the left (masked out). Columns that only padding uses are trimmed when rows leave.
``BatchDecoder.run`` is the static case: every row joins at once and the batch runs until all are done.

A manual loop (rather than ``model.generate``) because the rows differ in all of the above. A row ends at a
stop string, at its length, or at any end-of-turn id (``backbone.chat.end_of_turn_ids``: the eos ids, and the
chat template's end of turn such as ``<|im_end|>``), which is kept in ``token_ids`` but, being special, not in
the text.

**Cached prompt starts.** With a ``PrefixCache`` (the engine keeps one across its batches), a newcomer whose
prompt begins as an earlier one's, under the same salt and routing, starts with those tokens' keys and values
already in its KV cache and runs only the rest of its prompt, in a join of its own or fused into a step; after
its prefill its prompt's whole blocks are kept for later ones (``serving.prefix_cache``).

**Streaming.** Each update carries the text a row added since its last update (``RowUpdate.delta``): the
decoded text, less an incomplete UTF-8 character at its end and less any suffix that could still become a stop
string, so streamed text never shows a stop string and concatenates to the final ``text``.

**Log probabilities.** A row with ``logprobs`` set records each chosen token's log probability under the model
(the raw distribution, before temperature and top-p, as OpenAI and vLLM report it) and the ``logprobs`` most
likely alternatives.

**One row's failure is its own.** A row whose logits hold a NaN or an infinity (a broken adapter), or whose
sampling fails, ends at that step with ``RowOutput.error`` set; the other rows decode on unchanged (their logits
do not depend on it: rows share weights, never activations).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafleet.adapters.bank import AdapterBank
from lorafleet.adapters.plan import Route, SlotPlan
from lorafleet.adapters.prefix import MIN_SHARED_START, common_start, route_groups
from lorafleet.backbone.chat import end_of_turn_ids
from lorafleet.serving.fused import Joining, Running, fusable, fused_forward
from lorafleet.serving.prefix_cache import CachedBlock, PrefixCache
from lorafleet.serving.requests import MAX_LOGPROBS as MAX_TOP_LOGPROBS
from lorafleet.serving.requests import FinishReason, TokenLogprob


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
    #: None: no log probabilities; k >= 0: each chosen token's and the k most likely alternatives'
    logprobs: int | None = None
    #: compute ``RowUpdate.delta`` at every step (streaming)
    stream: bool = False
    #: rows reuse each other's cached prompt starts only under the same salt (the engine: the tenant)
    cache_salt: str = ""


@dataclass
class RowOutput:
    """What a row produced."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    logits: list[torch.Tensor] = field(default_factory=list)  # each [vocab]
    #: one per generated token when the row asked for log probabilities
    logprobs: list[TokenLogprob] = field(default_factory=list)
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


@dataclass(frozen=True)
class RowUpdate:
    """What one row did in a ``join`` or a ``step``: the token it took (None when it failed), the text it added
    (streaming rows only) and, when it ended, its whole output."""

    key: Hashable
    token_id: int | None
    delta: str = ""
    #: log probabilities of the token (rows that asked for them)
    logprob: TokenLogprob | None = None
    #: set when the row has ended (its text is final); the row has left the batch
    output: RowOutput | None = None

    @property
    def done(self) -> bool:
        return self.output is not None


@dataclass(eq=False)
class _Row:
    """A row in the batch: its spec, sampler and output so far, and the token to feed at the next step."""

    key: Hashable
    spec: RowSpec
    sampler: RowSampler
    out: RowOutput = field(default_factory=RowOutput)
    next_token: int = 0
    #: characters of the text already streamed
    streamed: int = 0
    #: the decoded text of the first ``n`` generated tokens, ``(n, text)`` (decoded once per step at most)
    decoded: tuple[int, str] = (0, "")


@dataclass
class _State:
    """The running rows' tensors, aligned with ``rows``: attention mask, each row's last position, the KV cache."""

    rows: list[_Row]
    mask: torch.Tensor  # [batch, seq] prompt and generated tokens (0 = left padding)
    positions: torch.Tensor  # [batch, seq] at the prefill, then [batch, 1]
    cache: Any  # transformers' DynamicCache
    #: the rows' routing plan, built once per membership (a plan caches its device tensors, so the steps
    #: between two joins or leaves reuse them)
    _plan: SlotPlan | None = None

    def plan(self) -> SlotPlan:
        if self._plan is None:
            self._plan = SlotPlan.from_rows([list(r.spec.routes) for r in self.rows])
        return self._plan

    def select(self, keep: Sequence[int]) -> None:
        """Keep the rows at positions ``keep``; columns that are padding in every remaining row are trimmed."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)  # [n_keep]
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.rows = [self.rows[j] for j in keep]
        self._plan = None
        used = self.mask.any(dim=0)  # [seq]
        first = int(used.int().argmax()) if bool(used.any()) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def merge(self, other: _State) -> None:
        """Append ``other``'s rows; the shorter side's cache and mask are padded on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(other.mask, width, dim=1)])
        self.positions = torch.cat([self.positions, other.positions])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width, dim=2), _pad_left(theirs.values, width, dim=2)]
            )
        self.rows += other.rows
        self._plan = None


def _cached_start(
    found: Sequence[CachedBlock], layer: int, width: int, part: str, template: CachedBlock
) -> torch.Tensor:
    """One row's cached start in ``layer`` (``part``: ``keys`` or ``values``), ``[kv, width, head_dim]``, padded
    on the left with zeros; a row without one (all padding, masked out) takes its shape from ``template``."""
    if found:
        start = torch.cat([getattr(b, part)[layer] for b in found], dim=1)  # [kv, cached, head_dim]
    else:
        like = getattr(template, part)[layer]
        start = like.new_zeros((like.shape[0], 0, like.shape[2]))
    return _pad_left(start, width, dim=1)


def _pad_left(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """The rows being decoded together; rows ``join`` between steps and leave when done (module docstring).

    Not thread-safe: one thread drives it (the model and the bank's routing plan are shared by every row)."""

    def __init__(
        self,
        model: Any,
        bank: AdapterBank | None,
        tokenizer: Any,
        *,
        device: torch.device,
        eos_ids: frozenset[int] | None = None,
        fuse_joins: bool = True,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        """``bank`` None: a model without adapters (every row's routes must be empty). ``fuse_joins`` False:
        ``join_and_step`` always prefills newcomers in a forward of their own (for comparison).
        ``prefix_cache``: newcomers whose prompts begin as earlier ones' reuse those starts' keys and values
        (``serving.prefix_cache``; the engine keeps one across its batches), and leave theirs for later ones."""
        self.model, self.bank, self.tokenizer, self.device = model, bank, tokenizer, device
        self.fuse_joins = fuse_joins
        self.prefix_cache = prefix_cache
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.eos_ids = eos_ids if eos_ids is not None else frozenset(end_of_turn_ids(model, tokenizer))
        self._state: _State | None = None

    def __len__(self) -> int:
        return 0 if self._state is None else len(self._state.rows)

    @property
    def keys(self) -> list[Hashable]:
        return [] if self._state is None else [r.key for r in self._state.rows]

    @torch.inference_mode()
    def join(self, rows: Sequence[tuple[Hashable, RowSpec]]) -> list[RowUpdate]:
        """Prefill newcomers ``(key, spec)`` and take their first token; those not done join the batch."""
        if not rows:
            return []
        state, ids, starts = self._newcomers(rows)
        # a newcomer with a cached start runs the rest of its prompt only; otherwise starts shared in the group
        # run once per route
        cached = any(blocks for _, blocks in starts)
        logits = self._forward(state, ids) if cached else self._prefill(state, ids)
        self._remember(state, starts)
        updates, keep = self._take(state.rows, logits)
        self._add_joined(state, keep)
        return updates

    def _prefill(self, state: _State, ids: torch.Tensor) -> torch.Tensor:
        """Newcomers' prefill: logits of each prompt's last position ``[n, vocab]``. Prompts that begin alike (a
        chat template's system prompt: 24 of about 36 tokens of a short SmolLM2 question) have that start run
        once per route, its keys and values copied to each row; each row's own tokens then run after it, padded
        on the left after the start (masked out). The same logits as a whole-prompt prefill, up to float
        rounding."""
        prompts = [r.spec.prompt_ids for r in state.rows]
        length = min(common_start(prompts), min(len(p) for p in prompts) - 1)  # each row keeps a token to run
        owners, representatives = route_groups([tuple(r.spec.routes) for r in state.rows])
        if length < MIN_SHARED_START or len(representatives) >= len(state.rows):
            return self._forward(state, ids)
        start_ids = torch.tensor([prompts[r][:length] for r in representatives], device=self.device)  # [g, L]
        start_mask = torch.ones_like(start_ids)
        start_positions = start_mask.cumsum(-1) - 1  # [g, L]
        plan = (
            None
            if self.bank is None
            else SlotPlan.from_rows([state.rows[r].spec.routes for r in representatives])
        )
        with nullcontext() if self.bank is None else self.bank.use(plan):
            self.model(
                input_ids=start_ids,
                attention_mask=start_mask,
                position_ids=start_positions,
                cache=state.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        state.cache.batch_select_indices(torch.tensor(owners, device=self.device))  # each row's group's start
        rest_ids, rest_mask = left_pad([p[length:] for p in prompts], pad_id=self.pad_id, device=self.device)
        state.mask = torch.cat([rest_mask.new_ones((len(prompts), length)), rest_mask], dim=1)  # [n, L + T]
        state.positions = (state.mask.cumsum(-1) - 1).clamp(min=0)[:, length:]  # [n, T]
        return self._forward(state, rest_ids)

    @property
    def fuses_joins(self) -> bool:
        """Whether ``join_and_step`` runs newcomers' prefill and the running rows' step as one forward
        (``serving/fused.py``: Llama-architecture models, a bank without merged slots)."""
        return self.fuse_joins and fusable(self.model, self.bank)

    @torch.inference_mode()
    def join_and_step(self, rows: Sequence[tuple[Hashable, RowSpec]]) -> list[RowUpdate]:
        """Newcomers join and every running row takes a step. Into a running batch of a model that allows it, one
        forward does both (``fuses_joins``): the newcomers get their first token and the running rows their
        next. Otherwise a prefill forward of the newcomers, then a step of every row (newcomers included)."""
        state = self._state
        if not rows:
            return self.step()
        if state is None or not self.fuses_joins:
            updates = self.join(rows)
            return updates + self.step() if len(self) else updates
        joined, ids, starts = self._newcomers(rows)
        fed = torch.tensor([r.next_token for r in state.rows], device=self.device)  # [R]
        state.mask = torch.cat([state.mask, torch.ones_like(fed).unsqueeze(1)], dim=1)  # [R, seq + 1]
        state.positions = state.positions + 1  # [R, 1]
        logits = fused_forward(
            self.model,
            self.bank,
            Running(fed, state.positions[:, 0], state.mask, state.cache, self._plan_of(state)),
            Joining(ids, joined.mask, joined.positions, joined.cache, self._plan_of(joined)),
        )
        self._remember(joined, starts)
        running = len(state.rows)
        updates, keep = self._take(state.rows, logits[:running])
        joined_updates, joined_keep = self._take(joined.rows, logits[running:])
        self._keep(keep)
        self._add_joined(joined, joined_keep)
        return updates + joined_updates

    def _newcomers(
        self, rows: Sequence[tuple[Hashable, RowSpec]]
    ) -> tuple[_State, torch.Tensor, list[tuple[str | None, int]]]:
        """Newcomers' state before their prefill, the token ids it still has to run ``[n, seq]``, and per row its
        routing signature for the prefix cache (None: not cached) and how many cached blocks it starts with.

        Without cached starts: the prompts left-padded among themselves and an empty KV cache. With them: the
        cache already holds each row's cached start (left-padded to the longest), the mask covers start and
        rest (``[n, start + seq]``, a row's padding before each of its parts) and only the rest runs."""
        from transformers import DynamicCache

        newcomers = [_Row(key, spec, RowSampler(spec)) for key, spec in rows]
        signatures = [self._signature(r.spec.routes) for r in newcomers]
        hits: list[list[CachedBlock]] = [
            []
            if sig is None or self.prefix_cache is None
            else self.prefix_cache.lookup(r.spec.cache_salt, sig, r.spec.prompt_ids)
            for r, sig in zip(newcomers, signatures, strict=True)
        ]
        starts = [(sig, len(found)) for sig, found in zip(signatures, hits, strict=True)]
        cache = DynamicCache(config=self.model.config)
        block = 0 if self.prefix_cache is None else self.prefix_cache.block_tokens
        past = max(len(found) for found in hits) * block
        rest = [r.spec.prompt_ids[len(found) * block :] for r, found in zip(newcomers, hits, strict=True)]
        ids, mask = left_pad(rest, pad_id=self.pad_id, device=self.device)
        if past:
            past_mask = torch.zeros((len(newcomers), past), dtype=mask.dtype, device=self.device)
            for i, found in enumerate(hits):
                past_mask[i, past - len(found) * block :] = 1
            mask = torch.cat([past_mask, mask], dim=1)  # [n, past + seq]
            template = next(found for found in hits if found)[0]
            for layer in range(len(template.keys)):
                keys, values = (
                    torch.stack([_cached_start(found, layer, past, part, template) for found in hits])
                    for part in ("keys", "values")
                )  # [n, kv, past, head_dim]
                cache.update(keys, values, layer)
        state = _State(
            rows=newcomers,
            mask=mask,
            positions=(mask.cumsum(-1) - 1).clamp(min=0)[:, past:],  # [n, seq]: padding does not shift them
            cache=cache,
        )
        return state, ids, starts

    def _signature(self, routes: Sequence[Route]) -> str | None:
        """What a row's keys and values depend on besides its tokens: per route the slot's adapter (the weights
        file's sha256, its scaling) and the route's weight; "" for the base model. None (not cached): no prefix
        cache, an empty or trainable slot (no content hash), or slots merged into the base weights."""
        if self.prefix_cache is None:
            return None
        if self.bank is None:
            return "" if not routes else None
        if self.bank.merged_slots:
            return None
        parts = []
        for slot, weight in routes:
            info = self.bank.slot_info(slot)
            if info is None or info.config.content_hash is None:
                return None
            parts.append(f"{info.config.content_hash}:{info.config.scaling!r}:{weight!r}")
        return ";".join(parts)

    def _remember(self, state: _State, starts: Sequence[tuple[str | None, int]]) -> None:
        """After newcomers' prefill: keep each prompt's whole blocks that were not cached yet (the prompt's keys
        and values are the positions its mask marks, in order; only the new blocks' are copied out)."""
        cache = self.prefix_cache
        if cache is None:
            return
        for i, (row, (signature, cached)) in enumerate(zip(state.rows, starts, strict=True)):
            prompt = row.spec.prompt_ids
            if signature is None or len(prompt) // cache.block_tokens <= cached:
                continue
            real = (
                state.mask[i].nonzero().squeeze(1)[cache.new_blocks(len(prompt), cached)]
            )  # the new blocks'
            keys = [layer.keys[i].index_select(1, real) for layer in state.cache.layers]
            values = [layer.values[i].index_select(1, real) for layer in state.cache.layers]
            cache.store(row.spec.cache_salt, signature, prompt, keys, values, cached_blocks=cached)

    def _plan_of(self, state: _State) -> SlotPlan | None:
        return None if self.bank is None else state.plan()

    def _add_joined(self, joined: _State, keep: Sequence[int]) -> None:
        """Newcomers that go on (positions ``keep``) after their prefill become running rows."""
        if not keep:
            return
        if len(keep) < len(joined.rows):
            joined.select(keep)
        joined.positions = joined.positions[:, -1:]  # [n, 1]: each row's last position
        if self._state is None:
            self._state = joined
        else:
            self._state.merge(joined)

    @torch.inference_mode()
    def step(self) -> list[RowUpdate]:
        """Feed every running row its last token; each row's update (finished rows leave the batch)."""
        state = self._state
        if state is None:
            return []
        fed = torch.tensor([r.next_token for r in state.rows], device=self.device).unsqueeze(1)  # [batch, 1]
        state.mask = torch.cat([state.mask, torch.ones_like(fed)], dim=1)  # [batch, seq + 1]
        state.positions = state.positions + 1  # [batch, 1]
        logits = self._forward(state, fed)
        updates, keep = self._take(state.rows, logits)
        self._keep(keep)
        return updates

    def drop(self, keys: Sequence[Hashable]) -> list[RowOutput]:
        """Remove running rows (e.g. their client went away); their outputs so far."""
        state, gone = self._state, set(keys)
        if state is None or not gone:
            return []
        dropped = [r.out for r in state.rows if r.key in gone]
        self._keep([j for j, r in enumerate(state.rows) if r.key not in gone])
        return dropped

    def _keep(self, keep: Sequence[int]) -> None:
        state = self._state
        assert state is not None
        if not keep:
            self._state = None
        elif len(keep) < len(state.rows):
            state.select(keep)

    def _forward(self, state: _State, ids: torch.Tensor) -> torch.Tensor:
        """Logits of each row's last position, ``[batch, vocab]`` float32."""
        routing = nullcontext() if self.bank is None else self.bank.use(state.plan())
        with routing:
            out = self.model(
                input_ids=ids,
                attention_mask=state.mask,
                position_ids=state.positions,
                cache=state.cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill's lm_head runs on the last position only
            )
        return out.logits[:, -1, :].float()  # [batch, vocab]

    def _take(self, rows: Sequence[_Row], logits: torch.Tensor) -> tuple[list[RowUpdate], list[int]]:
        """Pick each row's next token from ``logits [batch, vocab]``; the updates and the rows that go on."""
        broken = (~torch.isfinite(logits).all(dim=-1)).tolist()  # [batch]
        picked = pick_tokens(logits, [r.sampler for r in rows])
        wanted = [j for j, r in enumerate(rows) if r.spec.logprobs is not None and not broken[j]]
        logprobs = self._logprobs(rows, logits, picked, wanted)
        updates, keep = [], []
        for j, (row, token) in enumerate(zip(rows, picked, strict=True)):
            if broken[j]:
                row.out.nonfinite_steps += 1
                row.out.error = f"non-finite logits at step {len(row.out.token_ids) + 1}"
                updates.append(RowUpdate(row.key, None, output=row.out))
                continue
            if isinstance(token, str):
                row.out.error = token
                updates.append(RowUpdate(row.key, None, output=row.out))
                continue
            logprob = logprobs.get(j)
            if logprob is not None:
                row.out.logprobs.append(logprob)
            done = self._advance(row, token, logits[j])
            delta = self._delta(row, done) if row.spec.stream else ""
            updates.append(RowUpdate(row.key, token, delta, logprob, row.out if done else None))
            if not done:
                row.next_token = token
                keep.append(j)
        return updates, keep

    def _logprobs(
        self, rows: Sequence[_Row], logits: torch.Tensor, picked: Sequence[int | str], wanted: Sequence[int]
    ) -> dict[int, TokenLogprob]:
        """Log probabilities of the chosen token and the top alternatives of the rows at batch indices
        ``wanted`` (those that asked), by batch index; a row whose sampling failed has none."""
        wanted = [j for j in wanted if not isinstance(picked[j], str)]
        if not wanted:
            return {}
        logp = torch.log_softmax(logits[wanted], dim=-1).to("cpu")  # [n, vocab]
        k = min(max(int(rows[j].spec.logprobs or 0) for j in wanted), MAX_TOP_LOGPROBS)
        top_values, top_ids = logp.topk(k, dim=-1)  # [n, k]
        out: dict[int, TokenLogprob] = {}
        for i, j in enumerate(wanted):
            token, n = int(picked[j]), min(int(rows[j].spec.logprobs or 0), MAX_TOP_LOGPROBS)
            top = tuple(
                (t, self._piece(t), v)
                for t, v in zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist(), strict=True)
            )
            out[j] = TokenLogprob(token, self._piece(token), float(logp[i, token]), top)
        return out

    def _piece(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def _advance(self, row: _Row, token: int, logits: torch.Tensor) -> bool:
        """Append a token to a row; True when the row has finished (its text is then final)."""
        spec, out = row.spec, row.out
        out.token_ids.append(token)
        if spec.keep_logits:
            out.logits.append(logits.detach().to("cpu").clone())
        done = True
        if token in self.eos_ids:
            out.finish_reason = "stop"
        elif spec.stop and find_stop(self._text(row), spec.stop) is not None:
            out.finish_reason = "stop"
        elif len(out.token_ids) >= spec.max_new_tokens:
            out.finish_reason = "length"
        else:
            done = False
        if done:
            text = self._text(row)
            cut = find_stop(text, spec.stop) if spec.stop else None
            out.text = text if cut is None else text[:cut]
        return done

    def _delta(self, row: _Row, done: bool) -> str:
        """The text a streaming row adds now: all of it when done, else what can no longer change."""
        if done:
            text = row.out.text
        else:
            text = self._text(row).rstrip("\ufffd")  # an incomplete UTF-8 character
            text = text[: len(text) - _stop_prefix(text, row.spec.stop)]
        delta = text[row.streamed :] if len(text) > row.streamed else ""
        row.streamed = max(row.streamed, len(text))
        return delta

    def _text(self, row: _Row) -> str:
        """The row's generated tokens decoded (special tokens left out), once per new token: the stop check,
        the final text and the streamed delta of one step share it."""
        ids = row.out.token_ids
        if row.decoded[0] != len(ids):
            row.decoded = (len(ids), str(self.tokenizer.decode(list(ids), skip_special_tokens=True)))
        return row.decoded[1]


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of a stop string (held back while
    streaming: the next tokens may complete the stop string, which is never shown)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def run_to_end(
    batch: DecodeBatch,
    rows: Sequence[RowSpec],
    *,
    on_update: Callable[[RowUpdate], object] | None = None,
) -> list[RowOutput]:
    """Static batching: every row joins ``batch`` at once and it steps until all are done; outputs in order."""
    outputs: dict[Hashable, RowOutput] = {}
    updates = batch.join(list(enumerate(rows))) if rows else []
    while True:
        for update in updates:
            if on_update is not None:
                on_update(update)
            if update.output is not None:
                outputs[update.key] = update.output
        if not len(batch):
            return [outputs[i] for i in range(len(rows))]
        updates = batch.step()


class BatchDecoder:
    """Static batching over a model and a bank: ``BatchDecoder(...).run(rows) -> list[RowOutput]`` (QA, the
    general-prompt anchors, benchmarks)."""

    def __init__(self, model: Any, bank: AdapterBank | None, tokenizer: Any, *, device: torch.device) -> None:
        """``bank`` None: a model without adapters (every row's routes must be empty)."""
        self._batch = DecodeBatch(model, bank, tokenizer, device=device)
        self.eos_ids = self._batch.eos_ids

    def run(self, rows: Sequence[RowSpec]) -> list[RowOutput]:
        """Decode every row to its end (stop, end of sequence or length)."""
        return run_to_end(self._batch, rows)


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


__all__ = [
    "BatchDecoder",
    "DecodeBatch",
    "RowOutput",
    "RowSampler",
    "RowSpec",
    "RowUpdate",
    "find_stop",
    "left_pad",
    "pick_tokens",
    "run_to_end",
]
