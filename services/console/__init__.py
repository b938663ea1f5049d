"""The web console: server-rendered pages over the API's services, mounted by the API at ``/console``."""

from services.console.app import create_console

__all__ = ["create_console"]
