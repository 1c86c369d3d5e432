"""Round trips through the real packer: what goes in comes out, byte for byte and label for label."""
from __future__ import annotations

import io
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from celeba_dist import cli
from celeba_dist.pack.cli import DEFAULT_SAMPLES_PER_SHARD, main, verify_main
from celeba_dist.shards.layout import SPLITS
from celeba_dist.shards.manifest import (
    MANIFEST_NAME, ManifestError, load_manifest, positive_rates, split_shards, write_manifest,
)
from helpers_celeba import decoded, read_split, tree_state, write_celeba

REPO = Path(__file__).resolve().parents[1]
SPLIT_OF = {0: "train", 1: "val", 2: "test"}


def pack(source: Path, out: Path, *extra: str) -> None:
    assert main([str(source), str(out), "--workers", "1", *extra]) == 0


def rewritten_by_pack(src, out: Path, *args: str) -> set[str]:
    """Pack ``src`` into ``out`` again; the files under ``out`` it created or changed."""
    state = tree_state(out)
    pack(src.source, out, *args)
    after = tree_state(out)
    return {name for name in after if state.get(name) != after[name]}


def tars(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def without_created(manifest: dict, *ignore: str) -> dict:
    out = {k: v for k, v in manifest.items() if k != "created"}
    out["options"] = {k: v for k, v in out["options"].items() if k not in ignore}
    return out


def test_official_folder_round_trip(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=30)
    out = tmp_path / "out"
    pack(src.source, out, "--samples-per-shard", "8")

    manifest = load_manifest(out)
    assert manifest["source"]["kind"] == "official" and manifest["source"]["partition"] == "source"
    assert manifest["extras"] == ["identity", "bbox", "landmarks"]
    assert manifest["image"] == {"encoding": "jpeg", "resize": None, "resample": None, "quality": None,
                                 "width": 178, "height": 218}
    by_name = {n.split(".")[0]: i for i, n in enumerate(src.names)}
    for split in ("train", "val", "test"):
        samples = read_split(out, split)
        expected = sorted(i for i, p in by_name.items() if SPLIT_OF[src.partition[p]] == split)
        assert [s["__key__"] for s in samples] == expected
        assert manifest["splits"][split]["num_samples"] == len(expected)
        for sample in samples:
            i = by_name[sample["__key__"]]
            got = decoded(sample)
            assert sample["jpg"] == src.image_path(i).read_bytes()  # original bytes, untouched
            assert got["attr"] == [(v + 1) // 2 for v in src.labels[i]]
            assert got["identity"] == src.identity[i]
            assert got["bbox"] == dict(zip(("x_1", "y_1", "width", "height"), src.bbox[i].tolist()))
            assert list(got["landmarks"].values()) == src.landmarks[i].tolist()
        rows = [by_name[k] for k in expected]
        rates = positive_rates(manifest, split, ["Male", "Young"])
        for name, rate in zip(["Male", "Young"], rates):
            column = src.attributes.index(name)
            assert rate == pytest.approx(sum(src.labels[r][column] == 1 for r in rows) / len(rows), abs=1e-6)
    shards = split_shards(manifest, out, "train")
    assert [n for _, n in shards] == [8, 8, 5] and all(Path(p).is_absolute() and Path(p).is_file() for p, _ in shards)
    assert verify_main([str(out), "--workers", "1"]) == 0


def test_lf_and_crlf_label_files_pack_the_same(tmp_path):
    crlf = write_celeba(tmp_path / "crlf", num_images=12, crlf=True)
    lf = write_celeba(tmp_path / "lf", num_images=12, crlf=False)
    pack(crlf.source, tmp_path / "out-crlf")
    pack(lf.source, tmp_path / "out-lf")
    assert tars(tmp_path / "out-crlf") == tars(tmp_path / "out-lf")


def test_label_files_saved_with_a_utf8_bom_pack_the_same(tmp_path):
    """Windows Notepad starts a UTF-8 file with a byte order mark; it must not stick to the first token."""
    plain = write_celeba(tmp_path / "plain", num_images=12)
    bom = write_celeba(tmp_path / "bom", num_images=12)
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt", "list_bbox_celeba.txt"):
        bom.file(name).write_bytes(b"\xef\xbb\xbf" + bom.file(name).read_bytes())
    pack(plain.source, tmp_path / "out-plain")
    pack(bom.source, tmp_path / "out-bom")
    assert tars(tmp_path / "out-bom") == tars(tmp_path / "out-plain")


def test_same_input_gives_byte_identical_shards(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=30)
    pack(src.source, tmp_path / "a", "--samples-per-shard", "7")
    assert main([str(src.source), str(tmp_path / "b"), "--samples-per-shard", "7", "--workers", "2"]) == 0
    assert tars(tmp_path / "a") == tars(tmp_path / "b") and len(tars(tmp_path / "a")) == 5
    a, b = (json.loads((tmp_path / d / MANIFEST_NAME).read_text()) for d in "ab")
    assert without_created(a, "workers") == without_created(b, "workers")


def test_resume_rewrites_only_the_missing_shard(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=30)
    out = tmp_path / "out"
    pack(src.source, out, "--samples-per-shard", "4")
    before_tars, before_manifest = tars(out), json.loads((out / MANIFEST_NAME).read_text())
    lost = out / "train" / "celeba-train-000002.tar"
    lost.unlink()
    (out / MANIFEST_NAME).unlink()

    rewritten = rewritten_by_pack(src, out, "--samples-per-shard", "4")
    assert rewritten == {"train/celeba-train-000002.tar", MANIFEST_NAME, ".pack-progress.json"}
    assert tars(out) == before_tars
    assert without_created(json.loads((out / MANIFEST_NAME).read_text())) == without_created(before_manifest)


def test_resume_after_a_failed_run(tmp_path):
    """A run that dies on a bad image keeps its finished shards; the next run only writes the rest."""
    src = write_celeba(tmp_path / "src", num_images=24, fractions=(1.0, 1.0))
    good = src.image_path(13).read_bytes()
    src.image_path(13).write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    assert main([str(src.source), str(out), "--samples-per-shard", "4", "--workers", "2"]) == 1
    assert not (out / MANIFEST_NAME).exists() and not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [f"celeba-train-00000{i}.tar" for i in range(3)]
    kept = tree_state(out / "train")

    src.image_path(13).write_bytes(good)
    pack(src.source, out, "--samples-per-shard", "4")
    after = tree_state(out / "train")
    assert all(after[name] == kept[name] for name in kept)
    pack(src.source, tmp_path / "clean", "--samples-per-shard", "4")
    assert tars(out) == tars(tmp_path / "clean")


def test_zip_source_read_in_place(tmp_path):
    folder = write_celeba(tmp_path / "folder", num_images=16)
    zipped = write_celeba(tmp_path / "zipped", num_images=16, zip_images=True)
    assert not (zipped.folder / "img_align_celeba").exists()
    pack(folder.source, tmp_path / "a")
    assert main([str(zipped.source), str(tmp_path / "b"), "--workers", "2"]) == 0
    assert tars(tmp_path / "a") == tars(tmp_path / "b")
    assert not (zipped.folder / "img_align_celeba").exists()


def test_resize_reencodes_every_image(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=12)
    out = tmp_path / "out"
    pack(src.source, out, "--resize", "32x40", "--quality", "80")
    image = load_manifest(out)["image"]
    assert image == {"encoding": "jpeg", "resize": [32, 40], "resample": "bicubic", "quality": 80,
                     "width": 32, "height": 40}
    for sample in read_split(out, "train"):
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 40))
    assert verify_main([str(out)]) == 0


def test_max_shard_bytes_caps_every_shard(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=30)
    out = tmp_path / "out"
    cap = 50_000
    pack(src.source, out, "--max-shard-bytes", str(cap))
    manifest = load_manifest(out)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert len(manifest["splits"]["train"]["shards"]) > 2
    assert all(s["bytes"] <= cap and s["bytes"] == (out / s["file"]).stat().st_size for s in shards)
    assert sum(s["num_samples"] for s in shards) == 30
    assert manifest["options"]["samples_per_shard"] is None and manifest["options"]["max_shard_bytes"] == cap


def test_limit_takes_a_deterministic_proportional_subset(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=40)  # 28 / 6 / 6
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        pack(src.source, tmp_path / name, "--limit", "10", "--seed", seed)
    keys = {name: {s: [x["__key__"] for x in read_split(tmp_path / name, s)] for s in ("train", "val", "test")}
            for name in "abc"}
    # quotas 10*28/40 = 7, 10*6/40 = 1.5, 1.5: val and test tie on remainder, val goes first
    assert {s: len(k) for s, k in keys["a"].items()} == {"train": 7, "val": 2, "test": 1}
    assert keys["a"] == keys["b"] and keys["a"] != keys["c"]
    for split, chosen in keys["a"].items():
        assert chosen == sorted(chosen)
        assert all(SPLIT_OF[src.partition[int(k) - 1]] == split for k in chosen)


def test_folder_without_partition_gets_a_generated_split(tmp_path, capsys):
    src = write_celeba(tmp_path / "src", num_images=50, partition=False)
    out = tmp_path / "out"
    pack(src.source, out, "--seed", "3")
    manifest = load_manifest(out)
    assert "no list_eval_partition.txt" in capsys.readouterr().out
    assert manifest["source"]["partition"] == "generated"
    assert manifest["options"]["split_ratios"] == [0.8, 0.1, 0.1] and manifest["options"]["stratify"] == ["Male"]
    counts = [manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")]
    assert sum(counts) == 50 and abs(counts[0] - 40) <= 1 and abs(counts[1] - 5) <= 1


def test_partition_options_are_refused_for_partitioned_sources(tmp_path, capsys):
    src = write_celeba(tmp_path / "src", num_images=8)
    assert main([str(src.source), str(tmp_path / "out"), "--split-ratios", "0.5,0.25,0.25"]) == 1
    assert "only apply to sources without a partition" in capsys.readouterr().err


# -- --resplit: a generated split in place of the source's own partition --------------------------

def split_keys(out: Path) -> dict[str, list[str]]:
    """The sample ids of every split, read from the shard files."""
    return {s: [x["__key__"] for x in read_split(out, s)] for s in SPLITS}


@pytest.fixture
def partitioned(tmp_path):
    """200 tiny images; the official partition is 140 / 30 / 30, contiguous by id."""
    return write_celeba(tmp_path / "src", num_images=200, size=(16, 16), extras=False)


def test_resplit_is_deterministic_by_seed(partitioned, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        pack(partitioned.source, tmp_path / name, "--resplit", "0.8,0.1,0.1", "--seed", seed,
             "--samples-per-shard", "64")
    a, b, c = (split_keys(tmp_path / name) for name in "abc")
    assert a == b and tars(tmp_path / "a") == tars(tmp_path / "b")
    assert a["val"] != c["val"] and a["test"] != c["test"]
    for keys in (a, c):
        assert sorted(sum(keys.values(), [])) == [f"{i:06d}" for i in range(1, 201)]


def test_resplit_is_stratified_like_a_generated_split(partitioned, tmp_path):
    """Per stratum the cuts are rounded, so each split holds its share of each stratum within one image."""
    for stratify, attribute in ((None, "Male"), ("Smiling", "Smiling")):
        out = tmp_path / attribute
        pack(partitioned.source, out, "--resplit", "0.8,0.1,0.1", *(["--stratify", stratify] if stratify else []))
        manifest = load_manifest(out)
        assert manifest["source"]["split"]["stratify"] == [attribute]
        column = partitioned.attributes.index(attribute)
        positive = {f"{i + 1:06d}" for i, row in enumerate(partitioned.labels) if row[column] == 1}
        for split, ratio in zip(SPLITS, (0.8, 0.1, 0.1)):
            keys = split_keys(out)[split]
            assert abs(len(positive.intersection(keys)) - ratio * len(positive)) <= 1, (attribute, split)
            rate = manifest["splits"][split]["positive_rates"][attribute]
            assert rate == pytest.approx(len(positive.intersection(keys)) / len(keys), abs=1e-6)


def test_resplit_ignores_the_source_partition(partitioned, tmp_path):
    out = tmp_path / "out"
    pack(partitioned.source, out, "--resplit", "0.5,0.25,0.25", "--stratify", "none")
    keys = split_keys(out)
    assert {s: len(k) for s, k in keys.items()} == {"train": 100, "val": 50, "test": 50}
    for split in SPLITS:  # every new split draws from all three official ones
        assert {SPLIT_OF[partitioned.partition[int(k) - 1]] for k in keys[split]} == set(SPLITS), split


def test_resplit_is_recorded_in_the_manifest_and_the_resume_record(partitioned, tmp_path, capsys):
    from celeba_dist.export.card import _data_section

    out = tmp_path / "out"
    pack(partitioned.source, out, "--resplit", "0.8,0.1,0.1", "--seed", "5")
    manifest = load_manifest(out)
    assert manifest["source"]["partition"] == "resplit"
    assert manifest["source"]["split"] == {"ratios": [0.8, 0.1, 0.1], "seed": 5, "stratify": ["Male"]}
    assert manifest["options"]["resplit"] == [0.8, 0.1, 0.1] and manifest["options"]["split_ratios"] == [0.8, 0.1, 0.1]
    assert json.loads((out / ".pack-progress.json").read_text())["options"]["resplit"] == [0.8, 0.1, 0.1]
    card = _data_section({"source": manifest["source"], "splits": {"train": 160}, "manifest_sha256": "0" * 64})
    assert "ratios 0.8/0.1/0.1, seed 5, stratified on Male" in card and "not comparable" in card

    official = tmp_path / "official"
    pack(partitioned.source, official)
    assert load_manifest(official)["source"]["partition"] == "source"
    assert "split" not in load_manifest(official)["source"]
    assert "resplit" not in json.loads((official / ".pack-progress.json").read_text())["options"]

    capsys.readouterr()
    state = tree_state(out)
    for other, change in (([], "None"), (["--resplit", "0.7,0.2,0.1"], "[0.7, 0.2, 0.1]")):
        # another split into the same folder: a new plan fingerprint, refused naming the option, nothing touched
        assert main([str(partitioned.source), str(out), "--workers", "1", "--seed", "5", *other]) == 1
        assert f"(changed [old, new]: {{'resplit': [[0.8, 0.1, 0.1], {change}]}})" in capsys.readouterr().err
    assert tree_state(out) == state


def test_resplit_on_a_source_without_partition_means_split_ratios(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=40, size=(16, 16), partition=False, extras=False)
    pack(src.source, tmp_path / "a", "--resplit", "0.5,0.25,0.25")
    pack(src.source, tmp_path / "b", "--split-ratios", "0.5,0.25,0.25")
    pack(src.source, tmp_path / "c", "--split-ratios", "0.5,0.25,0.25", "--resplit", "0.5,0.25,0.25")  # same: accepted
    assert split_keys(tmp_path / "a") == split_keys(tmp_path / "b") == split_keys(tmp_path / "c")
    assert load_manifest(tmp_path / "a")["source"]["partition"] == "generated"


def test_attribute_subset_is_packed_in_the_named_order(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=10)
    out = tmp_path / "out"
    pack(src.source, out, "--attributes", "Smiling,Male")
    assert load_manifest(out)["attributes"] == ["Smiling", "Male"]
    smiling, male = src.attributes.index("Smiling"), src.attributes.index("Male")
    for sample in read_split(out, "train"):
        i = int(sample["__key__"]) - 1
        assert json.loads(sample["attr.json"]) == [(src.labels[i][smiling] + 1) // 2, (src.labels[i][male] + 1) // 2]


def test_verify_names_a_damaged_shard(tmp_path, capsys):
    src = write_celeba(tmp_path / "src", num_images=20)
    out = tmp_path / "out"
    pack(src.source, out, "--samples-per-shard", "5")
    assert verify_main([str(out)]) == 0
    shard = out / "train" / "celeba-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside the first image
    shard.write_bytes(bytes(data))
    (out / "val" / "celeba-val-000000.tar").unlink()
    capsys.readouterr()
    assert verify_main([str(out), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "train/celeba-train-000001.tar: sha256 differs" in err
    assert "val/celeba-val-000000.tar: missing" in err


def test_resume_rewrites_a_shard_damaged_in_place(tmp_path):
    """A finished shard whose bytes changed but not its size (a bit flipped on disk): the re-run finds it by
    its sha256 and writes it again, as it does a lost one."""
    src = write_celeba(tmp_path / "src", num_images=30)
    out = tmp_path / "out"
    pack(src.source, out, "--samples-per-shard", "4")
    before = tars(out)
    damaged = out / "train" / "celeba-train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[1500] ^= 0xFF
    damaged.write_bytes(bytes(data))
    rewritten = rewritten_by_pack(src, out, "--samples-per-shard", "4")
    assert rewritten == {"train/celeba-train-000001.tar", MANIFEST_NAME, ".pack-progress.json"}
    assert tars(out) == before
    assert verify_main([str(out), "--workers", "1"]) == 0


def _rewrite_shard(out: Path, file: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write ``samples`` as shard ``file`` and make the manifest's bytes and sha256 match it (its sample
    count stays): damage that only a sample-level check can find."""
    import webdataset as wds

    from celeba_dist.shards.manifest import file_sha256

    with open(out / file, "wb") as fh, wds.TarWriter(fh, encoder=False) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            if entry["file"] == file:
                entry["bytes"], entry["sha256"] = (out / file).stat().st_size, file_sha256(out / file)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_verify_checks_every_sample_not_only_the_hashes(tmp_path, capsys):
    """Shards whose bytes match the manifest but whose samples do not (what a packer bug would write): verify
    names each wrong sample count, member set, label list, image size, key order within and across
    shards, and a shard file the manifest does not list."""
    from celeba_dist.pack.verify import read_tar_samples
    from helpers_celeba import tiny_image

    src = write_celeba(tmp_path / "src", num_images=40)
    out = tmp_path / "out"
    pack(src.source, out, "--samples-per-shard", "4")
    assert verify_main([str(out), "--workers", "1"]) == 0
    shard = {i: f"train/celeba-train-{i:06d}.tar" for i in range(5)}
    read = {i: read_tar_samples(str(out / name)) for i, name in shard.items()}
    bad_label, bad_size = read[0][1][0], read[0][2][0]
    labels = json.loads(read[0][1][1]["attr.json"])
    read[0][1][1]["attr.json"] = json.dumps([2, *labels[1:]]).encode()
    read[0][2][1]["jpg"] = tiny_image(7, (100, 120))
    no_identity, members = read[0][3][0], sorted(read[0][3][1])
    del read[0][3][1]["identity.txt"]
    _rewrite_shard(out, shard[0], read[0])
    _rewrite_shard(out, shard[1], read[1][:-1])  # one sample short of the manifest's count
    _rewrite_shard(out, shard[2], read[2][::-1])  # keys in descending order
    _rewrite_shard(out, shard[3], read[4])  # shards 3 and 4 swapped: each in order, the split not
    _rewrite_shard(out, shard[4], read[3])
    shutil.copyfile(out / shard[1], out / "train" / "celeba-train-000099.tar")
    capsys.readouterr()
    assert verify_main([str(out), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    for problem in (f"{shard[0]}: sample {bad_label}: attr.json is not a list of 40 values 0/1",
                    f"{shard[0]}: sample {bad_size}: image is 100x120, the manifest says 178x218",
                    f"{shard[0]}: sample {no_identity}: members {sorted(set(members) - {'identity.txt'})}, "
                    f"expected {members}",
                    f"{shard[1]}: 3 samples, the manifest says 4",
                    f"{shard[2]}: keys are not unique and in ascending order",
                    f"{shard[4]}: key {read[3][0][0]} does not follow {read[4][-1][0]} of the previous shard",
                    "train/celeba-train-000099.tar: a shard file the manifest does not list"):
        assert f"celeba-dist verify: {problem}\n" in err, (problem, err)
    assert "sha256" not in err and "bytes, the manifest says" not in err
    assert "celeba-dist verify: " + str(out) + ": 7 problem(s)" in err


def test_cli_and_tool_script(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=8)
    assert cli.main(["pack", str(src.source), str(tmp_path / "a"), "--workers", "1"]) == 0
    done = subprocess.run([sys.executable, str(REPO / "tools" / "pack_shards.py"), str(src.source), str(tmp_path / "b"),
                           "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert tars(tmp_path / "a") == tars(tmp_path / "b")
    assert cli.main(["verify", str(tmp_path / "b")]) == 0


def test_manifest_api_rejects_bad_manifests(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=8)
    out = tmp_path / "out"
    pack(src.source, out)
    manifest = load_manifest(out)
    broken = json.loads(json.dumps(manifest))
    broken["splits"]["train"]["shards"][0]["num_samples"] = "many"
    with pytest.raises(ManifestError, match=r"manifest.json: key 'splits.train.shards\[0\].num_samples'"):
        write_manifest(out, broken)
    assert load_manifest(out) == manifest  # the failed write left the old file
    (out / MANIFEST_NAME).write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(out)
    with pytest.raises(ManifestError, match="no split 'dev'"):
        split_shards(manifest, out, "dev")
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path / "nowhere")


def test_a_manifest_whose_split_count_disagrees_with_its_shards_is_refused(tmp_path):
    """A split's ``num_samples`` (what the evaluation counts and the empty-split check trust) must be the sum
    of its shards' counts (what the loader deals): a manifest where they differ is an error naming the key."""
    src = write_celeba(tmp_path / "src", num_images=8)
    out = tmp_path / "out"
    pack(src.source, out)
    manifest = load_manifest(out)
    held = sum(s["num_samples"] for s in manifest["splits"]["train"]["shards"])
    manifest["splits"]["train"]["num_samples"] = held + 1
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=rf"manifest.json: key 'splits.train.num_samples' is {held + 1} but "
                                            rf"its shards hold {held}"):
        load_manifest(out)


def test_default_shard_size_feeds_512_loader_slots():
    # 8 nodes x 8 GPUs x 8 loader workers must all get a shard of full CelebA train (162,770 images).
    assert math.ceil(162_770 / DEFAULT_SAMPLES_PER_SHARD) >= 8 * 8 * 8


def test_pack_into_a_copy_of_a_finished_folder_is_a_no_op(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=10)
    out = tmp_path / "out"
    pack(src.source, out)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = tree_state(copy)
    pack(src.source, copy)
    assert tree_state(copy) == state


def test_sigterm_leaves_no_half_shard_and_the_rerun_resumes(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=24)  # 17 train images: 9 shards
    out = tmp_path / "out"
    # big re-encodes make the run slow enough to be stopped in the middle
    args = [str(src.source), str(out), "--resize", "1000x1100", "--samples-per-shard", "2", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "pack_shards.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.rglob("*.tar")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by signal" in err, err
    assert not list(out.rglob("*.tmp")) and not (out / MANIFEST_NAME).exists()
    kept = tree_state(out / "train")
    assert 0 < len(kept) < 9

    assert main(args) == 0
    after = tree_state(out / "train")
    assert all(after[name] == kept[name] for name in kept) and len(after) == 9
    assert verify_main([str(out)]) == 0
