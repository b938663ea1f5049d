"""The columns of the QA matrix, and the banks its gated columns route over.

Columns (``lorafleet.qa.results`` names): ``base``; ``previous`` (the previous live version alone, when there is
one); ``candidate`` (alone); ``gated:previous`` (the user's experts as served before: the previous live version,
or no version of this adapter, with the other sampled members); ``gated:candidate`` (the same bank with the
candidate in the adapter's place); and for every other sampled member ``m``: ``alone:m`` and ``pair:m``
(candidate and ``m`` mixed 50/50). A task adapter's candidate has no bank: base, previous and candidate only.

Handles name the loaded versions: ``candidate``, ``previous`` and ``member:<adapter id>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorafleet.domain import Adapter, AdapterVersion
from lorafleet.qa.matrix import ColumnSpec, GatedExperts
from lorafleet.qa.results import (
    BASE,
    CANDIDATE,
    GATED_CANDIDATE,
    GATED_PREVIOUS,
    PREVIOUS,
    ColumnInfo,
)
from lorafleet.qa.sampling import member_label
from lorafleet.routing.experts import Expert, ExpertSet, experts_revision

if TYPE_CHECKING:
    from lorafleet.routing.gates import Gate

CANDIDATE_HANDLE = "candidate"
PREVIOUS_HANDLE = "previous"


def member_handle(member: Expert) -> str:
    return f"member:{member.adapter_id}"


def version_member(
    *,
    adapter: Adapter,
    version: AdapterVersion,
    kind: str,
    routing_key: tuple[float, ...] | None,
    routing_claim: tuple[float, ...] | None = None,
) -> Expert:
    """A version as a bank member (what the bank would hold if it were live)."""
    return Expert(
        adapter_id=adapter.id,
        adapter_name=adapter.name,
        kind="personal" if kind == "personal" else "task",
        version_id=version.id,
        version_number=version.number,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        rank=version.rank,
        routing_key=routing_key,
        routing_claim=routing_claim,
    )


def sub_experts(user_bank: ExpertSet, members: Sequence[Expert]) -> ExpertSet:
    """The user's experts (gate and user unchanged) with exactly ``members``, ordered as ``resolve_user_experts`` orders."""
    ordered = tuple(sorted(members, key=lambda m: (m.kind != "personal", m.adapter_name, m.adapter_id)))
    return ExpertSet(
        user_bank.tenant_id,
        user_bank.user_id,
        user_bank.external_id,
        ordered,
        user_bank.gate,
        experts_revision(ordered, user_bank.gate),
    )


def gated_experts(
    user_bank: ExpertSet,
    *,
    gate: Gate,
    subject: Expert | None,
    subject_handle: str,
    others: Sequence[Expert],
) -> GatedExperts:
    """The sub-bank of ``others`` plus ``subject`` (if any), with the handle of each member's loaded version."""
    bank = sub_experts(user_bank, [*others, *([] if subject is None else [subject])])
    handles = tuple(
        subject_handle if subject is not None and m.adapter_id == subject.adapter_id else member_handle(m)
        for m in bank.members
    )
    return GatedExperts(bank, gate, handles)


def matrix_columns(
    *,
    has_previous: bool,
    gated_previous: GatedExperts | None,
    gated_candidate: GatedExperts | None,
    others: Sequence[Expert],
) -> list[ColumnSpec]:
    """The matrix's columns in display order (see the module docstring)."""
    columns = [ColumnSpec(ColumnInfo(BASE, "base"))]
    if has_previous:
        columns.append(ColumnSpec(ColumnInfo(PREVIOUS, "previous"), routes=((PREVIOUS_HANDLE, 1.0),)))
    columns.append(ColumnSpec(ColumnInfo(CANDIDATE, "candidate"), routes=((CANDIDATE_HANDLE, 1.0),)))
    if gated_previous is not None:
        columns.append(ColumnSpec(ColumnInfo(GATED_PREVIOUS, "gated-previous"), gated=gated_previous))
    if gated_candidate is not None:
        columns.append(ColumnSpec(ColumnInfo(GATED_CANDIDATE, "gated-candidate"), gated=gated_candidate))
    for m in others:
        label = member_label(m)
        columns.append(
            ColumnSpec(ColumnInfo(f"alone:{label}", "alone", label), routes=((member_handle(m), 1.0),))
        )
    for m in others:
        label = member_label(m)
        mixture = ((CANDIDATE_HANDLE, 0.5), (member_handle(m), 0.5))
        columns.append(ColumnSpec(ColumnInfo(f"pair:{label}", "pair", label), routes=mixture))
    return columns


__all__ = [
    "CANDIDATE_HANDLE",
    "PREVIOUS_HANDLE",
    "gated_experts",
    "member_handle",
    "matrix_columns",
    "sub_experts",
    "version_member",
]
