"""Whose feedback a training run learns from: a user, or a shared task's dataset.

A shared task's dataset is stored as a ``users`` row whose ``external_id`` is ``TASK_SUBJECT_PREFIX`` + the
task's name: real users' ids are printable, so the two can never collide. ``Subject`` is the one place that
encodes and decodes that convention; every other module asks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.domain.enums import SubjectKind

#: ``users.external_id`` of a task's subject row: a non-printable prefix no real user id can start with
TASK_SUBJECT_PREFIX = "\x1ftask:"
#: how logs, results and the API name a task subject: ``task:<name>``
TASK_LABEL_PREFIX = "task:"


@dataclass(frozen=True)
class Subject:
    """A user (``name`` is their external id) or a shared task (``name`` is the task's name)."""

    kind: SubjectKind
    name: str

    @classmethod
    def user(cls, external_id: str) -> Subject:
        return cls(SubjectKind.USER, external_id)

    @classmethod
    def task(cls, name: str) -> Subject:
        return cls(SubjectKind.TASK, name)

    @classmethod
    def from_row(cls, kind: str, external_id: str) -> Subject:
        """Decode a subject row from its ``kind`` column and ``external_id`` (any kind but ``task``: a user)."""
        if kind == SubjectKind.TASK:
            return cls.task(external_id.removeprefix(TASK_SUBJECT_PREFIX))
        return cls.user(external_id)

    @classmethod
    def from_external_id(cls, external_id: str) -> Subject:
        """Decode a ``users.external_id``: a task subject's row, or a user's."""
        if external_id.startswith(TASK_SUBJECT_PREFIX):
            return cls.task(external_id.removeprefix(TASK_SUBJECT_PREFIX))
        return cls.user(external_id)

    @property
    def is_task(self) -> bool:
        return self.kind == SubjectKind.TASK

    @property
    def task_name(self) -> str | None:
        """The task's name for a task subject, else None."""
        return self.name if self.is_task else None

    @property
    def external_id(self) -> str:
        """The ``users.external_id`` that stores this subject."""
        return TASK_SUBJECT_PREFIX + self.name if self.is_task else self.name

    @property
    def label(self) -> str:
        """How logs, results and the API name the subject: the user's id, or ``task:<name>``."""
        return TASK_LABEL_PREFIX + self.name if self.is_task else self.name


def task_subject_id(task_name: str) -> str:
    """The ``users.external_id`` of a task's subject row (``Subject.task(name).external_id``)."""
    return Subject.task(task_name).external_id


__all__ = ["TASK_LABEL_PREFIX", "TASK_SUBJECT_PREFIX", "Subject", "task_subject_id"]
