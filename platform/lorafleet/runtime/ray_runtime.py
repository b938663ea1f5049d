"""Jobs on Ray: trainer actors that keep the backbone loaded and pull ``train``, ``qa`` and ``import`` jobs from
the queue (QA and imports run on the same resident backbone and adapter bank, between training jobs).

The queue is the source of truth, not Ray: an actor *claims* a job under a lease, heartbeats while it trains,
and registers versions in the job's fenced transaction (``lorafleet.jobs.queue``). A job whose actor died (or
whose node was lost) is taken over by any actor once the lease expires, and a task Ray re-runs either finds the
job already finished or fails the lease check; the unique index on ``(adapter_id, job_id)`` backs this up. So
neither Ray's retries nor a lost node can produce a second version.

Placement (``TrainerPlacement``): each actor needs one CPU, one unit of the custom resource
``settings.trainer_resource`` (``lorafleet_trainer`` by default; give it to the nodes meant for training) and,
when it trains on CUDA, one GPU. ``device=auto`` means CUDA when the cluster has GPUs; an actor never uses a GPU
that Ray did not give it. Actors are spread over nodes (Ray's ``SPREAD``). An actor the cluster has no room for
waits, and the pool logs why every ``wait_log_seconds``.

``init_ray`` starts a local Ray bound to loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ray is
imported, no dashboard, the trainer resource declared so the embedded default places actors), or connects to
``LORAFLEET_RAY_ADDRESS``; nothing else changes between the two. First it cleans up after a predecessor that
crashed (``clean_up_after_crash``): a local Ray it starts is marked as this data dir's (``SESSION_MARKER`` in
Ray's session folder), and processes of such a session whose lorafleet process and raylet are both gone (Ray's
DashboardAgent and RuntimeEnvAgent outlive a ``kill -9`` by minutes) are ended; scratch folders of dead owners
are removed (``lorafleet.workflows.workdirs``), also by each trainer actor as it starts.

``TrainerHost`` is the plain object an actor wraps, usable in-process too;
``lorafleet.runtime.trainer_pool.TrainerPool`` runs many of them on Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.adapters import inject_bank
from lorafleet.backbone import load_backbone
from lorafleet.config import BUILTIN_PREFIX, Settings, load_settings
from lorafleet.domain.enums import JobState
from lorafleet.errors import ConfigError
from lorafleet.jobs.placement import TrainerPlacement, placement_capacity
from lorafleet.jobs.scheduler import TRAIN_JOB_KIND
from lorafleet.jobs.worker import JobWorker, run_until_idle
from lorafleet.platform import Platform
from lorafleet.qa.policy import QAPolicy
from lorafleet.runtime.process import end_processes
from lorafleet.training.config import TrainingConfig
from lorafleet.training.general_prompts import ANCHOR_PROMPTS
from lorafleet.training.overrides import check_bank_fits
from lorafleet.training.resident import Resident
from lorafleet.workflows.continual import ContinualTrainer
from lorafleet.workflows.import_jobs import IMPORT_JOB_KIND, ImportRunner, import_weight_bounds
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.qa_triggers import QA_JOB_KIND
from lorafleet.workflows.workdirs import remove_stale_tempdirs

if TYPE_CHECKING:
    from lorafleet.domain import Job

logger = logging.getLogger(__name__)

#: Ray's own driver-side log level: its start-up notices (token set-up, "SIGTERM handler is not set" when
#: started off the main thread) are not the service's business at INFO; its errors still show
RAY_LOG_LEVEL = logging.ERROR

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEFAULT_LOCAL_CPUS = 4
_SECRET_SETTINGS = frozenset({"admin_key"})
#: written by ``init_ray`` into the session folder of a local Ray it started: which process and data dir own it
SESSION_MARKER = "lorafleet-session.json"
#: a Ray session folder in a process's command line or open files (``<temp dir>/session_<date>_<time>_<pid>``;
#: never the ``session_latest`` link, which may name another session by now)
_SESSION_DIR = re.compile(r"(/\S*?/session_(?!latest/)[^/\s]+)/")


# --- Ray itself --------------------------------------------------------------------------------------------
def init_ray(settings: Settings) -> str:
    """Connect to ``settings.ray_address``, or start a local Ray on loopback; once per process (a second
    call returns the running one). Returns the cluster's GCS address."""
    if _on_loopback(settings.ray_address):
        os.environ[LOOPBACK_ENV] = "0"  # read by ray at import: node IP = 127.0.0.1
    import ray

    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    clean_up_after_crash(settings)
    with _keep_sigterm_handler():
        _start_or_connect(ray, settings)
    if not settings.ray_address:
        _mark_session(ray, settings)
    return str(ray.get_runtime_context().gcs_address)


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """``ray.init`` on the main thread replaces the SIGTERM handler with one that exits at once
    (``sys.exit``), so a service's graceful shutdown (the API's drain, the trainer actors' stop) never ran and
    the process died with a traceback. A handler the process had installed itself is put back; the default one
    is left to Ray (its exit still runs the atexit hooks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _start_or_connect(ray: Any, settings: Settings) -> None:
    if settings.ray_address:
        logger.info("connecting to the Ray cluster at %s", settings.ray_address)
        ray.init(address=settings.ray_address, logging_level=RAY_LOG_LEVEL)
    else:
        _require_loopback()
        cpus = settings.ray_num_cpus or min(os.cpu_count() or 1, DEFAULT_LOCAL_CPUS)
        # as many trainer units as CPUs: on one machine the CPU count is what limits the trainer actors
        resources = {settings.trainer_resource: float(cpus)} if settings.trainer_resource else {}
        logger.info("starting a local Ray on 127.0.0.1 with %d CPUs, resources %s", cpus, resources or "-")
        # address="local": always a new instance, never a cluster that happens to run on this machine (ray.init
        # would otherwise join one found through RAY_ADDRESS or the last `ray start`)
        ray.init(
            address="local",
            num_cpus=cpus,
            resources=resources,
            include_dashboard=False,
            logging_level=RAY_LOG_LEVEL,
        )


def _on_loopback(address: str) -> bool:
    """No address (a local Ray is started), or one on this machine's loopback (a local cluster)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return not address or host in ("127.0.0.1", "localhost")


def _require_loopback() -> None:
    """Refuse to start a local Ray that would listen beyond loopback (ray was imported too early)."""
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise ConfigError(
            f"ray was imported before {LOOPBACK_ENV}=0 was set, so a local Ray would not bind to 127.0.0.1; "
            "set it in the environment (or set LORAFLEET_RAY_ADDRESS to use a cluster)"
        )


# --- after a crash ------------------------------------------------------------------------------------------
def clean_up_after_crash(settings: Settings, *, scratch_dir: Path | None = None) -> None:
    """What a predecessor on this machine left when it was killed: processes of its local Ray session
    (``end_orphaned_ray_processes``) and its scratch folders under ``scratch_dir`` (default: the temp dir;
    ``remove_stale_tempdirs``). Logged at INFO when there was something; never raises (a failed clean-up must not
    stop a start)."""
    try:
        end_orphaned_ray_processes(settings.data_dir)
    except Exception:
        logger.warning("could not look for processes of a crashed local Ray", exc_info=True)
    try:
        remove_stale_tempdirs(scratch_dir)
    except Exception:
        logger.warning("could not look for scratch folders of crashed processes", exc_info=True)


def _mark_session(ray: Any, settings: Settings) -> None:
    """Record in the local Ray's session folder that this process (pid and start time) and data dir own it."""
    import psutil  # Ray's dependency, not lorafleet's

    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    session_dir = node.get_session_dir_path() if node is not None else None
    if not session_dir:
        return
    owner = {
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
        "data_dir": str(Path(settings.data_dir).resolve()),
    }
    try:
        (Path(session_dir) / SESSION_MARKER).write_text(json.dumps(owner), encoding="utf-8")
    except OSError as exc:
        logger.warning("could not mark the local Ray session %s: %s", session_dir, exc)


def end_orphaned_ray_processes(data_dir: Path) -> list[int]:
    """End the processes of this user's local Ray sessions that ``init_ray`` started for ``data_dir`` and that
    are dead: the lorafleet process that started the session is gone, and so is the session's raylet (its
    agents' parent). Returns the pids ended. A session of another data dir or user, one not started by lorafleet,
    and any session whose starter or raylet still runs are never touched."""
    import ray

    ray_dir = str(Path(ray.__file__).parent)  # ray's bundled psutil is importable from here on
    import psutil  # Ray's dependency, not lorafleet's

    data_dir = Path(data_dir).resolve()
    by_session: dict[str, list[Any]] = {}
    raylets: set[str] = set()
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            uids, cmdline = proc.info["uids"], proc.info["cmdline"] or []
            if uids is None or uids.real != os.getuid() or proc.pid == os.getpid():
                continue
            if not cmdline or not (cmdline[0].startswith("ray::") or ray_dir in " ".join(cmdline)):
                continue
            session = _session_of(proc, cmdline)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if session is None:
            continue
        by_session.setdefault(session, []).append(proc)
        if os.path.basename(cmdline[0]) == "raylet":
            raylets.add(session)
    ended: list[int] = []
    for session, procs in sorted(by_session.items()):
        if session in raylets or not _dead_session_of(Path(session), data_dir):
            continue
        names = sorted({_name(p) for p in procs})
        gone = end_processes(procs, grace_seconds=1.0)  # their session is dead: nothing of theirs to flush
        ended += gone
        if gone:
            logger.info(
                "ended %d process(es) left by a crashed local Ray session %s: %s",
                len(gone),
                session,
                ", ".join(names),
            )
    return ended


def _session_of(proc: Any, cmdline: list[str]) -> str | None:
    """The Ray session folder a process belongs to: named in its arguments (``--session-dir``, log and socket
    paths) or, for the agents (whose command line Ray replaces with ``ray::<name>``), by the logs it holds open."""
    for arg in cmdline:
        found = _SESSION_DIR.search(arg.split("=", 1)[-1] + "/")
        if found:
            return found.group(1)
    for opened in proc.open_files():
        found = _SESSION_DIR.search(opened.path)
        if found:
            return found.group(1)
    return None


def _dead_session_of(session: Path, data_dir: Path) -> bool:
    """The session was started by ``init_ray`` for ``data_dir`` and the process that started it is gone."""
    import psutil  # Ray's dependency, not lorafleet's

    try:
        owner = json.loads((session / SESSION_MARKER).read_text(encoding="utf-8"))
        pid, started, owner_dir = int(owner["pid"]), float(owner["started"]), Path(owner["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours (or unreadable): leave it
    if owner_dir != data_dir:
        return False
    try:
        return abs(psutil.Process(pid).create_time() - started) > 1.0  # its pid is someone else's now
    except psutil.NoSuchProcess:
        return True


def _name(proc: Any) -> str:
    try:
        cmdline = proc.cmdline()
    except Exception:
        return str(proc.pid)
    first = cmdline[0].strip() if cmdline else ""
    if first.startswith("ray::"):
        return f"{first} ({proc.pid})"
    script = next((a for a in cmdline[1:] if a.endswith(".py")), first)
    return f"{os.path.basename(script)} ({proc.pid})"


def actor_settings(settings: Settings) -> dict[str, Any]:
    """The settings an actor is built from, with every path and URL absolute (an actor's working
    directory is not the driver's) and without secrets it does not need."""
    data = settings.model_dump(mode="json", exclude=set(_SECRET_SETTINGS))
    data.update(
        data_dir=str(settings.data_dir.resolve()),
        database_url=settings.resolved_database_url,
        object_store_url=settings.resolved_object_store_url,
    )
    if not settings.backbone.startswith(BUILTIN_PREFIX):
        data["backbone"] = str(Path(settings.backbone).expanduser().resolve())
    return data


# --- one trainer ------------------------------------------------------------------------------------------
class TrainerHost:
    """A database and registry, the resident backbone with an adapter bank (``resident``, shared by the
    ``train``, ``qa`` and ``import`` handlers) and a ``JobWorker``: what one trainer actor holds for its whole
    life (the backbone is loaded once, here).

    The bank covers every linear layer up to ``LORAFLEET_TRAINER_MAX_RANK``, so it holds any job's config (each
    train job carries its own); ``training`` is the config of jobs queued without one.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        training: Mapping[str, Any] | None = None,
        qa_policy: Mapping[str, Any] | None = None,
        *,
        worker_id: str | None = None,
    ) -> None:
        remove_stale_tempdirs()  # a predecessor on this node killed mid-job left its folder
        self.settings = load_settings(**settings)
        if self.settings.trainer_threads is not None:  # else Ray's: one thread per CPU the actor takes
            import torch

            torch.set_num_threads(self.settings.trainer_threads)
        self.node_id = _ray_node_id()
        self.worker_id = worker_id or _new_worker_id(self.node_id)
        self.platform = Platform.from_settings(self.settings)
        self.db = self.platform.db
        self.registry = self.platform.registry
        config = TrainingConfig.from_mapping(training)
        self.resident = self._load_resident(config)
        self.trainer = ContinualTrainer(
            self.resident, config=config, promote_rule=self.settings.promote_rule, progress=self._on_progress
        )
        self.qa = self._build_qa(qa_policy)
        self.worker = JobWorker(
            self.platform.queue,
            worker_id=self.worker_id,
            handlers={
                TRAIN_JOB_KIND: self.trainer.run_job,
                QA_JOB_KIND: self.qa.run_job,
                IMPORT_JOB_KIND: self._build_imports().run_job,
            },
            lease_seconds=self.settings.lease_seconds,
        )
        self._run_lock = threading.Lock()
        self._stats: dict[str, Any] = {"jobs_done": 0, "jobs_succeeded": 0, "jobs_failed": 0}
        self._stats.update(backbone_loads=1, current_job=None, step=0, total_steps=0)
        self._stats["torch_threads"] = self.trainer_threads

    def _load_resident(self, config: TrainingConfig) -> Resident:
        """Load the backbone and inject a bank that holds ``config``'s adapters (any job's: see the class)."""
        import torch

        s = self.settings
        self.trainer_threads = torch.get_num_threads()
        started = time.monotonic()
        backbone = load_backbone(
            s.backbone, quantization=s.backbone_quantization, device=s.device, data_dir=s.data_dir
        )
        # every linear layer, up to the largest rank allowed: jobs bring their own configs (payload["training"])
        bank = inject_bank(
            backbone, target_modules="all-linear", n_slots=s.trainer_slots, max_rank=s.trainer_max_rank
        )
        check_bank_fits(config, max_rank=bank.max_rank, layer_names=list(bank.layers))
        self.backbone_load_seconds = time.monotonic() - started
        logger.info(
            "%s: backbone %s (%s) on %s loaded in %.1f s, %d slots, %d torch thread(s)",
            self.worker_id,
            s.backbone,
            s.backbone_quantization,
            backbone.device,
            self.backbone_load_seconds,
            s.trainer_slots,
            self.trainer_threads,
        )
        return Resident(self.db, self.registry, backbone, bank)

    def _build_imports(self) -> Any:
        """The ``import`` handler (PEFT adapters into task adapters) on the trainer's own backbone and bank."""
        return ImportRunner(
            self.resident,
            promote_rule=self.settings.promote_rule,
            weight_bounds=import_weight_bounds(self.settings.qa_policy),
        )

    def _build_qa(self, policy: Mapping[str, Any] | None) -> Any:
        """The ``qa`` handler on the trainer's own backbone and bank (QA evicts its slots after each job)."""
        return QARunner(
            self.resident,
            policy=QAPolicy.from_mapping({**self.settings.qa_policy, **(policy or {})}),
            prefix=self.trainer.prefix,  # holdout rows scored while training are reused by QA
            general_prompts=ANCHOR_PROMPTS,
            general_to_base=self.settings.gate_general_prompts,
        )

    # --- running jobs -------------------------------------------------------------------------------------
    def run_once(self) -> int | None:
        """Claim and run one job; its id, or None when no job was claimable."""
        with self._run_lock:
            job = self.worker.run_once()
            if job is not None:
                self._count(job)
            return None if job is None else job.id

    def run_until_idle(self, max_jobs: int | None = None) -> list[int]:
        """Run jobs until none is claimable (or ``max_jobs`` ran); the ids of the jobs run."""
        return run_until_idle(self.run_once, max_jobs=max_jobs)

    def _count(self, job: Job) -> None:
        self._stats["jobs_done"] += 1
        if job.state == JobState.SUCCEEDED:
            self._stats["jobs_succeeded"] += 1
        elif job.state == JobState.FAILED:
            self._stats["jobs_failed"] += 1
        self._stats.update(current_job=None, step=0, total_steps=0)

    def _on_progress(self, step: int, total: int, values: Mapping[str, float]) -> None:
        self._stats.update(step=step, total_steps=total, loss=values.get("loss"))

    # --- introspection ------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """Who and where this trainer is (answers while a job runs); ``node_id`` is its Ray node's."""
        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": self.node_id,
            "device": str(self.resident.backbone.device),
        }

    def stats(self) -> dict[str, Any]:
        """Jobs run, backbone loads (always 1: one per actor life) and the running job's progress."""
        running = self._run_lock.locked()
        return {**self._stats, "worker_id": self.worker_id, "busy": running}

    def close(self) -> None:
        self.platform.close()


def _ray_node_id() -> str | None:
    """The Ray node this process runs on when Ray is initialised here (always so in an actor), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().get_node_id())


def _new_worker_id(node_id: str | None) -> str:
    """``trainer-<host>[-node<8 hex of the Ray node>]-<pid>-<random>``: a job's ``lease_owner`` names the node."""
    node = f"-node{node_id[:8]}" if node_id else ""
    return f"trainer-{socket.gethostname()[:40]}{node}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def trainer_actor_class() -> Any:
    """``TrainerHost`` as a Ray actor class (built on first use, so importing this module needs no ray)."""
    import ray

    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(TrainerHost)
    return _ACTOR_CLASS


_ACTOR_CLASS: Any = None


__all__ = [
    "SESSION_MARKER",
    "TrainerHost",
    "TrainerPlacement",
    "actor_settings",
    "clean_up_after_crash",
    "end_orphaned_ray_processes",
    "init_ray",
    "placement_capacity",
    "trainer_actor_class",
]
