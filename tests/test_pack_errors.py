"""Bad input: a clear error naming the file and line (or image), exit code 1, nothing half-written.

Images the packer can repair (grayscale, CMYK, PNG) are not errors: they are converted and counted.
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from celeba_dist.pack.cli import main, verify_main
from celeba_dist.shards.manifest import MANIFEST_NAME, load_manifest
from celeba_dist.workers import WorkerDiedError, ordered_map, process_pool
from helpers_celeba import append_line, read_split, replace_line, tiny_image, tree_state, write_celeba, write_hf_celeba

REPO = Path(__file__).resolve().parents[1]
ATTR = "list_attr_celeba.txt"


def run_failing(src: Path, out: Path, capsys, *extra: str) -> str:
    """Pack, expect failure; return stderr after checking nothing half-written is left."""
    code = main([str(src), str(out), "--workers", "1", *extra])
    err = capsys.readouterr().err
    assert code == 1, err  # the README promises 1 for bad input
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.rglob("*.tmp")) if out.exists() else True
    return err


def label_row(values: list[int], name: str) -> str:
    return f"{name} " + " ".join(f"{v:2d}" for v in values)


@pytest.fixture
def src(tmp_path):
    return write_celeba(tmp_path / "src", num_images=30)


def test_missing_image(src, tmp_path, capsys):
    src.image_path(6).unlink()  # 000007.jpg, on line 9 of the attribute file
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"{ATTR} line 9: image 000007.jpg not found" in err
    assert not (tmp_path / "out").exists()  # labels are validated before anything is written


def test_row_with_wrong_number_of_values(src, tmp_path, capsys):
    replace_line(src.file(ATTR), 5, label_row(list(src.labels[2][:39]), "000003.jpg"))
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"{ATTR} line 5 (000003.jpg): 39 values, expected 40" in err


def test_value_other_than_minus_one_or_one(src, tmp_path, capsys):
    values = list(src.labels[3])
    values[4] = 0
    replace_line(src.file(ATTR), 6, label_row(values, "000004.jpg"))
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"{ATTR} line 6 (000004.jpg): value '0' for Bald (column 6) is not -1 or 1" in err


def test_all_row_problems_are_listed_together(src, tmp_path, capsys):
    replace_line(src.file(ATTR), 5, label_row(list(src.labels[2][:39]), "000003.jpg"))
    src.image_path(20).unlink()
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert "2 problem(s)" in err and f"{ATTR} line 5" in err and f"{ATTR} line 23: image 000021.jpg" in err


def test_two_labelled_images_with_one_id_are_refused(tmp_path, capsys):
    """000005.jpg and 000005.png both labelled: a shard keys its samples by id, so the two would become one
    sample (or two with one key); the pack refuses before writing, naming the line."""
    src = write_celeba(tmp_path / "src", num_images=12, extras=False)
    (src.folder / "img_align_celeba" / "000005.png").write_bytes(tiny_image(99, fmt="PNG"))
    append_line(src.file(ATTR), label_row(list(src.labels[4]), "000005.png"))
    replace_line(src.file(ATTR), 1, "13")
    append_line(src.file("list_eval_partition.txt"), "000005.png 0")
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"{ATTR} line 15: 000005.png has the id of line 7" in err
    assert not (tmp_path / "out").exists()


def test_header_that_is_not_the_celeba_names(src, tmp_path, capsys):
    header = src.file(ATTR).read_text().splitlines()[1].replace("Male", "Man")
    replace_line(src.file(ATTR), 2, header)
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert (f"{ATTR} line 2: the header is not the 40 CelebA attribute names "
            "(unknown names ['Man']; missing ['Male'])") in err


def test_header_with_a_subset_needs_attributes(tmp_path, capsys):
    subset = write_celeba(tmp_path / "src", num_images=10, attributes=("Male", "Smiling"))
    err = run_failing(subset.source, tmp_path / "out", capsys)
    assert f"{ATTR} line 2" in err and "--attributes" in err
    err = run_failing(subset.source, tmp_path / "out", capsys, "--attributes", "Male,Young")
    assert f"{ATTR} line 2: bad header: lacks ['Young'] named by --attributes" in err
    assert main([str(subset.source), str(tmp_path / "ok"), "--attributes", "Smiling,Male", "--workers", "1"]) == 0
    assert load_manifest(tmp_path / "ok")["attributes"] == ["Smiling", "Male"]


def test_count_line_that_does_not_match(src, tmp_path, capsys):
    replace_line(src.file(ATTR), 1, "31")
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"{ATTR} line 1: says 31 images but the file has 30 rows" in err


def test_partition_value_other_than_0_1_2(src, tmp_path, capsys):
    replace_line(src.file("list_eval_partition.txt"), 3, "000003.jpg 3")
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert "list_eval_partition.txt line 3 (000003.jpg): partition 3 is not 0 (train), 1 (val) or 2 (test)" in err


def test_image_in_partition_but_not_in_attribute_file(src, tmp_path, capsys):
    append_line(src.file("list_eval_partition.txt"), "000031.jpg 0")
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"list_eval_partition.txt line 31: 000031.jpg is not in {ATTR}" in err


def test_labelled_image_without_partition_row(src, tmp_path, capsys):
    replace_line(src.file("list_eval_partition.txt"), 4, "")
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"000004.jpg ({ATTR} line 6) has no row in list_eval_partition.txt" in err


def test_extra_file_with_a_bad_row(src, tmp_path, capsys):
    replace_line(src.file("list_bbox_celeba.txt"), 4, "000002.jpg 1 2 x 4")
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert "list_bbox_celeba.txt line 4 (000002.jpg): value 'x' is not an integer" in err


def test_not_a_celeba_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = run_failing(tmp_path / "empty", tmp_path / "out", capsys)
    assert "not a CelebA folder: no list_attr_celeba.txt" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_jpeg(src, tmp_path, capsys, damage):
    path = src.image_path(4)  # 000005.jpg, in train
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff\xd8\xff\xe0" + bytes(500))
    err = run_failing(src.source, tmp_path / "out", capsys, "--samples-per-shard", "3")
    assert f"image 000005 ({path})" in err and "--skip-bad" in err
    # the shard holding images 1-3 was finished before the bad one; nothing else is
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.tar")) == ["celeba-train-000000.tar"]

    out = tmp_path / "skipping"
    assert main([str(src.source), str(out), "--workers", "2", "--skip-bad"]) == 0
    manifest = load_manifest(out)
    assert [s["id"] for s in manifest["splits"]["train"]["skipped"]] == ["000005"]
    assert "000005" not in [s["__key__"] for s in read_split(out, "train")]
    assert manifest["splits"]["train"]["num_samples"] == 20
    assert verify_main([str(out)]) == 0


def test_positive_rates_leave_out_an_image_skipped_as_bad(src, tmp_path):
    """``--skip-bad``: an image that does not decode is out of its split's positive rates too, so the
    manifest's rates (what class weights are made from) are those of the labels in the shards."""
    path = src.image_path(4)  # 000005.jpg, in train
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))
    out = tmp_path / "out"
    assert main([str(src.source), str(out), "--workers", "1", "--skip-bad"]) == 0
    manifest = load_manifest(out)
    assert [s["id"] for s in manifest["splits"]["train"]["skipped"]] == ["000005"]
    for split in ("train", "val", "test"):
        rows = [json.loads(s["attr.json"]) for s in read_split(out, split)]
        assert len(rows) == manifest["splits"][split]["num_samples"]
        shards = {a: round(sum(row[i] for row in rows) / len(rows), 6) for i, a in enumerate(manifest["attributes"])}
        assert manifest["splits"][split]["positive_rates"] == pytest.approx(shards, abs=1e-6), split


def test_zip_member_with_a_bad_crc_is_a_bad_image(tmp_path, capsys):
    src = write_celeba(tmp_path / "src", num_images=12, zip_images=True)
    archive = src.folder / "img_align_celeba.zip"
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("img_align_celeba/000005.jpg")  # in train
    assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(archive.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF  # mid-data: only the CRC tells
    archive.write_bytes(bytes(data))
    err = run_failing(src.source, tmp_path / "out", capsys)
    assert f"image 000005 ({archive}:img_align_celeba/000005.jpg): cannot read the image: Bad CRC-32" in err
    assert "--skip-bad" in err and "Traceback" not in err
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert not [name for name in left if name.startswith("train") or name.endswith(".tmp")], left

    out = tmp_path / "skipping"
    assert main([str(src.source), str(out), "--workers", "2", "--skip-bad"]) == 0
    assert [s["id"] for s in load_manifest(out)["splits"]["train"]["skipped"]] == ["000005"]
    assert "000005" not in [s["__key__"] for s in read_split(out, "train")]
    assert verify_main([str(out)]) == 0


def test_output_path_under_a_file(src, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = run_failing(src.source, blocker / "out", capsys)
    assert err.strip() == f"celeba-dist pack: error: cannot create the output folder {blocker / 'out'}: Not a directory"


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into, with the error creating something in it gives: a mode-0555 folder for a
    user; for root (CI), whom modes do not stop, a read-only tmpfs, unmounted afterwards."""
    locked = tmp_path / "locked"
    if os.geteuid() != 0:
        locked.mkdir(mode=0o555)
        yield locked, "Permission denied"
        return
    locked.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    yield locked, "Read-only file system"
    subprocess.run(["umount", "-l", str(locked)], check=False)


def test_output_path_in_a_read_only_folder(src, read_only_folder, capsys):
    locked, reason = read_only_folder
    err = run_failing(src.source, locked / "out", capsys)
    assert err.strip() == f"celeba-dist pack: error: cannot create the output folder {locked / 'out'}: {reason}"


def test_skip_bad_drops_bad_rows_and_missing_images(src, tmp_path):
    values = list(src.labels[3])
    values[0] = 2
    replace_line(src.file(ATTR), 6, label_row(values, "000004.jpg"))
    src.image_path(27).unlink()  # 000028.jpg, in test
    out = tmp_path / "out"
    assert main([str(src.source), str(out), "--workers", "1", "--skip-bad"]) == 0
    manifest = load_manifest(out)
    skipped = {s: [x["id"] for x in manifest["splits"][s]["skipped"]] for s in manifest["splits"]}
    assert skipped == {"train": ["000004"], "val": [], "test": ["000028"]}
    assert "line 6" in manifest["splits"]["train"]["skipped"][0]["reason"]
    assert sum(manifest["splits"][s]["num_samples"] for s in manifest["splits"]) == 28


def test_skip_bad_with_resplit_lists_bad_rows_before_splitting(src, tmp_path):
    """The source's partition is ignored, so a bad row belongs to no split."""
    values = list(src.labels[3])
    values[0] = 2
    replace_line(src.file(ATTR), 6, label_row(values, "000004.jpg"))
    out = tmp_path / "out"
    assert main([str(src.source), str(out), "--workers", "1", "--skip-bad", "--resplit", "0.8,0.1,0.1"]) == 0
    manifest = load_manifest(out)
    assert [s["id"] for s in manifest["skipped"]] == ["000004"] and "line 6" in manifest["skipped"][0]["reason"]
    assert all(manifest["splits"][s]["skipped"] == [] for s in manifest["splits"])
    assert sum(manifest["splits"][s]["num_samples"] for s in manifest["splits"]) == 29


def test_resplit_with_other_split_ratios_is_refused(src, tmp_path, capsys):
    out = tmp_path / "out"
    err = run_failing(src.source, out, capsys, "--resplit", "0.8,0.1,0.1", "--split-ratios", "0.6,0.2,0.2")
    assert "--resplit 0.8,0.1,0.1 and --split-ratios 0.6,0.2,0.2 conflict" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    err = run_failing(src.source, out, capsys, "--stratify", "Smiling")  # without --resplit: the source's partition
    assert "only apply to sources without a partition, or with --resplit" in err and not out.exists()


def test_grayscale_cmyk_and_png_images_are_converted_and_counted(src, tmp_path):
    kinds = {1: ("L", "JPEG", "grayscale"), 2: ("CMYK", "JPEG", "cmyk"), 3: ("RGB", "PNG", "png")}
    for index, (mode, fmt, _) in kinds.items():
        src.image_path(index).write_bytes(tiny_image(index, mode=mode, fmt=fmt))
    out = tmp_path / "out"
    assert main([str(src.source), str(out), "--workers", "2"]) == 0
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["converted"] == {"cmyk": ["000003"], "grayscale": ["000002"], "png": ["000004"]}
    assert manifest["image"]["quality"] == 95
    samples = {s["__key__"]: s for s in read_split(out, "train")}
    for index, (mode, fmt, _) in kinds.items():
        with Image.open(io.BytesIO(samples[f"{index + 1:06d}"]["jpg"])) as got, \
                Image.open(src.image_path(index)) as original:
            assert (got.format, got.mode, got.size) == ("JPEG", "RGB", original.size)
            diff = np.abs(np.asarray(got, dtype=int) - np.asarray(original.convert("RGB"), dtype=int))
            assert diff.mean() < 4
    assert samples["000001"]["jpg"] == src.image_path(0).read_bytes()  # RGB JPEGs stay untouched
    assert verify_main([str(out)]) == 0


def test_output_folder_with_shards_of_another_source(tmp_path, capsys):
    first = write_celeba(tmp_path / "first", num_images=10, seed=1)
    other = write_celeba(tmp_path / "other", num_images=10, seed=2)
    out = tmp_path / "out"
    assert main([str(first.source), str(out), "--workers", "1"]) == 0
    state = tree_state(out)
    capsys.readouterr()
    assert main([str(other.source), str(out), "--workers", "1"]) == 1
    assert "already holds shards from a different source" in capsys.readouterr().err
    assert tree_state(out) == state


def test_output_folder_with_unknown_tar_files(src, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "celeba-train-000000.tar").write_bytes(b"")
    err = run_failing(src.source, out, capsys)
    assert "holds shards that no pack progress record describes" in err


def test_error_through_the_tool_script(src, tmp_path):
    replace_line(src.file("list_eval_partition.txt"), 7, "000007.jpg 5")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "pack_shards.py"), str(src.source), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "list_eval_partition.txt line 7 (000007.jpg): partition 5" in done.stderr
    assert not out.exists()


# -- hf: sources --------------------------------------------------------------------------------

def test_hf_value_outside_the_source_encoding(tmp_path, capsys):
    hf = write_hf_celeba(tmp_path / "hf", {"train": 6, "valid": 2, "test": 2}, encoding="01")
    import datasets

    dd = datasets.load_from_disk(str(hf.path))
    bad = dd["train"].map(lambda row, i: {"Smiling": 2 if i == 3 else row["Smiling"]}, with_indices=True)
    datasets.DatasetDict({"train": bad, "valid": dd["valid"], "test": dd["test"]}).save_to_disk(str(tmp_path / "bad"))
    err = run_failing(Path(f"hf:{tmp_path / 'bad'}"), tmp_path / "out", capsys)
    assert "split 'train' row 3 (id 000004): column 'Smiling' has value 2; the source encodes attributes as 0/1" in err


@pytest.mark.parametrize("column, row, where", [("celeb_id", 3, "row 3 (id 000004)"), ("image_id", 4, "row 4"),
                                                ("Smiling", 2, "row 2 (id 000003)")])
def test_hf_empty_id_identity_or_attribute_cell(tmp_path, capsys, column, row, where):
    """A null cell is a bad row, never an identity of -2**63 or a sample keyed 'None'."""
    ids = [f"{i:06d}.jpg" for i in range(1, 11)]
    hf = write_hf_celeba(tmp_path / "hf", {"train": 6, "valid": 2, "test": 2}, columns={"image_id": ids})
    import datasets

    dd = datasets.load_from_disk(str(hf.path))
    bad = dd["train"].map(lambda r, i: {column: None if i == row else r[column]}, with_indices=True,
                          features=dd["train"].features)
    source = tmp_path / "bad"
    datasets.DatasetDict({"train": bad, "valid": dd["valid"], "test": dd["test"]}).save_to_disk(str(source))
    message = f"hf:{source} split 'train' {where}: column {column!r} is empty"
    err = run_failing(Path(f"hf:{source}"), tmp_path / "out", capsys)
    assert "1 problem(s)" in err and message in err

    out = tmp_path / "skipping"
    assert main([f"hf:{source}", str(out), "--workers", "1", "--skip-bad"]) == 0
    train = load_manifest(out)["splits"]["train"]
    assert [s["reason"] for s in train["skipped"]] == [message] and train["num_samples"] == 5
    samples = read_split(out, "train")
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(1, 7) if i != row + 1]
    assert [int(s["identity.txt"]) for s in samples] == [v for i, v in enumerate(hf.identity["train"]) if i != row]


def test_hf_ambiguous_image_column(tmp_path, capsys):
    second = [{"bytes": tiny_image(i, (8, 8)), "path": None} for i in range(8)]
    hf = write_hf_celeba(tmp_path / "hf", {"train": 8}, columns={"thumbnail": second})
    err = run_failing(Path(f"hf:{hf.path}"), tmp_path / "out", capsys)
    assert "several image columns ['image', 'thumbnail']; pass --image-column NAME" in err
    assert main([f"hf:{hf.path}", str(tmp_path / "ok"), "--image-column", "image", "--workers", "1"]) == 0


def test_hf_missing_attributes(tmp_path, capsys):
    hf = write_hf_celeba(tmp_path / "hf", {"train": 6, "test": 2})
    import datasets

    dd = datasets.load_from_disk(str(hf.path)).remove_columns(["Male", "Young"])
    dd.save_to_disk(str(tmp_path / "fewer"))
    err = run_failing(Path(f"hf:{tmp_path / 'fewer'}"), tmp_path / "out", capsys)
    assert "no column for attribute(s) ['Male', 'Young']" in err and "pass --attributes" in err
    ok = tmp_path / "ok"
    assert main([f"hf:{tmp_path / 'fewer'}", str(ok), "--attributes", "Smiling,Bald", "--workers", "1"]) == 0
    assert json.loads((ok / MANIFEST_NAME).read_text())["attributes"] == ["Smiling", "Bald"]


def _double_or_die(x: int) -> int:
    if x == 37:  # what the OOM killer does to a worker
        os.kill(os.getpid(), signal.SIGKILL)
    return 2 * x


def test_a_worker_that_dies_ends_the_pack_with_an_error_instead_of_a_hang():
    outcome = []

    def run_map() -> None:  # in a thread, so that a hang fails this test instead of stalling the suite
        with process_pool(2) as pool:
            try:
                list(ordered_map(pool, _double_or_die, range(100), chunksize=4))
            except WorkerDiedError as exc:
                outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run_map, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "a dead worker must not leave the pack waiting for its results"
    assert outcome and "a worker process died" in str(outcome[0]) and time.monotonic() - started < 30
    with process_pool(2) as pool:  # without a death: every result, in order, through a bounded window
        assert list(ordered_map(pool, _double_or_die, range(37), chunksize=5, window=1)) == [2 * x for x in range(37)]
