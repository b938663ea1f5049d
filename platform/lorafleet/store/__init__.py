"""Persistence: the SQL metadata store (``store.sql``) and the content-addressed object store (``store.blob``)."""
