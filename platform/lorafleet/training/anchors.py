"""The anchor terms: what keeps an adapter's general answers near the base model's while it learns its user.

An anchor is a general prompt answered by the base model itself (``lorafleet.training.general_prompts``) that
the trainer mixes into a user's rows (``TrainingConfig.anchor_ratio``); the trainer's SFT loss trains towards the
base's answer on them. This module holds the other terms that act on the anchor rows, each a per-user tensor
``[users]`` the trainer weighs into a user's objective:

- ``anchor_distill`` (Learning without Forgetting): KL(base || adapter) at the anchors' answer positions, against
  the base's top-k log-probs computed once per job (:func:`base_targets`, :func:`anchor_distill`);
- ``anchor_unlikelihood``: ``-log(1 - p)`` of the user's own answer tokens at those positions, so that what the
  adapter learned about its user does not leak into general answers (:func:`anchor_unlikelihood`);
- ``anchor_free_ends``: for a user with preference pairs, which ends of an anchor's answer carry no loss, so that a
  preferred opening or closing is not trained away (:func:`free_answer_ends`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.adapters.prefix import FrozenPrefix
from lorafleet.training.dataset import collate
from lorafleet.training.metrics import scored_logits

__all__ = [
    "ANCHOR_DISTILL_TOP_K",
    "AnchorTargets",
    "anchor_distill",
    "anchor_unlikelihood",
    "base_targets",
    "free_answer_ends",
    "topk_kl",
]

#: base log-probs kept per anchor position for ``anchor_distill`` (the rest of the mass is one outcome)
ANCHOR_DISTILL_TOP_K = 32
#: rows per forward when computing the base's anchor targets
ANCHOR_TARGET_ROWS = 64


@dataclass(frozen=True)
class AnchorTargets:
    """The base model's next-token distribution at one anchor's scored positions, kept as its top-k log-probs and
    the log of the remaining mass."""

    top_logps: torch.Tensor  # [m, k] float32
    top_ids: torch.Tensor  # [m, k] int64
    rest_logp: torch.Tensor  # [m] float32: log(1 - sum of the top-k probabilities)


@torch.no_grad()
def base_targets(
    bank: AdapterBank,
    rows: Sequence[tuple[list[int], int]],
    *,
    pad_id: int,
    prefix: FrozenPrefix | None = None,
    layer: int = 0,
    top_k: int = ANCHOR_DISTILL_TOP_K,
) -> list[AnchorTargets]:
    """The base's targets on each of ``rows`` (encoded ``(ids, answer length)``), in order, for ``anchor_distill``.

    The rows run through the bank with an empty route (the base, not a parent version), in eval mode without
    gradients, ``ANCHOR_TARGET_ROWS`` at a time; with ``prefix`` only layers ``layer..`` run here."""
    model, was_training = bank.model, bank.model.training
    model.eval()
    targets: list[AnchorTargets] = []
    try:
        for start in range(0, len(rows), ANCHOR_TARGET_ROWS):
            chunk = rows[start : start + ANCHOR_TARGET_ROWS]
            batch = collate(chunk, pad_id=pad_id).to(bank.device)
            with bank.use(SlotPlan.base_only(len(chunk))):
                logits, scored = scored_logits(
                    model, batch, prefix=prefix, layer=layer, sequences=[ids for ids, _ in chunk]
                )  # [n, vocab]
            log_p = logits.log_softmax(dim=-1)  # [n, vocab]
            top_logps, top_ids = log_p.topk(min(top_k, log_p.shape[-1]), dim=-1)  # [n, k], [n, k]
            rest_logp = torch.log1p(-top_logps.exp().sum(dim=-1).clamp(max=1.0 - 1e-6))  # [n]
            counts = torch.bincount(scored.rows, minlength=len(chunk)).tolist()  # tokens come row by row
            split = (top_logps.split(counts), top_ids.split(counts), rest_logp.split(counts))
            targets.extend(AnchorTargets(*row) for row in zip(*split, strict=True))
    finally:
        model.train(was_training)
    return targets


def topk_kl(logits: torch.Tensor, targets: AnchorTargets) -> torch.Tensor:
    """``[m]``: KL(base || adapter) per position from the adapter's ``logits`` ``[m, vocab]`` and the base's top-k
    targets: the top-k tokens' terms plus the rest's mass as one outcome."""
    log_pa = logits.log_softmax(dim=-1).gather(1, targets.top_ids)  # [m, k]
    rest_pa = torch.log1p(-log_pa.exp().sum(dim=-1).clamp(max=1.0 - 1e-6))  # [m]
    top = (targets.top_logps.exp() * (targets.top_logps - log_pa)).sum(dim=-1)  # [m]
    return top + targets.rest_logp.exp() * (targets.rest_logp - rest_pa)  # [m]


def anchor_distill(
    logits: torch.Tensor,
    token_rows: torch.Tensor,
    freed: torch.Tensor,
    owners: Sequence[int],
    anchor_index: Sequence[int | None],
    distill: Sequence[list[AnchorTargets] | None],
    n_users: int,
) -> torch.Tensor:
    """Per user ``[users]``: the mean over its anchor rows' scored positions (less the ``freed`` ones) of
    KL(base || adapter) (:func:`topk_kl`); 0 for a user without anchor rows in the micro-batch.

    ``logits`` ``[n, vocab]`` are the micro-batch's scored positions and ``token_rows`` ``[n]`` their rows; per
    row, ``owners`` is its user and ``anchor_index`` which of the user's anchors it is (None: not an anchor), the
    index into that user's ``distill`` targets."""
    counts = torch.bincount(token_rows, minlength=len(owners)).tolist()  # scored tokens come row by row
    picked: list[torch.Tensor] = []
    parts: list[AnchorTargets] = []
    users: list[int] = []
    end = 0
    for row, (user, index) in enumerate(zip(owners, anchor_index, strict=True)):
        start, end = end, end + counts[row]
        targets = distill[user]
        if index is None or targets is None:
            continue
        target = targets[index]
        assert target.top_ids.shape[0] == end - start, (
            f"anchor row {row}: {end - start} scored tokens, {target.top_ids.shape[0]} targets"
        )
        picked.append(torch.arange(start, end, device=logits.device))
        parts.append(target)
        users.extend([user] * (end - start))
    if not picked:
        return logits.new_zeros(n_users)
    positions = torch.cat(picked)  # [m]
    joined = AnchorTargets(
        torch.cat([t.top_logps for t in parts]).to(logits.device),
        torch.cat([t.top_ids for t in parts]).to(logits.device),
        torch.cat([t.rest_logp for t in parts]).to(logits.device),
    )
    kept = (~freed.index_select(0, positions)).to(logits.dtype)  # [m]
    kl = topk_kl(logits.index_select(0, positions), joined) * kept  # [m]
    owner = torch.tensor(users, device=logits.device)  # [m]
    user_sum = logits.new_zeros(n_users).index_add(0, owner, kl)  # [users]
    user_tokens = logits.new_zeros(n_users).index_add(0, owner, kept)  # [users]
    return user_sum / user_tokens.clamp(min=1)


#: ``anchor_free_ends="auto"``: a pair's answers end differently when any of their last this many tokens before
#: the end of turn differ (a sign-off, a closing line, an answer cut after its first sentence)
_ENDING_TOKENS = 3


def free_answer_ends(
    pairs: Sequence[tuple[int, tuple[list[int], int], tuple[list[int], int]]] | None, mode: str
) -> tuple[bool, bool]:
    """Whether a user's anchors leave their first answer token (``opening``) and their end of turn (``closing``)
    free of loss, by ``TrainingConfig.anchor_free_ends``: never for a user without pairs in the job (``pairs``:
    its encoded ``(index, (chosen ids, answer length), (rejected ids, answer length))``); ``auto`` reads them, freeing an end where most of them differ there: the opening where the chosen and the
    rejected answer start with different tokens (a greeting, "Certainly."), the closing where they end with
    different tokens (a sign-off, a closing line, a shorter answer)."""
    if pairs is None or mode == "none":
        return (False, False)
    if mode != "auto":
        return (mode == "both", True)
    opens = ends = 0
    for _, (chosen, n_chosen), (rejected, n_rejected) in pairs:
        opens += int(chosen[-n_chosen] != rejected[-n_rejected])
        k = min(_ENDING_TOKENS, n_chosen - 1, n_rejected - 1)
        ends += int(k > 0 and chosen[-1 - k : -1] != rejected[-1 - k : -1])
    return (2 * opens > len(pairs), 2 * ends > len(pairs))


def anchor_unlikelihood(
    logits: torch.Tensor,
    token_rows: torch.Tensor,
    owner: torch.Tensor,
    anchor_rows: torch.Tensor,
    personal: Sequence[torch.Tensor | None],
    *,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per user ``[users]``: the mean over its anchor rows' scored positions of ``-log(1 - p)``, where ``p`` is the
    probability of any of its personal tokens there (unlikelihood training, Welleck et al. 2019); 0 without any.

    ``labels`` ``[n]``, the tokens each position is trained towards: a position whose label is a personal token
    following another one (the rest of a value a contrast row's answer has begun, "Dump|ling") is left out. The
    term is to stop a value from starting; pushing down its continuation once started taught the adapters of the
    benchmark to misspell their own values ("Dumplings", "petanter"). A general anchor's labels are the base's
    answer, which holds no personal token, so only contrast rows have such positions."""
    on_anchor, token_owner = anchor_rows[token_rows], owner[token_rows]  # [n], [n]
    same_row = torch.zeros_like(on_anchor)  # [n]: the previous scored token is of the same row
    same_row[1:] = token_rows[1:] == token_rows[:-1]
    terms: list[torch.Tensor] = []
    for user, tokens in enumerate(personal):
        mask = on_anchor & (token_owner == user)  # [n]
        if tokens is not None and labels is not None:
            is_personal = torch.isin(labels, tokens)  # [n]
            after_personal = torch.zeros_like(is_personal)
            after_personal[1:] = is_personal[:-1]
            mask = mask & ~(is_personal & after_personal & same_row)
        picked = mask.nonzero().squeeze(1)  # [m]
        if tokens is None or picked.numel() == 0:
            terms.append(logits.new_zeros(()))
            continue
        rows = logits.index_select(0, picked)  # [m, vocab]
        log_p = torch.logsumexp(rows.index_select(1, tokens), dim=1) - torch.logsumexp(rows, dim=1)  # [m]
        terms.append(-torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-6)).mean())
    return torch.stack(terms)
