"""Importing the SDK is light: no torch, no SQLAlchemy, no ray; ``lorafleet.Client`` loads it lazily."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_importing_the_sdk_and_lorafleet_client_imports_no_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        import lorafleet
        assert "lorafleet.sdk" not in sys.modules, "importing lorafleet must not load the SDK"
        from lorafleet import AsyncClient, Client
        import lorafleet.sdk
        from lorafleet.sdk import schemas, errors
        assert Client is lorafleet.sdk.Client and AsyncClient is lorafleet.sdk.AsyncClient
        heavy = sorted(m for m in ("torch", "sqlalchemy", "ray", "transformers") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"
