"""The shards, read with plain WebDataset, against what independent readers see in the same source."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CelebA

from celeba_dist.attributes import CELEBA_ATTRIBUTES
from celeba_dist.pack.cli import main
from celeba_dist.shards.manifest import load_manifest
from celeba_dist.synthetic import make_synthetic_celeba
from helpers_celeba import decoded, read_split, write_celeba, write_hf_celeba

TORCHVISION_SPLIT = {"train": "train", "val": "valid", "test": "test"}


class UncheckedCelebA(CelebA):
    """torchvision's reader, minus the MD5 check of the real release files."""

    def _check_integrity(self) -> bool:
        return True


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def jpeg(data: bytes, *, quality: int) -> bytes:
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.mark.parametrize("maker", ["helper", "synthetic"])
def test_torchvision_layout_matches_torchvision_reader(tmp_path, maker):
    root = tmp_path / "root"
    if maker == "helper":
        write_celeba(root, num_images=40, layout="torchvision")
    else:
        make_synthetic_celeba(root / "celeba", num_images=40, seed=1)
    out = tmp_path / "out"
    assert main([str(root), str(out), "--samples-per-shard", "6", "--workers", "2"]) == 0
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "torchvision"
    for split, tv_split in TORCHVISION_SPLIT.items():
        reference = UncheckedCelebA(str(root), split=tv_split,
                                    target_type=["attr", "identity", "bbox", "landmarks"])
        assert reference.attr_names[:40] == manifest["attributes"]
        samples = [decoded(s) for s in read_split(out, split)]
        assert [s["key"] + ".jpg" for s in samples] == reference.filename
        assert torch.equal(torch.tensor([s["attr"] for s in samples]), reference.attr)
        assert [s["identity"] for s in samples] == reference.identity[:, 0].tolist()
        assert [list(s["bbox"].values()) for s in samples] == reference.bbox.tolist()
        assert [list(s["landmarks"].values()) for s in samples] == reference.landmarks_align.tolist()
        raw = read_split(out, split)
        for index in (0, len(raw) - 1):
            image, _ = reference[index]
            assert np.array_equal(pixels(raw[index]["jpg"]), np.asarray(image, dtype=np.int16))


@pytest.mark.parametrize("encoding", ["bool", "pm1"])
def test_hf_dataset_dict_matches_its_rows(tmp_path, encoding):
    counts = {"train": 12, "valid": 4, "test": 4}
    hf = write_hf_celeba(tmp_path / "hf", counts, encoding=encoding, png_rows=(5,))
    out = tmp_path / "out"
    assert main([f"hf:{hf.path}", str(out), "--workers", "2"]) == 0
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "hf" and manifest["source"]["partition"] == "source"
    assert manifest["attributes"] == list(CELEBA_ATTRIBUTES) and manifest["extras"] == ["identity"]
    assert manifest["splits"]["train"]["converted"]["png"] == ["000006"]
    row = 0
    for split, hf_split in (("train", "train"), ("val", "valid"), ("test", "test")):
        samples = read_split(out, split)
        assert [s["__key__"] for s in samples] == [f"{row + i + 1:06d}" for i in range(counts[hf_split])]
        for i, sample in enumerate(samples):
            got = decoded(sample)
            assert got["attr"] == hf.labels[hf_split][i].tolist()
            assert got["identity"] == hf.identity[hf_split][i]
            original = hf.images[hf_split][i]
            if row + i == 5:  # the PNG row: converted the documented way, RGB JPEG at quality 95
                assert sample["jpg"] == jpeg(original, quality=95)
            else:
                assert sample["jpg"] == original and np.array_equal(pixels(sample["jpg"]), pixels(original))
        row += counts[hf_split]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_hf_parquet_and_arrow_files_pack_their_rows(tmp_path, kind):
    """``hf:FILE``: one .parquet or .arrow file is one split, split 80/10/10 here; every row packed as it is."""
    import datasets

    hf = write_hf_celeba(tmp_path / "hf", {"train": 20}, seed=2)
    if kind == "parquet":
        source = tmp_path / "celeba.parquet"
        datasets.load_from_disk(str(hf.path))["train"].to_parquet(str(source))
    else:  # the Arrow file that save_to_disk wrote
        (source,) = (hf.path / "train").glob("*.arrow")
    out = tmp_path / "out"
    assert main([f"hf:{source}", str(out), "--workers", "1", "--stratify", "none"]) == 0
    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "hf" and manifest["source"]["partition"] == "generated"
    samples = [s for split in ("train", "val", "test") for s in read_split(out, split)]
    assert sorted(s["__key__"] for s in samples) == [f"{i:06d}" for i in range(1, 21)]
    for sample in samples:
        row = int(sample["__key__"]) - 1
        assert sample["jpg"] == hf.images["train"][row]
        assert decoded(sample)["attr"] == hf.labels["train"][row].tolist()
        assert decoded(sample)["identity"] == hf.identity["train"][row]


def test_hf_id_column_gives_the_ids(tmp_path):
    names = [f"{100 + i:06d}.jpg" for i in range(8)]
    hf = write_hf_celeba(tmp_path / "hf", {"train": 6, "validation": 2}, columns={"image_id": names})
    out = tmp_path / "out"
    assert main([f"hf:{hf.path}", str(out), "--workers", "1"]) == 0
    assert [s["__key__"] for s in read_split(out, "train")] == [n[:-4] for n in names[:6]]
    assert [s["__key__"] for s in read_split(out, "val")] == [n[:-4] for n in names[6:]]
    empty = {"num_samples": 0, "positive_rates": {a: 0.0 for a in CELEBA_ATTRIBUTES}, "shards": [],
             "converted": {"cmyk": [], "grayscale": [], "png": []}, "skipped": []}
    assert load_manifest(out)["splits"]["test"] == empty


def test_hf_single_split_is_split_80_10_10_stratified(tmp_path):
    hf = write_hf_celeba(tmp_path / "hf", {"train": 200}, size=(8, 8), seed=4)
    male = CELEBA_ATTRIBUTES.index("Male")
    overall = hf.labels["train"][:, male].mean()

    def split_keys(name: str, seed: str) -> dict[str, list[str]]:
        out = tmp_path / name
        assert main([f"hf:{hf.path}", str(out), "--seed", seed, "--workers", "2", "--samples-per-shard", "32"]) == 0
        manifest = load_manifest(out)
        assert manifest["source"]["partition"] == "generated" and manifest["options"]["stratify"] == ["Male"]
        keys = {s: [x["__key__"] for x in read_split(out, s)] for s in ("train", "val", "test")}
        for split, chosen in keys.items():
            rate = np.mean([hf.labels["train"][int(k) - 1, male] for k in chosen])
            assert abs(rate - overall) <= 0.03, (split, rate, overall)
            assert manifest["splits"][split]["positive_rates"]["Male"] == pytest.approx(rate, abs=1e-6)
        return keys

    first, again, other = split_keys("a", "0"), split_keys("b", "0"), split_keys("c", "1")
    assert {s: len(k) for s, k in first.items()} == {"train": 160, "val": 20, "test": 20}
    assert first == again
    assert first != other and {s: len(k) for s, k in other.items()} == {"train": 160, "val": 20, "test": 20}
    assert sorted(sum(first.values(), [])) == [f"{i:06d}" for i in range(1, 201)]


def test_hf_single_split_with_other_ratios(tmp_path):
    hf = write_hf_celeba(tmp_path / "hf", {"train": 40}, size=(8, 8))
    out = tmp_path / "out"
    args = ["--split-ratios", "0.5,0.25,0.25", "--stratify", "none", "--workers", "1"]
    assert main([f"hf:{hf.path}", str(out), *args]) == 0
    manifest = load_manifest(out)
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [20, 10, 10]
    assert json.loads((out / "manifest.json").read_text())["options"]["stratify"] == []
