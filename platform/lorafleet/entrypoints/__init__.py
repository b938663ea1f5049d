"""Entry points: the ``lorafleet`` command line (``cli``, with its admin, job, worker and serve-deploy commands)
and what every process started from a command line shares (``process``: logging set-up, stop signals). This is
the top layer: it builds what it needs through ``lorafleet.platform.Platform`` and calls into the library;
nothing in the library imports it.
"""
