"""Fixtures for the routing tests: a registry over the real databases (local blobs) and a small world
(defined in routing_helpers, which the integration tier's routing tests share)."""

from routing_helpers import registry, world  # noqa: F401  (fixtures)
