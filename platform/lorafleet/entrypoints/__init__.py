"""Entry points: the ``lorafleet`` command line (``cli``, with its admin, job and worker commands) and the
helpers every long-running process shares (``signals``). This is the top layer: it builds what it needs through
``lorafleet.platform.Platform`` and calls into the library; nothing in the library imports it.
"""
