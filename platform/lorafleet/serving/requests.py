"""What a caller asks the serving engine for and what it gets back (plain objects; importing this needs no torch).

A request names a user of a tenant (or none), a ``model`` (``ModelRef``: the user's experts by default) and what to
answer, in one of three forms the engine renders
(``lorafleet.backbone.chat``, as training renders examples): ``messages`` (a conversation, through the backbone's
chat template); a ``prompt`` (by default one user turn of that same template, so a plain prompt is answered as
adapters were trained); or a ``prompt`` with ``raw=True`` (the text as is, for text completion). It carries its
own decoding parameters: greedy when ``temperature`` is 0,
else sampling with ``temperature`` and nucleus ``top_p``, seeded per request so that a seeded request gives the
same tokens whatever else shares its batch. A result says which adapter versions, with which weights, served it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

from lorafleet.backbone.chat import CHAT_ROLES
from lorafleet.errors import LorafleetError, ModelNotFoundError, ValidationError

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]
#: Upper bound on ``max_new_tokens`` of one request (the engine also checks the model's context length).
MAX_NEW_TOKENS_LIMIT = 4096
MAX_STOP_STRINGS = 16
#: the most alternatives per token a request may ask for (``logprobs``; OpenAI's bound for ``top_logprobs``)
MAX_LOGPROBS = 20
#: the smallest temperature other than 0 (greedy): below it ``logits / temperature`` overflows to infinity and
#: the sampling distribution is undefined; a caller who wants determinism asks for 0
MIN_TEMPERATURE = 1e-3
Turn = tuple[str, str]


#: the ``model`` that serves a request through its user's experts (the default)
BANK_MODEL = "lorafleet"
#: the ``model`` that serves a request by the base model alone, whoever the user
BASE_MODEL = "base"
#: the prefix of a tenant task adapter's model id: ``task:<name>`` (live version) or ``task:<name>@<n>``
TASK_MODEL_PREFIX = "task:"


@dataclass(frozen=True)
class ModelRef:
    """What a request's ``model`` names (OpenAI's ``model`` field; ``GET /v1/models`` lists the first three):

    - ``lorafleet``: the request's user's experts, gated per request (the base model when the request has
      no user, or the user has no adapters);
    - ``base``: the base model alone;
    - ``task:<name>``: the tenant's task adapter ``name`` alone, at its live version; ``task:<name>@<n>`` at
      version ``n``;
    - ``<user>/<adapter>`` or ``<user>/<adapter>@<n>``: one user's adapter alone, live or pinned at version
      ``n`` (reproducible answers: a pinned version does not move with promotions and rollbacks).

    Anything else raises ``ModelNotFoundError`` (404 ``model_not_found``).
    """

    kind: Literal["bank", "base", "adapter"]
    #: the adapter's owner (a user's external id); None for a task adapter
    owner: str | None = None
    adapter: str = ""
    #: the pinned version number; None: the live version
    version: int | None = None

    @classmethod
    def parse(cls, model: object) -> ModelRef:
        if not isinstance(model, str) or not model:
            raise ValidationError("model: must be a non-empty string")
        if model == BANK_MODEL:
            return cls("bank")
        if model == BASE_MODEL:
            return cls("base")
        name, version = model, None
        head, at, tail = model.rpartition("@")
        if at and tail.isdigit() and head:
            name, version = head, int(tail)
            if version < 1:
                raise ModelNotFoundError(f"model {model!r}: versions are numbered from 1")
        if name.startswith(TASK_MODEL_PREFIX) and len(name) > len(TASK_MODEL_PREFIX):
            return cls("adapter", None, name[len(TASK_MODEL_PREFIX) :], version)
        owner, slash, adapter = name.rpartition("/")
        if slash and owner and adapter:
            return cls("adapter", owner, adapter, version)
        raise ModelNotFoundError(
            f"model {model!r} not found: use {BANK_MODEL!r} (the user's adapters), {BASE_MODEL!r}, "
            f"'task:<name>[@<version>]' or '<user>/<adapter>[@<version>]' (GET /v1/models)"
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt or conversation of one user; ``stop`` strings end generation (the stop string itself is not
    returned), as does the backbone's end-of-turn token."""

    tenant_id: int
    #: the user's external id; None: no user (the base model, unless ``model`` names an adapter)
    user: str | None
    #: the text to answer (empty when ``messages`` are given)
    prompt: str = ""
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: keep the raw logits of every decoding step on the result (for evaluation and tests)
    return_logits: bool = False
    #: the caller's correlation id, copied to the result
    request_id: str | None = None
    #: a conversation of ``(role, content)`` turns, rendered with the chat template (instead of ``prompt``)
    messages: tuple[Turn, ...] = ()
    #: feed ``prompt`` as is, without the chat template (OpenAI's text completion)
    raw: bool = False
    #: what serves the request (``ModelRef``): the user's experts by default
    model: str = BANK_MODEL
    #: the personalization dial: every adapter weight the gate gives is multiplied by this (1: full
    #: personalization; 0: the base model, without routing or loading anything)
    adapter_scale: float = 1.0
    #: None: no log probabilities; ``k`` in [0, 20]: each generated token's log probability and its ``k`` most
    #: likely alternatives (``GenerationResult.logprobs``)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "messages", _turns(self.messages))
        _check_request(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef.parse(self.model)


def _turns(messages: object) -> tuple[Turn, ...]:
    """Messages as a tuple of ``(role, content)`` pairs (lists from a JSON hop become tuples)."""
    if isinstance(messages, str | bytes) or not isinstance(messages, list | tuple):
        raise ValidationError("messages: must be a sequence of (role, content) pairs")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, list | tuple) or len(turn) != 2:
            raise ValidationError(f"messages[{i}]: must be a (role, content) pair")
        role, content = turn
        if role not in CHAT_ROLES:
            raise ValidationError(f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValidationError(f"messages[{i}].content: must be a string")
        turns.append((str(role), content))
    return tuple(turns)


def _check_input(r: GenerationRequest) -> None:
    """Exactly one of a non-empty ``prompt`` and non-empty ``messages``; ``raw`` only with a prompt."""
    if not isinstance(r.prompt, str):
        raise ValidationError("prompt: must be a string")
    if r.messages and r.prompt:
        raise ValidationError("messages: give either a prompt or messages, not both")
    if not r.messages and not r.prompt:
        raise ValidationError("prompt: must be a non-empty string (or give messages)")
    if not isinstance(r.raw, bool) or (r.raw and r.messages):
        raise ValidationError("raw: a bool, for a prompt only (messages are always rendered)")


def _check_request(r: GenerationRequest) -> None:
    if isinstance(r.tenant_id, bool) or not isinstance(r.tenant_id, int):
        raise ValidationError(f"tenant_id must be an int, got {r.tenant_id!r}")
    if r.user is not None and (not isinstance(r.user, str) or not r.user):
        raise ValidationError("user must be a non-empty string (the user's external id) or absent")
    ModelRef.parse(r.model)
    _check_input(r)
    if isinstance(r.max_new_tokens, bool) or not 1 <= r.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValidationError(
            f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {r.max_new_tokens!r}"
        )
    if not math.isfinite(r.temperature) or not (r.temperature == 0 or r.temperature >= MIN_TEMPERATURE):
        raise ValidationError(
            f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {r.temperature!r}"
        )
    if not math.isfinite(r.top_p) or not 0.0 < r.top_p <= 1.0:
        raise ValidationError(f"top_p must be in (0, 1], got {r.top_p!r}")
    scale = r.adapter_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 <= scale <= 1.0:
        raise ValidationError(f"adapter_scale must be a number in [0, 1], got {scale!r}")
    if r.seed is not None and (isinstance(r.seed, bool) or not 0 <= r.seed < 2**63):
        raise ValidationError(f"seed must be an int in [0, 2**63), got {r.seed!r}")
    if r.logprobs is not None and (
        isinstance(r.logprobs, bool) or not isinstance(r.logprobs, int) or not 0 <= r.logprobs <= MAX_LOGPROBS
    ):
        raise ValidationError(f"logprobs must be absent or an int in [0, {MAX_LOGPROBS}], got {r.logprobs!r}")
    if len(r.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in r.stop):
        raise ValidationError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")


@dataclass(frozen=True)
class ServedBy:
    """One adapter version in a response's mixture, with the gate's weight for it."""

    adapter: str
    adapter_id: int
    version: int
    version_id: int
    sha256: str
    weight: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model, and the most likely alternatives at that step."""

    token_id: int
    #: the token's text (special tokens included, as the tokenizer spells them)
    token: str
    logprob: float
    #: ``(token_id, token, logprob)`` of the most likely tokens, most likely first
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class GenerationDelta:
    """What a streamed request added since its previous delta: text (never a stop string or half a character;
    the deltas concatenate to the result's ``text``), the tokens taken, and their log probabilities when asked."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The generated text and tokens, why generation ended, and exactly which versions served the request.

    ``token_ids`` are every token generated, including an end-of-sequence token or the token that completed a
    stop string; ``text`` is their decoding without special tokens, cut before the first stop string.
    ``served_by`` is empty when the request ran on the base model alone.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    served_by: tuple[ServedBy, ...]
    prompt_tokens: int
    #: the user bank's revision the request was resolved against (None when the user has no bank)
    bank_revision: str | None = None
    request_id: str | None = None
    #: raw logits of each step when the request asked for them
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)  # [n_generated, vocab]
    #: one per generated token when the request asked for ``logprobs``
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def versions(self) -> tuple[int, ...]:
        """The version ids that served the request (empty for the base model)."""
        return tuple(s.version_id for s in self.served_by)


#: what serving answers one request with: its result, or its own library error (the batch's others still served)
Outcome = GenerationResult | LorafleetError


def results_or_first_error(outcomes: Sequence[Outcome]) -> list[GenerationResult]:
    """``outcomes`` as results, in order; the first library error among them is raised instead (what an
    engine's or a Serve client's ``generate`` does with ``generate_each``'s outcomes)."""
    for outcome in outcomes:
        if isinstance(outcome, LorafleetError):
            raise outcome
    return cast(list[GenerationResult], list(outcomes))


__all__ = [
    "BANK_MODEL",
    "BASE_MODEL",
    "MAX_NEW_TOKENS_LIMIT",
    "TASK_MODEL_PREFIX",
    "ModelRef",
    "MIN_TEMPERATURE",
    "FinishReason",
    "GenerationDelta",
    "GenerationRequest",
    "GenerationResult",
    "MAX_LOGPROBS",
    "Outcome",
    "ServedBy",
    "TokenLogprob",
    "results_or_first_error",
]
