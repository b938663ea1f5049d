"""Fixtures for the routing tests that train their adapters: the unit routing tests' small world and registry
over the real databases and a local blob directory (tests/unit/routing/routing_helpers.py)."""

from tests.unit.routing.routing_helpers import registry, world  # noqa: F401  (fixtures)
