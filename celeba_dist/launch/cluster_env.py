"""The cluster's view of a task turned into what torch.distributed and Accelerate read.

SLURM (or submitit's local executor) starts one process per task and describes it with its own
variables; ``torch.distributed``'s ``env://`` initialisation, and Accelerate on top of it, read
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`from_environ` is a pure function from one set to the other, so every
format SLURM uses can be tested without a cluster; :func:`apply` writes the result into
``os.environ`` of the running task.

One task per GPU (one per node on CPU-only partitions); the backend follows from the device:
Accelerate picks NCCL when CUDA is there and gloo with ``Accelerator(cpu=True)``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, MutableMapping

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclasses.dataclass(frozen=True)
class ClusterEnv:
    """One task's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str | None = None
    restart_count: int = 0
    scheduler: str = "none"  # slurm | local | none

    def torch_env(self) -> dict[str, str]:
        """The variables ``torch.distributed`` (``env://``) and Accelerate read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def master_port(job_id: str | int) -> int:
    """A port derived from the job id, so that jobs sharing a node do not collide.

    Array tasks have their own ``SLURM_JOB_ID``, so they get distinct ports too.
    """
    return PORT_BASE + int(job_id) % PORT_SPAN


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order (what ``scontrol show hostnames`` prints).

    ``"n[1-2]"`` → ``["n1", "n2"]``; ``"gpu[01-02,07],cpu5"`` → ``["gpu01", "gpu02", "gpu07", "cpu5"]``;
    ``"r[1-2]n[1-2]"`` → ``["r1n1", "r1n2", "r2n1", "r2n2"]``.
    """
    hosts: list[str] = []
    for group in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            suffixes = _expand_ranges(ranges) if ranges else [""]
            names = [name + literal + suffix for name in names for suffix in suffixes]
        hosts.extend(names)
    return hosts


def _expand_ranges(ranges: str) -> list[str]:
    """``"01-03,7"`` → ``["01", "02", "03", "7"]`` (zero padding kept)."""
    out: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            out.append(lo)
            continue
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise ValueError(f"cannot read the node range {part!r}")
        out.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return out


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM's per-node task counts: ``"2(x3),1"`` → ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot read the tasks-per-node list {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def from_environ(env: Mapping[str, str]) -> ClusterEnv:
    """Where this process sits in its job, read from SLURM's or submitit's local variables.

    Outside any scheduler, a single process: rank 0 of 1 on localhost.
    """
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        return _from_slurm(env)
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        ntasks = int(env.get("SUBMITIT_LOCAL_NTASKS", "1"))
        job_id = env["SUBMITIT_LOCAL_JOB_ID"]
        return ClusterEnv(rank=int(env["SUBMITIT_LOCAL_GLOBALID"]), world_size=ntasks,
                          local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", "0")), local_world_size=ntasks,
                          node_rank=0, num_nodes=1, master_addr="127.0.0.1", master_port=master_port(job_id),
                          job_id=job_id, scheduler="local")
    return ClusterEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1,
                      master_addr="127.0.0.1", master_port=master_port(0))


def _from_slurm(env: Mapping[str, str]) -> ClusterEnv:
    # The step's view first (srun inside an allocation may use fewer nodes or tasks than the job).
    def first(*names: str) -> str | None:
        return next((env[n] for n in names if env.get(n)), None)

    nodelist = first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = expand_nodelist(nodelist) if nodelist else []
    num_nodes = int(first("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or len(hosts) or 1)
    world_size = int(first("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or 1)
    node_rank = int(env.get("SLURM_NODEID", "0"))
    per_node = first("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        local_world_size = counts[node_rank] if node_rank < len(counts) else counts[-1]
    elif env.get("SLURM_NTASKS_PER_NODE"):
        local_world_size = int(env["SLURM_NTASKS_PER_NODE"])
    else:
        local_world_size = max(1, world_size // num_nodes)
    job_id = env["SLURM_JOB_ID"]
    return ClusterEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=world_size,
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        # rank 0 runs on the first node of the step
        master_addr=hosts[0] if hosts else "127.0.0.1",
        master_port=master_port(job_id),
        job_id=job_id,
        restart_count=int(env.get("SLURM_RESTART_COUNT", "0")),
        scheduler="slurm",
    )


def apply(environ: MutableMapping[str, str] | None = None) -> ClusterEnv:
    """Translate this task's scheduler variables and export them for torch.distributed/Accelerate.

    Values already set by the user (say ``MASTER_PORT``) are not kept: a stale value inherited
    from the submitting shell would point every job at the same port. ``OMP_NUM_THREADS``
    follows ``SLURM_CPUS_PER_TASK`` unless it is set.
    """
    environ = os.environ if environ is None else environ
    cluster = from_environ(environ)
    environ.update(cluster.torch_env())
    if "SLURM_CPUS_PER_TASK" in environ:
        environ.setdefault("OMP_NUM_THREADS", environ["SLURM_CPUS_PER_TASK"])
    return cluster
