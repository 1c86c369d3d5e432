"""JPEGs damaged inside a shard (same size, so the start-up size check passes), on the real path.

Three kinds of damage, three behaviours: a JPEG libjpeg can decode only with a warning is counted
and named; one it cannot decode at all ends the run naming it, or is skipped, counted and named
with ``data.skip_bad_samples``; changed bits libjpeg cannot notice decode silently, and only the
shards' sha256 catches them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from celeba_dist.data.transforms import JpegWarning, decode_rgb
from test_failures import ENDS_WITHIN_S, assert_no_leftover_processes, run, train_cmd
from test_train import cpu_env

SUBSET = ["data.train_subset=240"]  # 15 full batches of 16: one epoch reads every one of these samples


def damage_jpeg(shard: Path, index: int, how) -> str:
    """Rewrite the ``index``-th JPEG of ``shard`` in place with ``how(bytes)`` (same length); its sample key."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][index]
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data)
        data = fh.read(member.size)
        damaged = how(data)
        assert len(damaged) == len(data) and damaged != data
        fh.seek(member.offset_data)
        fh.write(damaged)
    return member.name.split(".", 1)[0]


def zero_second_half(data: bytes) -> bytes:  # libjpeg: "Premature end of JPEG file", decodes the rest grey
    return data[: len(data) // 2] + b"\0" * (len(data) - len(data) // 2)


def wipe_header(data: bytes) -> bytes:  # not a JPEG any more: nothing can decode it
    return data[:2] + b"\0" * 200 + data[202:]


def flip_silently(data: bytes) -> bytes:
    """Flip one bit of the compressed data where libjpeg does not notice (the first such position)."""
    for pos in range(len(data) // 2, len(data) - 2):
        candidate = data[:pos] + bytes([data[pos] ^ 0x04]) + data[pos + 1:]
        with warnings.catch_warnings():
            warnings.simplefilter("error", JpegWarning)
            try:
                decode_rgb(candidate)
            except (JpegWarning, OSError, ValueError):
                continue
        return candidate
    raise AssertionError("no silent bit flip found")


def scalar(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def shard(shards: Path, split: str, index: int = 0) -> Path:
    return shards / split / f"celeba-{split}-{index:06d}.tar"


def test_jpegs_decoded_with_warnings_are_counted_named_and_on_tensorboard(shards, tmp_path):
    train_keys = [damage_jpeg(shard(shards, "train"), i, zero_second_half) for i in (3, 9)]
    val_key = damage_jpeg(shard(shards, "val"), 2, zero_second_half)
    run_dir = tmp_path / "run"
    proc, seconds = run(train_cmd(shards, run_dir, *SUBSET))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "decoded with a libjpeg warning" in log and "Premature end of JPEG file" in log
    assert any(f"sample {key} decoded with a libjpeg warning" in log for key in train_keys)
    assert f"1 sample(s) decoded with libjpeg warnings: {val_key}" in log
    assert scalar(run_dir, "data/jpeg_warnings")[-1] == (15, 2.0)  # the run's total, at its last step
    assert scalar(run_dir, "data/skipped_samples")[-1] == (15, 0.0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"][0]["jpeg_warnings"] == 2
    assert metrics["val"]["data_issues"] == {"skipped_samples": 0, "jpeg_warnings": 1, "skipped": [], "warned": [val_key]}
    assert metrics["val"]["mean"]["num_samples"] == 29  # still evaluated: only counted


def test_an_undecodable_sample_ends_the_run_naming_it_unless_skipping_was_asked_for(shards, tmp_path):
    train_key = damage_jpeg(shard(shards, "train"), 5, wipe_header)
    val_key = damage_jpeg(shard(shards, "val"), 1, wipe_header)
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, *SUBSET, processes=2)
    proc, seconds = run(cmd)
    assert proc.returncode != 0
    assert seconds < ENDS_WITHIN_S, f"took {seconds:.0f} s"
    assert f"cannot decode sample {train_key} of shard {shard(shards, 'train')}" in proc.stderr, proc.stderr[-3000:]
    assert "data.skip_bad_samples=true" in proc.stderr
    assert not (run_dir / "metrics.json").exists()
    assert_no_leftover_processes(run_dir)

    proc, _ = run([*cmd, "data.skip_bad_samples=true"])  # opted in: the same run goes on, skipping both
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("rank*.log"))
    assert f"skipped sample {train_key}, it cannot be decoded" in logs
    assert f"skipped sample {val_key}, it cannot be decoded" in logs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"][-1]["skipped_samples"] == 1
    assert scalar(run_dir, "data/skipped_samples")[-1][1] == 1.0
    assert metrics["val"]["data_issues"]["skipped"] == [val_key]
    assert metrics["val"]["mean"]["num_samples"] == 28  # 29 in the manifest, one skipped and said so

    out = tmp_path / "eval.json"  # a later evaluation of the checkpoint counts it the same way
    proc = subprocess.run([sys.executable, "-m", "celeba_dist.evaluate", "--run", str(run_dir), "--split", "val",
                           "--out", str(out)], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["data_issues"]["skipped"] == [val_key]


def test_silent_damage_decodes_without_a_word_and_only_sha256_catches_it(shards, tmp_path):
    target = shard(shards, "train", 2)
    with tarfile.open(target) as tar:
        original = tar.extractfile([m for m in tar.getmembers() if m.name.endswith(".jpg")][4]).read()
    key = damage_jpeg(target, 4, flip_silently)
    with tarfile.open(target) as tar:
        damaged = tar.extractfile(f"{key}.jpg").read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decodes with no warning at all, to different pixels
        assert not np.array_equal(np.asarray(decode_rgb(damaged)), np.asarray(decode_rgb(original)))

    proc, seconds = run([sys.executable, "-m", "celeba_dist.cli", "verify", str(shards)])
    assert proc.returncode == 1 and "celeba-train-000002.tar" in proc.stdout + proc.stderr
    assert "sha256" in proc.stdout + proc.stderr

    run_dir = tmp_path / "run"
    proc, seconds = run([*train_cmd(shards, run_dir), "data.check_shards=sha256"])
    assert proc.returncode == 1 and seconds < ENDS_WITHIN_S
    assert "train/celeba-train-000002.tar" in proc.stderr and "sha256" in proc.stderr, proc.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists()


def test_too_many_undecodable_samples_end_an_evaluation_even_when_skipping(shards):
    """``data.skip_bad_samples`` is for a few bad images: two are skipped and counted, but a shard whose
    JPEGs are mostly undecodable is damaged, and reading it ends naming the last one rather than
    evaluating whatever is left."""
    from celeba_dist.data.streams import DataError, ShardData, eval_stream, make_loader
    from celeba_dist.data.transforms import build_transform

    target = shard(shards, "val")
    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(16, 16), train=False)

    def evaluate():
        stream = eval_stream(data, "val", transform, batch_size=4, rank=0, world_size=1, skip_bad=True)
        return list(make_loader(stream, num_workers=0))

    keys = [damage_jpeg(target, i, wipe_header) for i in range(2)]
    batches = evaluate()
    assert [key for b in batches for key, _ in b.issues.skipped] == keys
    assert sum(len(b.keys) for b in batches) == data.split("val").num_samples - 2
    keys += [damage_jpeg(target, i, wipe_header) for i in range(2, 16)]  # the whole shard
    with pytest.raises(DataError, match=f"5 samples could not be decoded against 0 that could \\(the last: "
                                        f"{keys[4]} of {target}: .*the shards look damaged"):
        evaluate()
