"""The SLURM launch layer: env translation (pure), sbatch scripts, and jobs on the real test cluster.

Tests marked ``slurm`` run on the two-node cluster of ``tests/slurm/start_cluster.sh`` (see
tests/conftest.py for how they find it and when they skip).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit
import torch
import torch.distributed as dist

from celeba_dist.launch import cluster_env
from celeba_dist.launch.cluster_env import (expand_nodelist, expand_tasks_per_node, from_environ, master_port)
from celeba_dist.launch.submit import main as submit_main, parse_slurm_options

# The stand-in task below runs on the cluster's nodes, where this test module is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
# cluster_env: SLURM variables → torch.distributed variables (no cluster needed)


@pytest.mark.parametrize("nodelist, hosts", [
    ("n[1-2]", ["n1", "n2"]),
    ("n1", ["n1"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node-[8-10]", ["node-8", "node-9", "node-10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a,b[0-1],c", ["a", "b0", "b1", "c"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("text, counts", [
    ("2(x3)", [2, 2, 2]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("4", [4]),
    ("1,2", [1, 2]),
])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


def test_bad_formats_are_errors():
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(3)")
    with pytest.raises(ValueError):
        expand_nodelist("n[5-2]")


def test_master_port_from_job_id():
    assert master_port("123") == 20123
    assert master_port(20000 + 77) == 20077
    assert all(20000 <= master_port(j) < 40000 for j in (0, 1, 19999, 10**9 + 7))
    assert master_port("1001") != master_port("1002")  # two jobs sharing a node


def _slurm_env(**extra: str) -> dict[str, str]:
    """A task of a 3-node job with 2, 2 and 1 tasks per node (SLURM's own formats)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NTASKS": "5", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-08],cpu3",
           "SLURM_TASKS_PER_NODE": "2(x2),1"}
    env.update(extra)
    return env


def test_from_environ_slurm():
    c = from_environ(_slurm_env())
    assert (c.rank, c.world_size, c.local_rank, c.local_world_size) == (3, 5, 1, 2)
    assert (c.node_rank, c.num_nodes, c.master_addr, c.master_port) == (1, 3, "gpu07", 24242)
    assert c.scheduler == "slurm" and c.restart_count == 0
    assert c.torch_env() == {"RANK": "3", "WORLD_SIZE": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                             "NODE_RANK": "1", "GROUP_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "24242"}


def test_from_environ_uneven_last_node_and_requeue():
    c = from_environ(_slurm_env(SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_RESTART_COUNT="2"))
    assert (c.rank, c.local_rank, c.local_world_size, c.node_rank, c.restart_count) == (4, 0, 1, 2, 2)


def test_from_environ_prefers_the_step():
    # srun -N1 -n1 inside a 3-node allocation: the step, not the job, is the world
    c = from_environ(_slurm_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="1",
                                SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="gpu08",
                                SLURM_STEP_TASKS_PER_NODE="1"))
    assert (c.world_size, c.num_nodes, c.local_world_size, c.master_addr) == (1, 1, 1, "gpu08")


def test_from_environ_ntasks_per_node_only():
    env = _slurm_env(SLURM_NTASKS_PER_NODE="4", SLURM_NTASKS="8", SLURM_JOB_NODELIST="n[1-2]")
    del env["SLURM_TASKS_PER_NODE"]
    assert from_environ(env).local_world_size == 4


def test_from_environ_local_and_plain():
    local = from_environ({"SUBMITIT_LOCAL_JOB_ID": "31337", "SUBMITIT_LOCAL_GLOBALID": "1",
                          "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2"})
    assert (local.rank, local.world_size, local.local_world_size, local.master_addr) == (1, 2, 2, "127.0.0.1")
    assert local.master_port == master_port(31337) and local.scheduler == "local"
    plain = from_environ({})
    assert (plain.rank, plain.world_size, plain.scheduler) == (0, 1, "none")


def test_apply_overwrites_stale_values_and_sets_threads():
    env = {**_slurm_env(), "MASTER_PORT": "29500", "SLURM_CPUS_PER_TASK": "6"}
    cluster_env.apply(env)
    assert env["MASTER_PORT"] == "24242" and env["RANK"] == "3" and env["OMP_NUM_THREADS"] == "6"


# ---------------------------------------------------------------------------------------------
# sbatch scripts (no cluster needed)


def _submit_args(tmp_path, *extra: str) -> list[str]:
    return ["--config", "smiling_simple_cnn", "--data", str(tmp_path / "shards"), "--run-dir",
            str(tmp_path / "run"), *extra]


def _dry_run(capsys, tmp_path, *extra: str) -> str:
    assert submit_main([*_submit_args(tmp_path, *extra), "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_cpu_script(capsys, tmp_path):
    script = _dry_run(capsys, tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--time", "30", "--mem", "3G",
                      "--partition", "debug", "--job-name", "smile", "--slurm", "mail-type=END", "overcommit",
                      "--set", "optim.lr=3e-4")
    lines = set(script.splitlines())
    assert script.startswith("#!/bin/bash")
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=30",
                     "#SBATCH --mem=3G", "#SBATCH --partition=debug", "#SBATCH --job-name=smile",
                     "#SBATCH --signal=USR2@90", "#SBATCH --requeue", "#SBATCH --mail-type=END",
                     "#SBATCH --overcommit"):
        assert expected in lines, expected
    assert not any("gpus" in line for line in lines)  # --gpus-per-node 0: no GPU request at all
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "submitit.core._submit" in srun
    assert str(tmp_path / "run" / "slurm") in script
    assert not (tmp_path / "run").exists()  # a dry run changes nothing


def test_dry_run_gpu_script(capsys, tmp_path):
    script = _dry_run(capsys, tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "10",
                      "--account", "vision", "--qos", "high", "--constraint", "a100", "--exclusive")
    lines = set(script.splitlines())
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --cpus-per-task=10", "#SBATCH --account=vision", "#SBATCH --qos=high",
                     "#SBATCH --constraint=a100", "#SBATCH --exclusive"):
        assert expected in lines, expected


def test_dry_run_rejects_bad_config(capsys, tmp_path):
    assert submit_main([*_submit_args(tmp_path, "--set", "optim.lrr=1"), "--dry-run"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_parse_slurm_options():
    assert parse_slurm_options(["mail-type=END", "--overcommit", "comment=a=b"]) == {
        "mail-type": "END", "overcommit": True, "comment": "a=b"}
    with pytest.raises(ValueError):
        parse_slurm_options(["=x"])


# ---------------------------------------------------------------------------------------------
# The real two-node cluster


@pytest.mark.slurm
def test_srun_spans_both_nodes(slurm_cluster):
    out = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=1", "bash", "-c",
                          "echo $SLURMD_NODENAME $SLURM_PROCID"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert sorted(out.split()) == sorted(["n1", "0", "n2", "1"])


@pytest.mark.slurm
def test_dry_run_script_is_accepted_by_sbatch(slurm_cluster, capsys, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(_dry_run(capsys, tmp_path, "--nodes", "2", "--gpus-per-node", "0", "--time", "5"))
    # --test-only: sbatch validates the script against the cluster and schedules nothing
    proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr


def allreduce_task() -> dict:
    """Stand-in for training: the launcher's env translation, then a gloo all-reduce over all tasks."""
    cluster = cluster_env.apply()
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    try:
        total = torch.tensor([float(cluster.rank + 1)])
        dist.all_reduce(total)
        nodes: list = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, os.environ["SLURMD_NODENAME"])
    finally:
        dist.destroy_process_group()
    return {"rank": cluster.rank, "local_rank": cluster.local_rank, "world_size": cluster.world_size,
            "node": os.environ["SLURMD_NODENAME"], "master": f"{cluster.master_addr}:{cluster.master_port}",
            "sum": total.item(), "nodes": nodes}


@pytest.mark.slurm
def test_two_node_submitit_allreduce(slurm_cluster, slurm_folder):
    executor = submitit.AutoExecutor(folder=slurm_folder / "%j", cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=2, cpus_per_task=1, timeout_min=2, name="allreduce",
                               slurm_additional_parameters={"requeue": True})
    job = executor.submit(allreduce_task)
    results = job.results()  # one per task, rank order
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert {r["sum"] for r in results} == {1.0 + 2.0 + 3.0 + 4.0}
    assert [r["node"] for r in results] == ["n1", "n1", "n2", "n2"]
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1]
    assert {r["master"] for r in results} == {f"n1:{master_port(job.job_id)}"}
    assert results[0]["nodes"] == ["n1", "n1", "n2", "n2"]  # the collective saw both nodes
    assert _final_state(job) == "COMPLETED"  # read from sacct: accounting works


def _final_state(job: submitit.Job, timeout_s: float = 30) -> str:
    """The job's state once SLURM has finished it (results can land before the step ends)."""
    deadline = time.monotonic() + timeout_s
    state = job.get_info(mode="force").get("State", "UNKNOWN")
    while state in ("RUNNING", "COMPLETING", "PENDING", "UNKNOWN") and time.monotonic() < deadline:
        time.sleep(1)
        state = job.get_info(mode="force").get("State", "UNKNOWN")
    return state
