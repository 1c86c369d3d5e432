"""The synthetic CelebA: official file formats, torchvision round trip, determinism, visible attributes, one synth
per folder."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import CelebA

from celeba_dist import runlock, synthetic
from celeba_dist.attributes import CELEBA_ATTRIBUTES, DRAWN_ATTRIBUTES
from celeba_dist.synthetic import DifferentCelebAError, main, make_synthetic_celeba, split_counts, writing

TEXT_FILES = (
    "list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt",
    "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt",
)
NAME = r"\d{6}\.jpg"


class LocalCelebA(CelebA):
    """torchvision's reader without the MD5 check of the official files (all else unchanged)."""

    def _check_integrity(self) -> bool:
        return True


def _rows(path: Path, header_lines: int) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()[header_lines:]]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 images laid out as ROOT/celeba/..., the folder torchvision's CelebA reads."""
    root = tmp_path_factory.mktemp("small")
    make_synthetic_celeba(root / "celeba", num_images=60, seed=7)
    return root / "celeba"


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """800 images drawn by two worker processes, for the learnability checks."""
    return make_synthetic_celeba(tmp_path_factory.mktemp("medium"), num_images=800, seed=3, workers=2)


def test_layout_and_line_format(small: Path) -> None:
    names = sorted(p.name for p in (small / "img_align_celeba").iterdir())
    assert names == [f"{i:06d}.jpg" for i in range(1, 61)]
    assert sorted(p.name for p in small.iterdir()) == sorted([*TEXT_FILES, "img_align_celeba"])
    for name in TEXT_FILES:
        data = (small / name).read_bytes()
        assert data.endswith(b"\r\n") and b"\r\n\r\n" not in data
        assert data.count(b"\n") == data.count(b"\r\n"), f"{name}: every line ends in CRLF"
    attr = (small / "list_attr_celeba.txt").read_bytes().decode("ascii").split("\r\n")
    assert attr[0] == "60"
    assert attr[1] == " ".join(CELEBA_ATTRIBUTES) + " "  # the official trailing space
    assert all(re.fullmatch(NAME + r" (-1|1)( -1|  1){39}", row) for row in attr[2:-1])
    bbox = (small / "list_bbox_celeba.txt").read_text().splitlines()
    assert bbox[:2] == ["60", "image_id x_1 y_1 width height"]
    assert all(re.fullmatch(NAME + r" [ \d]{4}\d [ \d]{2}\d [ \d]{2}\d [ \d]{2}\d", row) for row in bbox[2:])
    landmarks = (small / "list_landmarks_align_celeba.txt").read_text().splitlines()
    assert landmarks[1] == ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                            "leftmouth_x leftmouth_y rightmouth_x rightmouth_y")
    assert all(re.fullmatch(NAME + r" \d+( [ \d]{3}\d){9}", row) for row in landmarks[2:])
    for name in ("list_eval_partition.txt", "identity_CelebA.txt"):
        rows = (small / name).read_text().splitlines()
        assert len(rows) == 60 and all(re.fullmatch(NAME + r" \d+", row) for row in rows)


def test_official_example_row_spacing() -> None:
    """The official first rows, rebuilt from their values, come out byte for byte."""
    official = [int(v) for v in "-1  1  1 -1 -1 -1 -1 -1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1  1  1 -1  1 -1 -1  1 "
                "-1 -1  1 -1 -1 -1  1  1 -1  1 -1  1 -1 -1  1".split()]
    files = synthetic.annotation_files([
        synthetic.Labels(index=0, identity=2880, partition=0, attributes=tuple(official),
                         landmarks=(69, 109, 106, 113, 77, 142, 73, 152, 108, 154), bbox=(95, 71, 226, 313)),
    ])
    assert files["list_attr_celeba.txt"].split(b"\r\n")[2] == (
        b"000001.jpg -1  1  1 -1 -1 -1 -1 -1 -1 -1 -1  1 -1 -1 -1 -1 -1 -1  1  1 -1  1 -1 -1  1 "
        b"-1 -1  1 -1 -1 -1  1  1 -1  1 -1  1 -1 -1  1")
    assert files["list_landmarks_align_celeba.txt"].split(b"\r\n")[2] == (
        b"000001.jpg 69  109  106  113   77  142   73  152  108  154")
    assert files["list_bbox_celeba.txt"].split(b"\r\n")[2] == b"000001.jpg    95  71 226 313"
    assert files["identity_CelebA.txt"] == b"000001.jpg 2880\r\n"
    assert files["list_eval_partition.txt"] == b"000001.jpg 0\r\n"


def test_partition_and_identities(small: Path) -> None:
    parts = [int(p) for _, p in _rows(small / "list_eval_partition.txt", 0)]
    assert parts == sorted(parts), "partitions are contiguous by image id"
    assert tuple(parts.count(k) for k in range(3)) == split_counts(60) == (48, 6, 6)
    assert split_counts(202_599) == (162_770, 19_867, 19_962)
    ids = [int(i) for _, i in _rows(small / "identity_CelebA.txt", 0)]
    by_split = [{i for i, p in zip(ids, parts) if p == k} for k in range(3)]
    assert not (by_split[0] & by_split[1]) and not (by_split[0] & by_split[2]) and not (by_split[1] & by_split[2])
    assert len(set(ids)) < len(ids), "several images per identity"
    males = {}
    for i, row in zip(ids, _rows(small / "list_attr_celeba.txt", 2)):
        males.setdefault(i, set()).add(row[1 + CELEBA_ATTRIBUTES.index("Male")])
    assert all(len(v) == 1 for v in males.values()), "Male is a trait of the identity"


def test_torchvision_celeba_reads_it(small: Path) -> None:
    data = LocalCelebA(str(small.parent), split="all", target_type=["attr", "identity", "bbox", "landmarks"])
    attr = np.array([[int(v) for v in row[1:]] for row in _rows(small / "list_attr_celeba.txt", 2)])
    assert len(data) == 60
    assert data.filename == [f"{i:06d}.jpg" for i in range(1, 61)]
    assert data.attr_names[:40] == list(CELEBA_ATTRIBUTES)
    assert torch.equal(data.attr, torch.from_numpy((attr + 1) // 2))
    identity = [int(i) for _, i in _rows(small / "identity_CelebA.txt", 0)]
    assert data.identity[:, 0].tolist() == identity
    assert data.bbox.tolist() == [[int(v) for v in row[1:]] for row in _rows(small / "list_bbox_celeba.txt", 2)]
    landmarks = [[int(v) for v in row[1:]] for row in _rows(small / "list_landmarks_align_celeba.txt", 2)]
    assert data.landmarks_align.tolist() == landmarks
    image, (a, ident, bbox, marks) = data[5]
    assert image.size == (178, 218) and ident.item() == identity[5] and marks.tolist() == landmarks[5]
    sizes = [len(LocalCelebA(str(small.parent), split=s)) for s in ("train", "valid", "test")]
    assert sizes == list(split_counts(60))
    assert LocalCelebA(str(small.parent), split="test").filename[0] == "000055.jpg"


def test_images_are_rgb_jpegs_of_celeba_size(small: Path) -> None:
    for path in sorted((small / "img_align_celeba").iterdir()):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (178, 218))
            pixels = np.asarray(image)
        assert pixels.std() > 20, "not a blank image"


def test_landmarks_point_at_the_drawn_eyes(small: Path) -> None:
    """The eye landmarks sit on irises or dark lenses, darker than the cheek 14 px below."""
    rows = _rows(small / "list_landmarks_align_celeba.txt", 2)
    darker = 0
    for name, *values in rows:
        gray = np.asarray(Image.open(small / "img_align_celeba" / name).convert("L"), dtype=float)
        x, y = int(values[0]), int(values[1])
        darker += gray[y - 1:y + 2, x - 1:x + 2].mean() + 15 < gray[y + 13:y + 16, x - 1:x + 2].mean()
    assert darker >= 0.9 * len(rows)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path, small: Path) -> None:
    again = make_synthetic_celeba(tmp_path / "again", num_images=60, seed=7, workers=2)
    for path in sorted(small.rglob("*.*")):
        assert (again / path.relative_to(small)).read_bytes() == path.read_bytes(), path.name
    other = make_synthetic_celeba(tmp_path / "other", num_images=60, seed=8)
    assert (other / "list_attr_celeba.txt").read_bytes() != (small / "list_attr_celeba.txt").read_bytes()
    differing = sum((other / "img_align_celeba" / p.name).read_bytes() != p.read_bytes()
                    for p in (small / "img_align_celeba").iterdir())
    assert differing == 60


def test_refuses_a_different_celeba_but_allows_regeneration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "celeba"
    assert main([str(out), "--num-images", "12", "--seed", "1"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*.*")}
    assert main([str(out), "--num-images", "12", "--seed", "1", "--workers", "2"]) == 0  # identical: fine
    assert main([str(out), "--num-images", "14", "--seed", "1"]) == 1
    assert "already holds a different CelebA: its list_attr_celeba.txt lists 12 images" in caplog.text
    with pytest.raises(DifferentCelebAError, match="list_attr_celeba.txt lists 12 images"):
        make_synthetic_celeba(out, num_images=12, seed=2)
    assert {p: p.read_bytes() for p in out.rglob("*.*")} == before, "a refused run changes nothing"
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"
    stray = tmp_path / "stray"
    (stray / "img_align_celeba").mkdir(parents=True)
    (stray / "img_align_celeba" / "000020.jpg").write_bytes(b"old")
    with pytest.raises(DifferentCelebAError, match="000020.jpg"):
        make_synthetic_celeba(stray, num_images=12)


def test_never_overwrites_images_it_did_not_draw(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Own names prove nothing: only images byte-equal to this run's drawing (an interrupted run's) are kept."""
    mine = tmp_path / "mine" / "img_align_celeba"
    mine.mkdir(parents=True)
    for name, colour in (("000001.jpg", "red"), ("000002.jpg", "blue")):
        Image.new("RGB", (178, 218), colour).save(mine / name, quality=90)
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert main([str(mine.parent), "--num-images", "20", "--workers", "2"]) == 1
    assert f"{mine / '000001.jpg'} is not the image this run draws (seed 0, 20 images" in caplog.text
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before, "a refused run writes nothing"
    assert [p.name for p in mine.parent.iterdir()] == ["img_align_celeba"]

    full = make_synthetic_celeba(tmp_path / "full", num_images=20, seed=3)
    cut = tmp_path / "cut" / "img_align_celeba"  # what a run killed while drawing leaves: some images, no text
    cut.mkdir(parents=True)
    for name in ("000001.jpg", "000002.jpg", "000007.jpg"):
        cut.joinpath(name).write_bytes((full / "img_align_celeba" / name).read_bytes())
    assert main([str(cut.parent), "--num-images", "20", "--seed", "3", "--workers", "2"]) == 0
    assert {p.relative_to(cut.parent): p.read_bytes() for p in cut.parent.rglob("*.*")} == \
        {p.relative_to(full): p.read_bytes() for p in full.rglob("*.*")}


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    for bad in (["--num-images", "0"], ["--num-images", "x"], ["--workers", "0", "--num-images", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "x"), *bad])
        assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="num_images"):
        make_synthetic_celeba(tmp_path / "y", num_images=1_000_000)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _synth(out: Path, num_images: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "celeba_dist", "synth", str(out), "--num-images", str(num_images), *extra]


def _files(folder: Path) -> dict[str, bytes]:
    """``relative path -> bytes`` of every file under ``folder``, hidden ones (a lock, temporaries) included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait_for_images(proc: subprocess.Popen, image_dir: Path, count: int, timeout: float = 60) -> None:
    """Wait until ``proc``, still running, has written ``count`` images into ``image_dir``."""
    deadline = time.monotonic() + timeout
    while not image_dir.is_dir() or sum(name.endswith(".jpg") for name in os.listdir(image_dir)) < count:
        assert proc.poll() is None and time.monotonic() < deadline, f"{count} images never came (exit {proc.poll()})"
        time.sleep(0.02)


def test_one_synth_per_folder(tmp_path: Path) -> None:
    """A second synth into the folder a live synth writes stops at once with one line naming that synth; the
    first finishes a complete folder and removes its lock."""
    out, num_images = tmp_path / "celeba", 1500  # about 5 s of drawing on a 2-core machine
    first = subprocess.Popen(_synth(out, num_images), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_images(first, out / "img_align_celeba", 1)
        started = time.monotonic()
        second = subprocess.run(_synth(out, num_images), capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        assert second.returncode == 1 and took < 15, (took, second.stderr)
        assert first.poll() is None, "the first synth ended before the second one was refused"
        errors = [line for line in second.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and second.stdout == "", second.stderr
        assert f"output folder {out} is in use by another synth: pid {first.pid} on host " in errors[0]
        assert "wrote" not in second.stderr
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    files = _files(out)
    assert sorted(files) == sorted([*TEXT_FILES, *(f"img_align_celeba/{i:06d}.jpg" for i in range(1, num_images + 1))])
    assert files["list_attr_celeba.txt"].split(b"\r\n")[0] == str(num_images).encode()


def test_a_killed_synths_lock_is_taken_over(tmp_path: Path) -> None:
    """A SIGKILLed synth leaves its lock (and maybe unfinished temporaries); the same command takes the lock over,
    saying why, clears only its own temporaries and ends with the bytes of an uninterrupted run."""
    out, num_images = tmp_path / "killed", 600
    command = _synth(out, num_images, "--seed", "5")
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_images(killed, out / "img_align_celeba", 50)
    finally:
        killed.kill()
        killed.wait(timeout=30)
    holder = runlock.read_holder(out / ".lock")
    assert holder is not None and holder.pid == killed.pid, "the killed synth left no lock of its own"
    assert not (out / "list_attr_celeba.txt").exists()
    own = [out / ".list_attr_celeba.txt.4242.tmp", out / "img_align_celeba" / f".{num_images:06d}.jpg.4242.tmp"]
    for path in [*own, out / "notes.tmp"]:  # unfinished writes, as a kill leaves them; and a file of the user's
        path.write_bytes(b"left over")
    started = time.monotonic()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and time.monotonic() - started < 60, again.stderr
    assert f"output folder {out}: taking over the lock of pid {killed.pid} on host " in again.stderr, again.stderr
    assert f"because process {killed.pid} no longer runs" in again.stderr
    assert (out / "notes.tmp").read_bytes() == b"left over" and not any(p.exists() for p in own)
    (out / "notes.tmp").unlink()
    whole = make_synthetic_celeba(tmp_path / "whole", num_images=num_images, seed=5, workers=2)
    assert _files(out) == _files(whole), "not the bytes of an uninterrupted run"


def test_a_held_folder_is_refused_and_left_as_it_was(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    held = tmp_path / "held"
    lock = runlock.acquire(held, stale_s=300, user=runlock.SYNTH)
    try:
        assert main([str(held), "--num-images", "5"]) == 1
        assert [p.name for p in held.iterdir()] == [".lock"], "a refused synth writes nothing"
    finally:
        lock.release()
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(refusals) == 1 and refusals[0].startswith(
        f"output folder {held} is in use by another synth: pid {os.getpid()} on host "), refusals


def test_a_failed_synth_leaves_no_folder_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders that were not there (OUT_DIR, its parents, its image folder) go again when the run drew nothing."""
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("drawing failed")

    monkeypatch.setattr(writing, "_render_all", fail)
    with pytest.raises(OSError, match="drawing failed"):
        make_synthetic_celeba(tmp_path / "new" / "celeba", num_images=5)
    (tmp_path / "there").mkdir()
    with pytest.raises(OSError, match="drawing failed"):
        make_synthetic_celeba(tmp_path / "there", num_images=5)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["there"], "only the folder that was there before"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_synthetic_celeba(tmp_path / "file", num_images=5)
    assert (tmp_path / "file").read_text() == "x"


def test_rates_and_consistency_of_the_labels() -> None:
    n = 20_000  # ~1000 identities: Male and Young are drawn per identity
    faces = [synthetic.sample_face(11, i, n) for i in range(n)]
    a = {name: np.array([f.labels.attributes[k] == 1 for f in faces]) for k, name in enumerate(CELEBA_ATTRIBUTES)}
    for name, rate in {"Smiling": 0.48, "Male": 0.42, "No_Beard": 0.81, "Young": 0.77, "Attractive": 0.51,
                       "Bangs": 0.15, "Eyeglasses": 0.12, "Wearing_Hat": 0.12, "Wearing_Lipstick": 0.47,
                       "Mouth_Slightly_Open": 0.48, "Black_Hair": 0.24, "Blond_Hair": 0.15,
                       "Brown_Hair": 0.2, "Gray_Hair": 0.04, "Bald": 0.09, "Heavy_Makeup": 0.39}.items():
        assert abs(a[name].mean() - rate) < 0.04, (name, a[name].mean())
    hair = sum(a[c].astype(int) for c in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"))
    assert hair.max() == 1 and (hair == 0).mean() > 0.2
    assert not (a["Bald"] & (hair > 0)).any() and not (a["Bald"] & a["Bangs"]).any()
    assert not (a["Bald"] & a["Wearing_Hat"]).any()
    assert not (a["No_Beard"] & (a["Mustache"] | a["Goatee"])).any()
    for name in ("Mustache", "Goatee", "Bald", "5_o_Clock_Shadow", "Sideburns"):
        assert a[name].any() and not (a[name] & ~a["Male"]).any(), name
    for name in ("Wearing_Lipstick", "Heavy_Makeup", "Wearing_Earrings"):
        assert a[name][~a["Male"]].mean() > 5 * a[name][a["Male"]].mean(), name
    assert a["Mouth_Slightly_Open"][a["Smiling"]].mean() > a["Mouth_Slightly_Open"][~a["Smiling"]].mean() + 0.3
    assert a["Gray_Hair"][~a["Young"]].mean() > 5 * a["Gray_Hair"][a["Young"]].mean()


def _auc(score: torch.Tensor, label: torch.Tensor) -> float:
    pos, neg = score[label], score[~label]
    return ((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()).item()


def _ridge_auc(features: torch.Tensor, labels: torch.Tensor, n_train: int) -> list[float]:
    """Held-out AUC per attribute of a ridge regression (dual form: fast for few samples)."""
    x = (features - features[:n_train].mean(0)) / (features[:n_train].std(0) + 1e-3)
    y = labels.double() * 2 - 1
    kernel = x @ x[:n_train].T
    ridge = 0.1 * x.shape[1] * torch.eye(n_train, dtype=x.dtype)
    scores = kernel[n_train:] @ torch.linalg.solve(kernel[:n_train] + ridge, y[:n_train] - y[:n_train].mean(0))
    return [_auc(scores[:, k], labels[n_train:, k]) for k in range(labels.shape[1])]


def test_drawn_attributes_are_visible_at_64px(medium: Path) -> None:
    """A ridge probe on 560 images at CenterCrop(178) -> Resize(64) predicts every drawn attribute of
    240 held-out images; the mouth region alone predicts Smiling and an open mouth but not a hat."""
    names = [row[0] for row in _rows(medium / "list_attr_celeba.txt", 2)]
    labels = torch.tensor([[v == "1" for v in row[1:]] for row in _rows(medium / "list_attr_celeba.txt", 2)])
    to_64 = transforms.Compose([transforms.CenterCrop(178), transforms.Resize(64), transforms.ToTensor()])
    images = torch.stack([to_64(Image.open(medium / "img_align_celeba" / n)) for n in names]).double()
    small = torch.nn.functional.interpolate(images, size=32, mode="area").flatten(1)
    whole = _ridge_auc(torch.cat([small, small ** 2], 1), labels, n_train=560)  # x^2: colours in a band
    mouth = _ridge_auc(images[:, :, 36:60, 16:48].flatten(1), labels, n_train=560)
    auc = {name: whole[k] for k, name in enumerate(CELEBA_ATTRIBUTES)}
    auc_mouth = {name: mouth[k] for k, name in enumerate(CELEBA_ATTRIBUTES)}
    for name in DRAWN_ATTRIBUTES:
        if name in ("Smiling", "Mouth_Slightly_Open"):
            assert auc_mouth[name] > 0.85, (name, auc_mouth[name])
        else:
            assert auc[name] > 0.8, (name, auc[name])
    assert auc_mouth["Wearing_Hat"] < 0.7 and auc_mouth["Bangs"] < 0.7, "hats and fringes are not at the mouth"
    assert auc["Blurry"] < 0.7, "an undrawn attribute independent of the drawn ones stays at chance"
