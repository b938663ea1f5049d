"""Runtime: the processes that run the workflows — Ray trainer actors and their pool, the Ray cluster
start-up, Ray Serve's deployment, and the job commands that drive the scheduler loop.

Everything Ray-specific lives here and nowhere below: ``ray_runtime`` (starting Ray, the trainer actor that
wraps ``lorafleet.jobs.JobWorker`` with the ``train``, ``qa`` and ``import`` handlers of
``lorafleet.workflows``), ``trainer_pool`` (a pool of those actors), ``ray_serve`` (the Serve deployment
around ``lorafleet.serving``'s engine) and ``job_commands`` (submitting, ticking and watching jobs for the
CLI). The entry points (``services``, the CLI, the demo) import from here; nothing in the library below does.
Importing this package imports no Ray; the modules import it when they run.
"""
