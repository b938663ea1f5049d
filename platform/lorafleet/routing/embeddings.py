"""Pooled base-model embeddings of prompts: what every gate scores, and what a routing key is made of.

A prompt's embedding is the attention-masked mean of the backbone's last hidden state, computed by the frozen
BASE model (``bank.base_only()``, so it does not depend on which adapters are loaded), L2-normalised. Position
ids count from each row's first real token, so an embedding does not depend on how much padding its batch has:
a routing key computed offline and a request embedded in a serving batch are comparable.

A version's routing key summarises its training prompts' embeddings in up to ``ROUTING_KEY_VECTORS`` unit
vectors (spherical k-means; one vector, their normalised mean, in keys stored before), flattened; it is computed
when the version is trained or imported and stored with the version (``Registry.register_version(routing_key=...)``).
Both sides embed the user's own text, tokenised by ``embedding_ids``: a training example's ``prompt`` (the last
user turn of a conversation) and, in serving, a request's prompt or its conversation's last user turn, never
the chat-template rendering (whose shared system prompt would make every prompt look alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lorafleet.errors import ValidationError

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank
    from lorafleet.adapters.prefix import FrozenPrefix
    from lorafleet.backbone import Backbone

#: prompts longer than this (in tokens) keep their last tokens, as training truncates prompts
DEFAULT_MAX_PROMPT_TOKENS = 512
#: vectors in a routing key. A user's facts are about different things (a pet, a city, a diet), so the mean of
#: their prompts is near none of them. Measured on SmolLM2-135M (tests/benchmarks/bench_gate_general.py, 3 seeds
#: of 4 users, margin 0.01): with one vector 92-96 % of unseen personal questions stay on their adapter and
#: 89-92 % of general prompts go to the base; with up to 8, 100 % and 92-94 %
ROUTING_KEY_VECTORS = 8


@torch.no_grad()
def pooled_embeddings(
    backbone: Backbone | torch.nn.Module,
    bank: AdapterBank | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """``[batch, hidden]`` fp32: masked mean of the base model's last hidden state, L2-normalised per row."""
    model = backbone if isinstance(backbone, torch.nn.Module) else backbone.model
    body = getattr(model, "base_model", model)  # the decoder without the LM head: no vocabulary projection
    mask = attention_mask.to(input_ids.device)
    if not bool((mask.sum(dim=1) > 0).all()):
        raise ValidationError("every row needs at least one token to embed")
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [batch, seq]
    if bank is None:
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
    else:
        with bank.base_only():
            hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
    states = hidden.last_hidden_state.float()  # [batch, seq, hidden]
    weights = mask.to(states.dtype).unsqueeze(-1)  # [batch, seq, 1]
    pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)  # [batch, hidden]
    return F.normalize(pooled, dim=-1)


def embed_prompts(
    backbone: Backbone,
    bank: AdapterBank | None,
    prompts: Sequence[str],
    *,
    batch_size: int = 32,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    prefix: FrozenPrefix | None = None,
) -> torch.Tensor:
    """``[len(prompts), hidden]`` pooled embeddings of raw prompts, tokenised as serving tokenises them.

    With ``prefix`` (a trainer's frozen-prefix cache) each prompt's final base states are kept there, so a
    later round's routing key does not run its replayed prompts through the model again.
    """
    if not prompts:
        raise ValidationError("no prompts to embed")
    if batch_size < 1 or max_prompt_tokens < 1:
        raise ValidationError("batch_size and max_prompt_tokens must be >= 1")
    if prefix is not None:
        return _embed_through_prefix(backbone, prefix, prompts, max_prompt_tokens)
    device = backbone.device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _encode(backbone.tokenizer, prompts[start : start + batch_size], max_prompt_tokens)
        chunks.append(pooled_embeddings(backbone, bank, ids.to(device), mask.to(device)).cpu())
    return torch.cat(chunks)  # [n, hidden]


def _embed_through_prefix(
    backbone: Backbone, prefix: FrozenPrefix, prompts: Sequence[str], max_tokens: int
) -> torch.Tensor:
    """Pooled embeddings from cached states entering the final norm (the base model's whole depth)."""
    rows = [embedding_ids(backbone.tokenizer, p, max_tokens=max_tokens) for p in prompts]
    if any(not row for row in rows):
        raise ValidationError("a prompt tokenises to nothing")
    with torch.no_grad():
        states = prefix.states(prefix.num_layers, rows)  # each [len, hidden], before the final norm
        pooled = torch.stack([prefix.split.norm(s).float().mean(dim=0) for s in states])  # [n, hidden]
    return F.normalize(pooled, dim=-1).cpu()


def routing_key(
    backbone: Backbone,
    bank: AdapterBank | None,
    prompts: Sequence[str],
    *,
    prefix: FrozenPrefix | None = None,
    vectors: int = ROUTING_KEY_VECTORS,
) -> tuple[float, ...]:
    """An adapter's routing key: up to ``vectors`` unit vectors that summarise its training prompts' pooled
    embeddings (``embed_prompts`` with its default batch and truncation; ``key_vectors``: spherical k-means),
    flattened to ``k * hidden`` floats. The gate scores a prompt by its cosine to the nearest of them.
    ``vectors=1`` gives the normalised mean, the key of earlier versions."""
    return _flat_key(embed_prompts(backbone, bank, prompts, prefix=prefix), vectors)


def routing_key_and_claim(
    backbone: Backbone,
    bank: AdapterBank | None,
    prompts: Sequence[str],
    *,
    general: torch.Tensor,
    prefix: FrozenPrefix | None = None,
    vectors: int = ROUTING_KEY_VECTORS,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """An adapter's routing key (:func:`routing_key`) and routing claim (:func:`fit_claim` against ``general``, the
    shipped general prompts' embeddings on this backbone), from one embedding of its training prompts."""
    embeddings = embed_prompts(backbone, bank, prompts, prefix=prefix)
    return _flat_key(embeddings, vectors), fit_claim(embeddings, general)


def _flat_key(embeddings: torch.Tensor, vectors: int) -> tuple[float, ...]:
    """The routing key of pooled embeddings ``[n, hidden]``: ``key_vectors`` flattened to ``k * hidden`` floats."""
    return tuple(float(v) for v in key_vectors(embeddings, vectors).flatten().tolist())


@torch.no_grad()
def key_vectors(embeddings: torch.Tensor, k: int, *, iterations: int = 25) -> torch.Tensor:
    """Up to ``k`` unit vectors ``[k', hidden]`` that summarise ``embeddings`` ``[n, hidden]``: spherical k-means.

    ``k`` 1 is the normalised mean. Deterministic (no seed): the first centre is the embedding nearest the mean,
    each next one the embedding farthest from the centres so far (by cosine), then Lloyd iterations on the unit
    sphere. Fewer than ``k`` vectors come back when there are fewer distinct embeddings.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValidationError("key_vectors needs a non-empty [n, hidden] matrix")
    if k < 1:
        raise ValidationError(f"key_vectors: k must be >= 1, got {k}")
    points = F.normalize(embeddings.detach().float().cpu(), dim=-1)  # [n, hidden]
    mean = F.normalize(points.mean(dim=0), dim=0)  # [hidden]
    if k == 1:
        return mean[None]
    centres = [int((points @ mean).argmax())]
    while len(centres) < min(k, points.shape[0]):
        nearest = (points @ points[centres].T).max(dim=1).values  # [n]: cosine to the nearest centre
        far = int(nearest.argmin())
        if nearest[far] >= 1.0 - 1e-6:  # every point is already a centre's duplicate
            break
        centres.append(far)
    centroid = points[centres]  # [k', hidden]
    for _ in range(iterations):
        owner = (points @ centroid.T).argmax(dim=1)  # [n]
        sums = torch.zeros_like(centroid).index_add_(0, owner, points)  # [k', hidden]
        moved = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=-1), centroid)
        if torch.equal(moved, centroid):
            break
        centroid = moved
    return centroid


#: L2 weight of a routing claim's probe (on standardised features). On SmolLM2-135M (bench_gate_general.py's users,
#: 3 seeds of 4, rounds 1 and 1-3; tests/benchmarks/README.md) 0.001-0.1 routed the same within a point
CLAIM_WEIGHT_DECAY = 0.1
#: a probe that, fitted without a fold of the prompts, claims less than this share of that fold's own prompts or
#: more than 1 - this share of its general ones could not tell them apart: the adapter was trained on general
#: prompts (a style or register preference, which its user wants on general questions too) and claims every
#: prompt instead. Held out, not on the fitted prompts: in hundreds of dimensions a probe separates any few dozen
#: prompts it was fitted on
CLAIM_MIN_SEPARATION = 0.8
#: folds of that check
CLAIM_FOLDS = 4
#: the claim of an adapter whose prompts are general ones: every prompt (weights 0, this bias)
CLAIM_EVERYTHING_BIAS = 1.0


def fit_claim(
    own: torch.Tensor,
    general: torch.Tensor,
    *,
    weight_decay: float = CLAIM_WEIGHT_DECAY,
    iterations: int = 200,
) -> tuple[float, ...]:
    """An adapter's routing claim: a linear probe over pooled embeddings that tells its own prompts from general
    ones, ``hidden + 1`` floats (the weights, then the bias; :func:`claim_logits` applies it).

    ``own`` ``[n, hidden]``: the adapter's training prompts, embedded (``embed_prompts``); ``general``
    ``[m, hidden]``: the shipped general prompts on this backbone (``general_prompts.general_exemplars``). Logistic
    regression with the two classes weighted equally and an L2 penalty ``weight_decay`` on standardised features
    (the standardisation is folded into the stored weights), fitted by L-BFGS; deterministic. A prompt with a
    logit above 0 is claimed. Why a probe and not the nearest general prompt: the difference between "What's my
    home city?" and "What is the capital of Spain?" is a direction (the first person, a possessive), not a
    neighbourhood; measured in tests/benchmarks/README.md ("A probe that claims an adapter's prompts").

    An adapter trained on general prompts themselves (a preference for concise or formal answers, taught on
    general questions) cannot be told from them: when probes fitted without each of ``CLAIM_FOLDS`` folds claim
    less than ``CLAIM_MIN_SEPARATION`` of the held-out ``own`` rows or more than ``1 - CLAIM_MIN_SEPARATION`` of
    the held-out ``general`` rows, the claim is every prompt (weights 0, bias ``CLAIM_EVERYTHING_BIAS``), so such
    an adapter keeps answering general questions as its user asked.
    """
    if (
        own.dim() != 2
        or general.dim() != 2
        or own.shape[1] != general.shape[1]
        or not len(own)
        or not len(general)
    ):
        raise ValidationError(
            f"fit_claim needs [n, hidden] and [m, hidden] embeddings, got {tuple(own.shape)}, {tuple(general.shape)}"
        )
    x_own, x_general = own.detach().double().cpu(), general.detach().double().cpu()
    if not _separable(x_own, x_general, weight_decay=weight_decay, iterations=iterations):
        return (0.0,) * x_own.shape[1] + (CLAIM_EVERYTHING_BIAS,)
    return tuple(float(v) for v in _probe(x_own, x_general, weight_decay=weight_decay, iterations=iterations))


def _separable(own: torch.Tensor, general: torch.Tensor, *, weight_decay: float, iterations: int) -> bool:
    """Whether probes fitted without each fold (row ``i`` is in fold ``i % CLAIM_FOLDS``) tell the held-out rows
    apart: at least ``CLAIM_MIN_SEPARATION`` of ``own`` claimed, at most ``1 - CLAIM_MIN_SEPARATION`` of ``general``."""
    own_hits = general_hits = 0
    for fold in range(CLAIM_FOLDS):
        own_out = torch.arange(len(own)) % CLAIM_FOLDS == fold  # [n]
        general_out = torch.arange(len(general)) % CLAIM_FOLDS == fold  # [m]
        if bool(own_out.all()) or bool(general_out.all()):  # too few rows to hold any out
            continue
        probe = _probe(own[~own_out], general[~general_out], weight_decay=weight_decay, iterations=iterations)
        own_hits += int((own[own_out] @ probe[:-1] + probe[-1] > 0).sum())
        general_hits += int((general[general_out] @ probe[:-1] + probe[-1] > 0).sum())
    return own_hits >= CLAIM_MIN_SEPARATION * len(own) and general_hits <= (1 - CLAIM_MIN_SEPARATION) * len(
        general
    )


def _probe(own: torch.Tensor, general: torch.Tensor, *, weight_decay: float, iterations: int) -> torch.Tensor:
    """The fitted probe ``[hidden + 1]`` (float64): weights on the raw embeddings, then the bias."""
    x = torch.cat([own, general])  # [n + m, hidden]
    y = torch.cat([torch.ones(len(own)), torch.zeros(len(general))]).double()  # [n + m]
    mean, scale = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)  # [hidden] each
    standard = (x - mean) / scale
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    balance = torch.tensor(len(general) / len(own), dtype=torch.float64)  # the two classes weigh the same
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = standard @ weight + bias
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=balance)
        loss = loss + weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    folded = weight.detach() / scale  # logit = x @ folded + folded_bias
    folded_bias = bias.detach() - (mean * folded).sum()
    return torch.cat([folded, folded_bias])


def claim_logits(claims: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``[batch, n]``: each row of ``embeddings`` ``[batch, hidden]`` scored by each claim of ``claims``
    ``[n, hidden + 1]`` (:func:`fit_claim`); above 0 the adapter claims the prompt."""
    return embeddings.float() @ claims[:, :-1].float().T + claims[:, -1].float()


def embedding_ids(tokenizer: Any, prompt: str, *, max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS) -> list[int]:
    """The ids a prompt is embedded from (routing keys and serving's gates alike): the text as the tokenizer
    encodes a plain prompt, without a chat template; over ``max_tokens`` it keeps its last tokens."""
    return [int(t) for t in tokenizer(prompt)["input_ids"]][-max_tokens:]


def _encode(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask; a prompt over ``max_tokens`` keeps its last tokens."""
    rows = [embedding_ids(tokenizer, p, max_tokens=max_tokens) for p in prompts]
    if any(not row for row in rows):
        raise ValidationError("a prompt tokenises to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.int64)  # [batch, seq]
    mask = torch.zeros((len(rows), width), dtype=torch.int64)  # [batch, seq]
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
        mask[i, width - len(row) :] = 1
    return ids, mask


def common_direction(embeddings: torch.Tensor) -> torch.Tensor:
    """``[hidden]``: the unit mean of pooled embeddings ``[n, hidden]`` of varied prompts (the service uses the
    shipped general prompts): the direction every prompt shares on this backbone, which centroid gates leave out
    of their scores (``routing.gates.CentroidGate``)."""
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValidationError(f"need [n >= 1, hidden] embeddings, got {tuple(embeddings.shape)}")
    return F.normalize(embeddings.float().mean(dim=0), dim=0)
