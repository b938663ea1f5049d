"""The adapter registry: immutable versions, the movable ``live`` alias with history, rollback, lineage, GC.

It sits on the store (SQL rows, blobs) and below the ML layer: it knows the PEFT file format
(``peft_format``, torch-free) and the archive format (``archive``) but never loads a model. ``versions``
holds ``Registry``, the version API (register, fetch, promote, rollback, statuses); ``lineage`` answers
"where did this version come from"; ``validation`` is every check run before a write; ``gc`` collects
blobs nothing references; ``verify`` re-hashes the blobs versions point at (what to do about a bad one is
``lorafleet.workflows.blob_verify``'s). ``Registry`` and the archive functions are importable from here.
"""

from lorafleet.registry.archive import pack_adapter_archive, unpack_adapter_archive
from lorafleet.registry.lineage import JobSummary, Lineage, LineageNode
from lorafleet.registry.versions import Registry

__all__ = [
    "JobSummary",
    "Lineage",
    "LineageNode",
    "Registry",
    "pack_adapter_archive",
    "unpack_adapter_archive",
]
