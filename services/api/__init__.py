"""The lorafleet HTTP API (FastAPI): ``create_app(settings, options=ApiOptions(...))``, or run it with
``python -m services.api --host 127.0.0.1 --port 8000``.

Routes call the library (``lorafleet``); one set of handlers (``errors``) turns library errors into HTTP
statuses; request and response bodies are ``lorafleet.sdk.schemas``, shared with the SDK. ``runtime`` holds the
process's services and, when asked, the scheduler loop and Ray trainer actors (``lorafleet serve``).
"""
