"""Entry points: the ``lorafleet`` command line. ``cli`` is the parser; each command's handler lives in
``admin``, ``db``, ``jobs``, ``workers`` or ``serve_deploy`` (``lorafleet demo``'s in ``lorafleet.demo``) and is
imported only when its command runs. Logging set-up and stop signals come from ``lorafleet.runtime.process``.
This is the top layer: it builds what it needs through ``lorafleet.platform.Platform`` and calls into the
library; nothing in the library imports it.
"""
