"""What a ``kill -9`` leaves on the machine is cleaned up at the next start (finding 11 of issue 18): Ray's
DashboardAgent and RuntimeEnvAgent of the dead local Ray session (they outlived the kill by minutes) and the
``lorafleet-job-*`` scratch folders of dead processes. A healthy session running beside it, on the same data dir
and the same temp dir, keeps every process and folder.

Real processes throughout: each Ray session is ``init_ray`` in a subprocess of its own holding a job folder
(``owned_tempdir``), as a service with a trainer does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from service_process import REPO_ROOT, fault_recovery

from lorafleet.config import load_settings
from lorafleet.runtime.ray_runtime import SESSION_MARKER, clean_up_after_crash
from lorafleet.workflows.workdirs import OWNER_FILE, owned_tempdir, remove_stale_tempdirs

_SESSION = textwrap.dedent(
    """
    import json, sys, time
    from lorafleet.config import load_settings
    from lorafleet.runtime.ray_runtime import init_ray
    from lorafleet.workflows.workdirs import owned_tempdir

    init_ray(load_settings(data_dir=sys.argv[1], ray_address="", ray_num_cpus=1))
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    with owned_tempdir("lorafleet-job-7-") as folder:
        print(json.dumps({"session": session, "folder": str(folder)}), flush=True)
        time.sleep(600)
    """
)

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


class RaySession:
    """``init_ray`` in a subprocess, holding a job folder, until killed (started at once; ``wait_ready``)."""

    def __init__(self, script: Path, data_dir: Path, tmp_dir: Path) -> None:
        env = {
            **os.environ,
            "TMPDIR": str(tmp_dir),
            "RAY_TMPDIR": "/tmp",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.session = self.folder = Path()

    def wait_ready(self) -> RaySession:
        """Wait until Ray runs and the job folder is made (the process prints both)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the Ray session did not start (exit {self.proc.poll()})"
        ready = json.loads(line)
        self.session, self.folder = Path(ready["session"]), Path(ready["folder"])
        return self

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Ray's handler shuts its session down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return ""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[list[RaySession]]:
    made: list[RaySession] = []
    yield made
    for s in made:
        s.stop()
        for p in _alive(s.descendants() if s.proc.poll() is None else []):
            p.kill()


def test_a_crashed_sessions_agents_and_folders_go_a_healthy_ones_stay(
    tmp_path: Path, sessions: list[RaySession]
) -> None:
    data_dir, tmp_dir = tmp_path / "data", tmp_path / "tmp"
    data_dir.mkdir()
    tmp_dir.mkdir()
    script = tmp_path / "session.py"
    script.write_text(_SESSION)
    crashed, healthy = RaySession(script, data_dir, tmp_dir), RaySession(script, data_dir, tmp_dir)
    sessions += [crashed, healthy]
    crashed.wait_ready(), healthy.wait_ready()
    assert (crashed.session / SESSION_MARKER).exists() and (healthy.session / SESSION_MARKER).exists()
    crashed_procs, healthy_procs = crashed.descendants(), healthy.descendants()
    crashed_agents = [p for p in crashed_procs if _cmd(p) in AGENTS]
    assert sorted(_cmd(p) for p in crashed_agents) == sorted(AGENTS)
    raylet = next(p for p in crashed_procs if os.path.basename(_cmd(p).split(" ")[0]) == "raylet")

    os.kill(crashed.proc.pid, signal.SIGKILL)
    crashed.proc.wait(timeout=30)
    killed_at = time.monotonic()
    deadline = killed_at + 60
    while _alive([raylet]):  # the raylet fate-shares with the driver; its agents do not, for minutes
        assert time.monotonic() < deadline, "the crashed session's raylet is still running"
        time.sleep(0.1)
    orphans = _alive(crashed_agents)
    assert orphans, "the agents exited with their raylet: nothing left to clean up"
    assert crashed.folder.is_dir() and healthy.folder.is_dir()

    started = time.monotonic()
    clean_up_after_crash(load_settings(data_dir=data_dir, ray_address=""), scratch_dir=tmp_dir)
    cleaned_s = time.monotonic() - started

    assert _alive(orphans) == [], [_cmd(p) for p in _alive(orphans)]
    assert not crashed.folder.exists()
    assert healthy.folder.is_dir() and (healthy.folder / OWNER_FILE).exists()
    assert _alive(healthy_procs) == healthy_procs  # every process of the healthy session still runs
    assert healthy.proc.poll() is None
    fault_recovery(
        "kill9-ray-leftovers",
        orphaned_agents=len(orphans),
        raylet_gone_after=started - killed_at,
        cleanup=cleaned_s,
    )


def test_only_folders_of_dead_owners_are_swept(tmp_path: Path) -> None:
    """A dead owner's folder (lock free), one whose owner died before locking it (its pid not running), a live
    folder (this process's), one of an earlier version (no pid in the name) and one another prefix: only the
    first two go."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"lorafleet-job-3-pid{dead_pid}-abc"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(f"{dead_pid}\n")
    (stale / "user-1").mkdir()
    unlocked = tmp_path / f"lorafleet-import-4-pid{dead_pid}-def"
    unlocked.mkdir()
    legacy = tmp_path / "lorafleet-job-5-xyz"
    legacy.mkdir()
    other = tmp_path / f"lorafleet-qa-pid{dead_pid}-ghi"
    other.mkdir()
    with owned_tempdir("lorafleet-job-6-", dir=tmp_path) as live:
        removed = remove_stale_tempdirs(tmp_path)
        assert sorted(removed) == sorted([stale, unlocked])
        assert live.is_dir() and legacy.is_dir() and other.is_dir()
    assert not live.exists()
