"""Persistence: the SQL metadata store (``store.sql``) and the content-addressed object store (``store.blob``).

Its room (docs/architecture.md): the layer above core and below everything else; the registry, workflows and
services use its functions and repositories. SQLAlchemy sessions and ORM rows belong inside it; a few still
cross (``Registry``'s ``session=`` parameters, ``FencedJob.session``), which issue 15 tracks.
"""
