"""Shared fixtures.

SLURM: tests that need a cluster take the ``slurm_cluster`` fixture (and carry
``@pytest.mark.slurm``). It finds the cluster through the file
``$CELEBA_DIST_SLURM_DIR/slurm.conf`` (default ``/tmp/celeba-dist-slurm/slurm.conf``), written by
``tests/slurm/start_cluster.sh``, and exports ``SLURM_CONF`` for the session so that sbatch,
srun, sacct and submitit talk to it. Without a reachable cluster these tests skip, unless
``CELEBA_DIST_REQUIRE_SLURM=1`` (set by CI), where the skip becomes a failure. A start still in
progress (``.ci/slurm.sh``, which CI runs beside the Python install) is waited for first.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

_PACKAGE_LOGGER = logging.getLogger("celeba_dist")
_PRISTINE_LOGGING = (list(_PACKAGE_LOGGER.handlers), _PACKAGE_LOGGER.propagate, _PACKAGE_LOGGER.level)


@pytest.fixture(autouse=True)
def package_logging_restored():
    """Each test ends with the ``celeba_dist`` logger as the session began. An in-process command
    (``cli_main``, ``setup_logging``; in a test or a module-scoped fixture) replaces its handlers with a
    console bound to that test's captured stdout and a run folder's log file, and stops propagation;
    left in place they would write a later test's records into an earlier test's run folder."""
    yield
    handlers, propagate, level = _PRISTINE_LOGGING
    for handler in _PACKAGE_LOGGER.handlers:
        if handler not in handlers and isinstance(handler, logging.FileHandler):  # not pytest's own
            handler.close()
    _PACKAGE_LOGGER.handlers[:] = handlers
    _PACKAGE_LOGGER.propagate, _PACKAGE_LOGGER.level = propagate, level


SLURM_DIR = Path(os.environ.get("CELEBA_DIST_SLURM_DIR", "/tmp/celeba-dist-slurm"))
SLURM_NODES = ("n1", "n2")


def _pid_alive(pid_file: Path) -> bool:
    """Whether the process whose pid ``pid_file`` holds runs (a file still being written counts as running)."""
    try:
        text = pid_file.read_text().strip()
        if not text:
            return True
        os.kill(int(text), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _start_problem(folder: Path, timeout_s: float = 1500) -> str | None:
    """Wait for a cluster start in progress (``.ci/slurm.sh``, run by CI beside the Python install);
    why it failed, or None when none failed."""
    starting, rc = folder / "starting", folder / "start.rc"
    deadline = time.monotonic() + timeout_s
    while starting.exists() and _pid_alive(starting):
        if time.monotonic() > deadline:
            return f"the SLURM cluster's start ({starting}) still runs after {timeout_s:.0f} s"
        time.sleep(2)
    status = rc.read_text().strip() if rc.exists() else "0"
    if status != "0":
        return f".ci/slurm.sh exited {status} (CI keeps its output in /tmp/celeba-dist-slurm-start.log)"
    return None


def _cluster_problem(conf: Path) -> str | None:
    """Why the test cluster cannot be used, or None when it answers with both nodes up."""
    started = _start_problem(conf.parent)
    if started:
        return started
    missing = [tool for tool in ("sbatch", "srun", "sinfo", "sacct", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"SLURM client tools not installed ({', '.join(missing)}); run: sudo bash .ci/slurm.sh"
    if not conf.is_file():
        return f"no test cluster: {conf} does not exist; start one with: sudo bash tests/slurm/start_cluster.sh"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    restart = "restart it: sudo bash tests/slurm/start_cluster.sh"

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    try:
        # `scontrol ping` answers at once; sinfo retries for ~20 s when no controller runs.
        ping = run("scontrol", "ping")
        if ping.returncode != 0:
            said = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[0]
            return f"the controller of {conf} is down ({said}); {restart}"
        out = run("sinfo", "--noheader", "--Node", "--format=%N %t").stdout
    except subprocess.TimeoutExpired as exc:
        return f"the test cluster of {conf} does not answer ({exc}); {restart}"
    up = {line.split()[0] for line in out.splitlines()
          if line.split()[1] in ("idle", "mix", "alloc", "comp")}
    if not set(SLURM_NODES) <= up:
        return f"test cluster nodes not up (sinfo: {out.strip()!r}); {restart}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """The test cluster's slurm.conf, with ``SLURM_CONF`` exported for this session."""
    conf = SLURM_DIR / "slurm.conf"
    problem = _cluster_problem(conf)
    if problem:
        if os.environ.get("CELEBA_DIST_REQUIRE_SLURM") == "1":
            pytest.fail(f"{problem} (CELEBA_DIST_REQUIRE_SLURM=1: a missing cluster is a failure)")
        pytest.skip(problem)
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(conf))
    yield conf
    patch.undo()


@pytest.fixture(scope="session")
def slurm_folder(tmp_path_factory, slurm_cluster) -> Path:
    """A fresh submitit folder per session: job ids restart when the cluster's state is wiped,
    and submitit would read an old job's result from a reused folder."""
    return tmp_path_factory.mktemp("submitit")


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """300 synthetic images packed 16 per shard, made once per session and never changed: a test that
    damages shards takes a copy (``shards``)."""
    from shardkit import synthetic_shards

    return synthetic_shards(tmp_path_factory.mktemp("pristine"), num_images=300, samples_per_shard=16)


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    """A copy of the ``pristine`` shards this test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))
