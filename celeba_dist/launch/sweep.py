"""``celeba-dist sweep``: many runs of a recipe as one SLURM job array.

Each member is a full run (the same :class:`~celeba_dist.launch.submit.TrainTask` as ``submit``,
requeue included) in its own folder ``RUN_DIR/<member>/``; ``RUN_DIR/sweep.json`` lists the
members with their overrides and job ids, and ``celeba-dist jobs --sweep NAME`` compares them.

    celeba-dist sweep --config smiling_simple_cnn --data shards --run-dir runs/lr \\
        --grid optim.lr=1e-3,3e-4,1e-4 data.batch_size=32,64 --gpus-per-node 1
    celeba-dist sweep ... --random 8 --range optim.lr=1e-5:1e-2:log optim.weight_decay=0:0.1
    celeba-dist sweep ... --variants all            # every shipped recipe once (or NAME,NAME)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from celeba_dist.config import add_set_argument
from celeba_dist.diskio import write_json
from celeba_dist.launch.status import SWEEP_FILE, record_job, sweep_table
from celeba_dist.launch.submit import (add_resource_arguments, build_executor, check_data, check_resumable,
                                       check_runs_free, controllers_ignore_sigint, log_folder, resolve_task,
                                       sbatch_refusal, sbatch_script, slurm_parameters, stopped_waiting,
                                       SubmitLocks, wait_for)


@dataclass(frozen=True)
class Member:
    name: str
    config: str
    overrides: list[str]


def split_values(text: str) -> list[str]:
    """``"1e-3,3e-4"`` → two values; commas inside brackets stay: ``"[32, 32],[64, 64]"`` → two."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if not all(values):
        raise ValueError(f"empty value in {text!r}")
    return values


def _key_value(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or "." not in key or not value:
        raise ValueError(f"{option} {item!r}: expected section.key=VALUES")
    return key.strip(), value


def _slug(key: str, value: str) -> str:
    """A folder-name piece: ``("data.image_size", "[32, 32]")`` → ``"image_size32x32"``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "", f"{key.rsplit('.', 1)[-1]}{value.replace(',', 'x')}")


def grid_members(config: str, grid: Sequence[str]) -> list[Member]:
    """The Cartesian product of ``key=v1,v2,...`` options, in the order given."""
    axes = [(key, split_values(values)) for key, values in (_key_value(g, "--grid") for g in grid)]
    members = []
    for i, combo in enumerate(itertools.product(*(values for _, values in axes))):
        pairs = list(zip((key for key, _ in axes), combo))
        name = "-".join([f"{i:02d}", *(_slug(k, v) for k, v in pairs)])
        members.append(Member(name, config, [f"{k}={v}" for k, v in pairs]))
    return members


def random_members(config: str, count: int, ranges: Sequence[str], *, seed: int) -> list[Member]:
    """``count`` draws of ``key=lo:hi`` (uniform; integers when both ends are) or ``key=lo:hi:log``."""
    rng = random.Random(seed)
    parsed = []
    for item in ranges:
        key, spec = _key_value(item, "--range")
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ValueError(f"--range {item!r}: expected key=LOW:HIGH or key=LOW:HIGH:log")
        lo, hi, log = float(parts[0]), float(parts[1]), len(parts) == 3
        if hi < lo or (log and lo <= 0):
            raise ValueError(f"--range {item!r}: need LOW <= HIGH (and LOW > 0 for log)")
        integer = not log and all(re.fullmatch(r"-?\d+", p) for p in parts[:2])
        parsed.append((key, lo, hi, log, integer))
    members = []
    for i in range(count):
        pairs = []
        for key, lo, hi, log, integer in parsed:
            if integer:
                value = str(rng.randint(int(lo), int(hi)))
            elif log:
                value = f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}"
            else:
                value = f"{rng.uniform(lo, hi):.3g}"
            pairs.append((key, value))
        name = "-".join([f"{i:02d}", *(_slug(k, v) for k, v in pairs)])
        members.append(Member(name, config, [f"{k}={v}" for k, v in pairs]))
    return members


def variant_members(variants: str) -> list[Member]:
    """``all`` (every shipped recipe) or ``NAME,NAME``: one member per recipe."""
    from celeba_dist.config import shipped_recipes

    names = shipped_recipes() if variants == "all" else split_values(variants)
    return [Member(name, name, []) for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celeba-dist sweep", description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", default=None, help="the recipe every member starts from (not with --variants)")
    parser.add_argument("--data", required=True, type=Path, help="the packed shards folder")
    parser.add_argument("--run-dir", required=True, type=Path,
                        help="the sweep's folder; members go in RUN_DIR/<member>/")
    add_set_argument(parser, "overrides shared by all members")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--grid", nargs="+", action="extend", metavar="KEY=V1,V2", help="every combination of the values")
    mode.add_argument("--random", type=int, metavar="N", help="N random draws from --range")
    mode.add_argument("--variants", metavar="all|NAME,NAME", help="one member per recipe")
    parser.add_argument("--range", nargs="+", action="extend", default=[], metavar="KEY=LOW:HIGH[:log]", help="for --random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random draws (default 0)")
    parser.add_argument("--array-parallelism", type=int, default=None, help="members running at once (default all)")
    add_resource_arguments(parser)
    return parser


def members_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Member]:
    if args.variants:
        if args.config:
            parser.error("--variants picks the recipes itself: leave out --config")
        return variant_members(args.variants)
    if not args.config:
        parser.error("--config is required with --grid and --random")
    if args.random is not None:
        if args.random < 1 or not args.range:
            parser.error("--random N needs N >= 1 and at least one --range")
        return random_members(args.config, args.random, args.range, seed=args.seed)
    return grid_members(args.config, args.grid)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from celeba_dist.config import ConfigError

    try:
        members = members_from_args(parser, args)
        resolved = [resolve_task(m.config, [*args.set, *m.overrides], args.data, args.run_dir / m.name)
                    for m in members]
        sweep_dir = args.run_dir.resolve()
        params = slurm_parameters(args, job_name=args.job_name or sweep_dir.name)
        if args.array_parallelism:
            params["array_parallelism"] = args.array_parallelism
        folder = log_folder(sweep_dir, local=args.local)
        if args.dry_run and args.local:
            parser.error("--dry-run prints the sbatch script: it has no meaning with --local")
        if args.dry_run:
            for member in members:
                print(f"# {member.name}: --config {member.config} --set {' '.join([*args.set, *member.overrides])}")
            print(sbatch_script(params, folder, array_size=len(members)))
            return 0
        stale_s, member_dirs = resolved[0][1].run.lock_stale_s, [cfg.run_dir for _, cfg in resolved]
        locks = SubmitLocks([sweep_dir, *member_dirs], stale_s=stale_s)  # the sweep's folder: its sweep.json
        with locks.released_on_failure():
            check_runs_free(sweep_run_dirs(sweep_dir, member_dirs), stale_s=stale_s)
            check_data(args.data)
            for _, member_cfg in resolved:
                check_resumable(member_cfg)
            max_requeues = resolved[0][1].run.max_requeues
            executor = build_executor(args, folder, params=params, max_requeues=max_requeues)
            with sbatch_refusal(folder), controllers_ignore_sigint(local=args.local), executor.batch():
                jobs = [executor.submit(task) for task, _ in resolved]
    except (ConfigError, ValueError, OSError) as exc:
        print(f"celeba-dist sweep: error: {exc}", file=sys.stderr)
        return 2
    try:
        for member, job in zip(members, jobs):
            record_job(sweep_dir / member.name, "submitted", job_id=job.job_id, sweep=sweep_dir.name,
                       executor="local" if args.local else "slurm", log_dir=str(job.paths.folder))
        write_sweep(sweep_dir, args, members, [job.job_id for job in jobs])
    finally:
        locks.release(failed=False)
    print(f"submitted {len(jobs)} member(s) as job array {jobs[0].job_id.split('_')[0]} in {sweep_dir}")
    print(f"  status:      celeba-dist jobs --run-dir {sweep_dir.parent} --sweep {sweep_dir.name}")
    print(f"  TensorBoard: tensorboard --logdir {sweep_dir}")
    if not args.wait:
        return 0
    try:
        results = wait_for(jobs)
    except KeyboardInterrupt:
        return stopped_waiting(jobs, f"celeba-dist jobs --run-dir {sweep_dir.parent} --sweep {sweep_dir.name}")
    print(sweep_table(sweep_dir)[0])
    return 0 if all(r is not None and r["status"] == "completed" for r in results) else 1


def sweep_run_dirs(sweep_dir: Path, member_dirs: list[Path]) -> list[Path]:
    """The folders a new sweep in ``sweep_dir`` must find free: its members', and those of the
    ``sweep.json`` it would overwrite (whose members may have other names), so that an active
    sweep keeps its table."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return member_dirs
    try:
        old = [Path(m["run_dir"]) for m in json.loads(path.read_text())["members"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc!r}); repair it or move it aside") from None
    return [*member_dirs, *(d for d in old if d not in member_dirs)]


def write_sweep(sweep_dir: Path, args: argparse.Namespace, members: list[Member], job_ids: list[str]) -> None:
    sweep: dict[str, Any] = {
        "name": sweep_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "variants" if args.variants else "random" if args.random is not None else "grid",
        "config": args.config,
        "data": str(args.data.resolve()),
        "shared_overrides": list(args.set),
        "members": [{**asdict(m), "run_dir": str(sweep_dir / m.name), "job_id": j} for m, j in zip(members, job_ids)],
    }
    write_json(sweep_dir / SWEEP_FILE, sweep)
