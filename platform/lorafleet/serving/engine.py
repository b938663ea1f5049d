"""``GenerationEngine``: one batch of requests from many users through one backbone and one adapter bank.

Per batch: render each request (``lorafleet.backbone.chat``, as training renders examples: messages through the
chat template, a plain prompt as one user turn, a raw prompt as is) and tokenise it; resolve each request's user
bank once (a snapshot: every step of a request decodes with the versions
resolved here, so a concurrent rollback serves a request wholly by the old or wholly by the new version, and a
batch that starts after the rollback returned sees the new alias; banks are not cached across batches); pool
base-model embeddings in one forward for the gates that need them (of the user's own text, the prompt or the
last user turn, as routing keys are made: ``routing.embeddings.embedding_ids``); turn each gate decision into
the row's ``(slot, weight)`` routes through the cache (each row's slots pinned until it ends); decode the rows
(a user without adapters, or a gate deciding "base only", gives an empty route: the base model); report which
versions, with which weights, served each request.

Failures are per request: an unknown user, a prompt too long for the model, a gate error or an adapter version
that cannot be loaded (a corrupted blob: ``BlobIntegrityError``) fail only the requests they concern; the rest
of the batch is served. So does a row whose logits turn NaN or infinite while decoding (a broken adapter) or
whose sampling fails: that request gets a ``GenerationError`` naming the versions, the others decode on, and
``on_nonfinite`` (the service queues a QA recheck of the user's experts) is told which versions served it.

Two ways to drive it. ``generate_each(requests)`` is a static batch: admit every request, decode them together
to the end. ``admit`` / ``decode_batch`` / ``finish`` are the pieces ``serving.continuous.ContinuousBatcher``
drives: admitted rows join a running ``DecodeBatch`` between its steps and are finished one by one. Every
forward through the model holds ``model_lock`` (the bank's routing plan is shared by its layers); admission's
cache loads run outside it, so they overlap decoding.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from lorafleet.adapters.bank import AdapterBank
from lorafleet.backbone.chat import chat_stop_strings, encode_messages, end_of_turn_ids, last_user_content
from lorafleet.errors import (
    GenerationError,
    InvalidStateError,
    LorafleetError,
    ModelNotFoundError,
    ValidationError,
)
from lorafleet.routing.embeddings import DEFAULT_MAX_PROMPT_TOKENS, embedding_ids, pooled_embeddings
from lorafleet.routing.experts import Expert, ExpertSet, resolve_model_experts, resolve_user_experts
from lorafleet.routing.gates import Gate, LearnedGateLoader, build_gate
from lorafleet.serving.cache import AdapterCache, Lease
from lorafleet.serving.decode import DecodeBatch, RowOutput, RowSpec, left_pad, run_to_end
from lorafleet.serving.metrics import BatchRecord, ServingMetrics
from lorafleet.serving.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from lorafleet.serving.requests import (
    GenerationRequest,
    GenerationResult,
    ModelRef,
    Outcome,
    ServedBy,
    results_or_first_error,
)

if TYPE_CHECKING:
    from lorafleet.backbone import Backbone
    from lorafleet.routing.spec import GateDecision, GateSpec
    from lorafleet.store.sql.database import Database

#: ``resolve_bank(tenant_id, user_external_id) -> ExpertSet`` (e.g. ``routing.resolve_user_experts`` over a database)
ResolveBank = Callable[[int, str], "ExpertSet"]
#: a one-adapter bank for a ``model`` that names an adapter (``ModelRef`` of kind ``adapter``)
ResolveModel = Callable[[int, ModelRef], "ExpertSet"]
#: ``gate_factory(user_bank) -> Gate``
GateFactory = Callable[["ExpertSet"], "Gate"]
#: ``embed(backbone, bank, input_ids [batch, seq], attention_mask [batch, seq]) -> [batch, hidden]``
Embed = Callable[["Backbone", AdapterBank, torch.Tensor, torch.Tensor], torch.Tensor]
#: told of a request whose logits were not finite: the user's experts and the members that served the row
OnNonFinite = Callable[["ExpertSet", Sequence["Expert"]], object]
#: gates kept by the default gate factory
GATE_CACHE_SIZE = 256
logger = logging.getLogger(__name__)


@dataclass
class _Row:
    """A request on its way through the batch."""

    index: int
    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    #: stop strings the rendering adds (the plain format's next user turn)
    stops: tuple[str, ...] = ()
    bank: ExpertSet | None = None
    routes: tuple[tuple[Expert, float], ...] = ()
    slot_routes: tuple[tuple[int, float], ...] = field(default=())


@dataclass(eq=False)
class Admitted:
    """A request ready to decode: its row, its ``RowSpec`` and the lease pinning its adapter slots (held until
    ``GenerationEngine.finish`` or ``release``: pins are per row, so a long request never holds another's)."""

    row: _Row
    spec: RowSpec
    lease: Lease

    @property
    def request(self) -> GenerationRequest:
        return self.row.request

    def release(self) -> None:
        """Unpin the row's slots (idempotent)."""
        self.lease.release()


class GenerationEngine:
    """Batched generation across users: ``generate(requests) -> results`` (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        bank: AdapterBank,
        cache: AdapterCache,
        *,
        resolve_bank: ResolveBank,
        gate_factory: GateFactory | None = None,
        embed: Embed | None = None,
        embed_max_tokens: int | None = None,
        metrics: ServingMetrics | None = None,
        on_nonfinite: OnNonFinite | None = None,
        resolve_model: ResolveModel | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        """``embed_max_tokens``: gates see the last tokens of a long prompt only, as routing keys are made
        (default: ``routing.embeddings.DEFAULT_MAX_PROMPT_TOKENS``). ``on_nonfinite``: called (after the batch,
        outside the model lock; its errors are logged, never raised) for each request whose adapters produced
        non-finite logits. ``resolve_model``: the bank of one adapter a request's ``model`` names
        (``database_model_resolver``); without it such requests fail with ``ModelNotFoundError``.
        ``prefix_cache_bytes``: the budget of the prompt starts kept across batches (``serving.prefix_cache``,
        salted per tenant); 0 turns prefix caching off."""
        if cache.bank is not bank:
            raise ValidationError("the adapter cache must manage slots of the engine's bank")
        self.backbone, self.bank, self.cache = backbone, bank, cache
        self._resolve_bank = resolve_bank
        self._gate_factory = gate_factory or cached_gate_factory()
        self._embed = embed or _default_embed
        self._embed_max_tokens = embed_max_tokens or DEFAULT_MAX_PROMPT_TOKENS
        self.metrics = metrics or ServingMetrics()
        self._on_nonfinite = on_nonfinite
        self._resolve_model = resolve_model
        self._eos_ids = frozenset(end_of_turn_ids(backbone.model, backbone.tokenizer))
        self._model_lock = threading.Lock()  # one batch at a time through the model (one routing plan)
        #: prompt starts' keys and values kept across batches (used under the model lock, as the model is)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        config = backbone.model.config
        self._max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self._hidden_size = int(getattr(config, "hidden_size", 1))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Serve a batch; raises the first request's error if any request failed."""
        return results_or_first_error(self.generate_each(requests))

    def generate_each(self, requests: Sequence[GenerationRequest]) -> list[Outcome]:
        """Serve a batch; each request gets its result or its own error (the others are still served)."""
        started = time.perf_counter()
        outcomes: list[Outcome | Admitted] = list(self.admit(requests))
        ready = [a for a in outcomes if isinstance(a, Admitted)]
        try:
            if ready:
                with self.model_lock:
                    decoded = run_to_end(self.decode_batch(), [a.spec for a in ready])
                finished = iter([self.finish(a, out) for a, out in zip(ready, decoded, strict=True)])
                outcomes = [next(finished) if isinstance(o, Admitted) else o for o in outcomes]
        finally:
            for admitted in ready:  # decoding raised: the rows' slots are released all the same
                admitted.release()
        done = cast(list[Outcome], outcomes)
        self._record(done, [a.row for a in ready], time.perf_counter() - started)
        return done

    # --- continuous batching: admit, decode in a DecodeBatch, finish --------------------------------------
    def admit(
        self, requests: Sequence[GenerationRequest], *, stream: Sequence[bool] = ()
    ) -> list[Admitted | LorafleetError]:
        """Make requests ready to decode: render and tokenise, resolve the bank, route through the gate, and pin
        each row's adapter slots (loading what is missing). Each request gets its ``Admitted`` row (hand it back
        to ``finish``, or ``Admitted.release`` it) or its own error. ``stream[i]``: request ``i``'s row reports
        text deltas (``RowUpdate.delta``)."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        rows = self._route(self._prepare(requests, outcomes), outcomes)
        admitted: list[Admitted | LorafleetError | None] = list(outcomes)  # type: ignore[arg-type]
        # one acquisition for the group (one load per version, its error shared by the rows that need it),
        # then each row shares out its own pins
        with self.cache.acquire([m for row in rows for m, _ in row.routes], strict=False) as group:
            for row in rows:
                error = next(
                    (group.errors[m.sha256] for m, _ in row.routes if m.sha256 in group.errors), None
                )
                if error is not None:
                    admitted[row.index] = error
                    continue
                lease = group.share(m.sha256 for m, _ in row.routes)
                row.slot_routes = tuple((lease.slots[m.sha256], w) for m, w in row.routes)
                streams = bool(stream[row.index]) if row.index < len(stream) else False
                admitted[row.index] = Admitted(row, self._spec(row, stream=streams), lease)
        return [
            a if a is not None else InvalidStateError("request was neither admitted nor failed")
            for a in admitted
        ]

    def decode_batch(self, *, fuse_joins: bool = True) -> DecodeBatch:
        """An empty ``DecodeBatch`` over this engine's model and bank (drive it under ``model_lock``)."""
        return DecodeBatch(
            self.backbone.model,
            self.bank,
            self.backbone.tokenizer,
            device=self.backbone.device,
            eos_ids=self._eos_ids,
            fuse_joins=fuse_joins,
            prefix_cache=self.prefix_cache,
        )

    @property
    def model_lock(self) -> threading.Lock:
        """Held for every forward through the model (the bank's routing plan is shared by its layers)."""
        return self._model_lock

    def finish(self, admitted: Admitted, out: RowOutput) -> Outcome:
        """A decoded row's result, or its ``GenerationError`` (non-finite logits are reported to
        ``on_nonfinite``); its slots are released."""
        admitted.release()
        row = admitted.row
        return self._result(row, out) if out.error is None else self._failed(row, out)

    # --- the steps of a batch --------------------------------------------------------------------------------
    def _prepare(self, requests: Sequence[GenerationRequest], outcomes: list[Outcome | None]) -> list[_Row]:
        """Tokenise and check each prompt, and resolve what serves it once per batch: the user's experts (model
        ``lorafleet``), nothing (``base``, or no user), or one adapter's version (``ModelRef`` of an adapter)."""
        banks: dict[tuple[int, str, str], ExpertSet | LorafleetError] = {}
        rows = []
        for index, request in enumerate(requests):
            try:
                prompt_ids, stops = self._tokenize(request)
                ref = request.model_ref
                bank: ExpertSet | LorafleetError | None = None
                if request.adapter_scale == 0.0:  # the dial at 0: the base model, nothing to route or load
                    pass
                elif ref.kind == "bank" and request.user is not None:
                    key = (request.tenant_id, "bank", request.user)
                    if key not in banks:
                        banks[key] = self._resolve(self._resolve_bank, request.tenant_id, request.user)
                    bank = banks[key]
                elif ref.kind == "adapter":
                    key = (request.tenant_id, "model", request.model)
                    if key not in banks:
                        banks[key] = self._resolve(self._pinned, request.tenant_id, ref)
                    bank = banks[key]
                if isinstance(bank, LorafleetError):
                    raise bank
            except LorafleetError as exc:
                outcomes[index] = exc
                continue
            rows.append(_Row(index, request, prompt_ids, stops=stops, bank=bank))
        return rows

    @staticmethod
    def _resolve(
        resolve: Callable[[int, Any], ExpertSet], tenant_id: int, what: Any
    ) -> ExpertSet | LorafleetError:
        try:
            return resolve(tenant_id, what)
        except LorafleetError as exc:
            return exc

    def _pinned(self, tenant_id: int, ref: ModelRef) -> ExpertSet:
        if self._resolve_model is None:
            raise ModelNotFoundError(f"this engine serves no adapter models (asked for {ref})")
        return self._resolve_model(tenant_id, ref)

    def _tokenize(self, request: GenerationRequest) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The rendered prompt's ids (checked against the context length) and the stop strings it adds."""
        ids, stops = _render(self.backbone.tokenizer, request)
        if not ids:
            raise ValidationError("the prompt encodes to no tokens")
        if self._max_positions is not None and len(ids) + request.max_new_tokens > self._max_positions:
            raise ValidationError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceed the model's "
                f"context of {self._max_positions} tokens"
            )
        return ids, stops

    def _route(self, rows: list[_Row], outcomes: list[Outcome | None]) -> list[_Row]:
        """Each row's ``(member, weight)`` routes from its user's gate; rows of a failing gate get its error."""
        groups: dict[int, list[_Row]] = {}  # rows by user bank (one snapshot object per user and batch)
        for row in rows:
            if row.bank is not None and row.bank.members:
                groups.setdefault(id(row.bank), []).append(row)
        if not groups:
            return rows
        failed: set[int] = set()
        gates: dict[int, Gate] = {}
        for key, group in groups.items():
            try:
                gates[key] = self._gate_factory(_bank_of(group[0]))
            except LorafleetError as exc:
                _fail(group, exc, outcomes, failed)
        embeddings = self._group_embeddings({k: groups[k] for k in gates}, gates)
        for key, gate in gates.items():
            try:
                decisions = self._decide(gate, _bank_of(groups[key][0]), embeddings[key])
                for row, decision in zip(groups[key], decisions, strict=True):
                    scale = row.request.adapter_scale  # the personalization dial scales every weight
                    row.routes = tuple((m, w * scale) for m, w in _routes(_bank_of(row), decision))
            except LorafleetError as exc:
                _fail(groups[key], exc, outcomes, failed)
        return [row for row in rows if row.index not in failed]

    def _group_embeddings(
        self, groups: dict[int, list[_Row]], gates: dict[int, Gate]
    ) -> dict[int, torch.Tensor]:
        """Pooled prompt embeddings per group, from one base forward over the rows whose gate needs them;
        zeros for gates that declare they do not (``gate.needs_embeddings(bank)`` False)."""
        wanted = [k for k in groups if _needs_embeddings(gates[k], _bank_of(groups[k][0]))]
        rows = [row for k in wanted for row in groups[k]]
        pooled = self._embeddings(rows) if rows else None  # [n_rows, hidden]
        hidden = int(pooled.shape[1]) if pooled is not None else self._hidden_size
        out, start = {}, 0
        for key, group in groups.items():
            if key in wanted and pooled is not None:
                out[key], start = pooled[start : start + len(group)], start + len(group)
            else:
                out[key] = torch.zeros(len(group), hidden)  # [n_rows, hidden]
        return out

    def _embeddings(self, rows: Sequence[_Row]) -> torch.Tensor:
        pad_id = int(self.backbone.tokenizer.pad_token_id or 0)
        prompts = [self._gate_ids(r) for r in rows]
        ids, mask = left_pad(prompts, pad_id=pad_id, device=self.backbone.device)
        with self._model_lock, torch.inference_mode():
            return self._embed(self.backbone, self.bank, ids, mask)  # [batch, hidden]

    def _gate_ids(self, row: _Row) -> tuple[int, ...]:
        """What the gate embeds: the user's own text, tokenised as routing keys' prompts are (the rendered
        prompt's last tokens if that text encodes to nothing)."""
        text = last_user_content(row.request.messages) if row.request.messages else row.request.prompt
        ids = embedding_ids(self.backbone.tokenizer, text, max_tokens=self._embed_max_tokens)
        return tuple(ids) or row.prompt_ids[-self._embed_max_tokens :]

    def _decide(self, gate: Gate, bank: ExpertSet, embeddings: torch.Tensor) -> list[GateDecision]:
        decisions = list(gate.decide(bank, embeddings))
        if len(decisions) != embeddings.shape[0]:
            raise ValidationError(
                f"gate returned {len(decisions)} decisions for {embeddings.shape[0]} prompts"
            )
        return decisions

    def _spec(self, row: _Row, *, stream: bool = False) -> RowSpec:
        r = row.request
        return RowSpec(
            prompt_ids=row.prompt_ids,
            routes=row.slot_routes,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed,
            stop=(*r.stop, *(s for s in row.stops if s not in r.stop)),
            keep_logits=r.return_logits,
            logprobs=r.logprobs,
            stream=stream,
            cache_salt=f"tenant:{r.tenant_id}",  # one tenant never reuses (or times) another's prompts
        )

    def _result(self, row: _Row, out: RowOutput) -> GenerationResult:
        served_by = tuple(
            ServedBy(
                adapter=m.adapter_name,
                adapter_id=m.adapter_id,
                version=m.version_number,
                version_id=m.version_id,
                sha256=m.sha256,
                weight=w,
            )
            for m, w in row.routes
        )
        return GenerationResult(
            text=out.text,
            token_ids=tuple(out.token_ids),
            finish_reason=out.finish_reason,
            served_by=served_by,
            prompt_tokens=len(row.prompt_ids),
            bank_revision=row.bank.revision if row.bank is not None else None,
            request_id=row.request.request_id,
            logits=torch.stack(out.logits) if out.logits else None,  # [n_generated, vocab]
            logprobs=tuple(out.logprobs) if row.request.logprobs is not None else None,
        )

    def _failed(self, row: _Row, out: RowOutput) -> GenerationError:
        """The error of a row that ended without an answer; a non-finite one is reported to ``on_nonfinite``."""
        members = [m for m, _ in row.routes]
        served = ", ".join(f"{m.adapter_name} v{m.version_number}" for m in members) or "the base model"
        message = f"generation failed: {out.error} (served by {served})"
        if out.nonfinite_steps and members and row.bank is not None:
            message += "; the adapter versions are queued for a QA recheck"
            if self._on_nonfinite is not None:
                try:
                    self._on_nonfinite(row.bank, members)
                except Exception:  # reporting must not fail the batch; the request already has its error
                    logger.exception("could not report non-finite logits of %s", served)
        logger.warning("request %s of %s: %s", row.request.request_id or "-", row.request.user, message)
        return GenerationError(message)

    def _record(self, outcomes: Sequence[Outcome], served: Sequence[_Row], seconds: float) -> None:
        results = [o for o in outcomes if isinstance(o, GenerationResult)]
        self.metrics.record_batch(
            BatchRecord(
                size=len(outcomes),
                failed_codes=tuple(o.code for o in outcomes if isinstance(o, LorafleetError)),
                base_rows=sum(1 for r in served if not r.routes),
                adapter_rows=sum(1 for r in served if r.routes),
                prompt_tokens=sum(r.prompt_tokens for r in results),
                completion_tokens=sum(r.completion_tokens for r in results),
                seconds=seconds,
            )
        )


def _render(tokenizer: Any, request: GenerationRequest) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Token ids and added stop strings of a request: messages rendered, a plain prompt rendered as one user
    turn, a raw prompt tokenised as is."""
    if request.raw:
        return tuple(int(t) for t in tokenizer(request.prompt)["input_ids"]), ()
    messages = request.messages or (("user", request.prompt),)
    return tuple(encode_messages(tokenizer, messages)), chat_stop_strings(tokenizer, messages)


def _bank_of(row: _Row) -> ExpertSet:
    assert row.bank is not None
    return row.bank


def _fail(
    rows: Sequence[_Row], error: LorafleetError, outcomes: list[Outcome | None], failed: set[int]
) -> None:
    for row in rows:
        outcomes[row.index] = error
        failed.add(row.index)


def _needs_embeddings(gate: Gate, bank: ExpertSet) -> bool:
    """A gate may declare ``needs_embeddings(bank) -> bool`` (e.g. fixed weights, or no member with a routing
    key) to spare the batch the base forward over its prompts; without it, embeddings are computed."""
    probe = getattr(gate, "needs_embeddings", None)
    return True if probe is None else bool(probe(bank))


def _routes(bank: ExpertSet, decision: GateDecision) -> tuple[tuple[Expert, float], ...]:
    """A decision's ``(index into members, weight)`` pairs as members; zero weights are dropped."""
    routes = []
    for index, weight in decision.routes:
        if isinstance(index, bool) or not 0 <= index < len(bank.members):
            raise ValidationError(f"gate routed to member {index!r}; the bank has {len(bank.members)}")
        if not math.isfinite(weight):
            raise ValidationError(f"gate weight {weight!r} for member {index} is not finite")
        if weight != 0.0:
            routes.append((bank.members[index], float(weight)))
    return tuple(routes)


def cached_gate_factory(
    *, load_learned: LearnedGateLoader | None = None, max_gates: int = GATE_CACHE_SIZE
) -> GateFactory:
    """``build_gate`` per user bank, with the gates kept by spec (LRU): a spec names immutable things only
    (kind, parameters, a learned gate's version id), so equal specs make equal gates."""
    gates: OrderedDict[GateSpec, Gate] = OrderedDict()
    lock = threading.Lock()

    def factory(bank: ExpertSet) -> Gate:
        with lock:
            gate = gates.get(bank.gate)
            if gate is not None:
                gates.move_to_end(bank.gate)
                return gate
        gate = build_gate(bank.gate, load_learned=load_learned)
        with lock:
            gates[bank.gate] = gate
            while len(gates) > max_gates:
                gates.popitem(last=False)
        return gate

    return factory


def database_resolver(db: Database) -> ResolveBank:
    """``resolve_bank`` over the metadata database (``routing.resolve_user_experts``: an unknown user gets an
    empty bank and is answered by the base model)."""
    return lambda tenant_id, user: resolve_user_experts(db, tenant_id=tenant_id, user_external_id=user)


def database_model_resolver(db: Database) -> ResolveModel:
    """``resolve_model`` over the metadata database (``routing.resolve_model_experts``)."""
    return lambda tenant_id, ref: resolve_model_experts(
        db, tenant_id=tenant_id, owner=ref.owner, adapter=ref.adapter, version=ref.version
    )


def _default_embed(backbone: Backbone, bank: AdapterBank, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    return pooled_embeddings(backbone, bank, ids, mask)


__all__ = [
    "Embed",
    "GateFactory",
    "GenerationEngine",
    "Outcome",
    "ResolveBank",
    "cached_gate_factory",
    "database_resolver",
]
