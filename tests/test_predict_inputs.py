"""``celeba-dist predict`` and ``eval`` on the inputs users get wrong, through their real ``main``: ids that name
their files in nested folders, one image file, 16-bit PNGs, a damaged JPEG named by its file, and bad numbers,
outputs, inputs and checkpoints refused in one line before any work, with nothing written."""
from __future__ import annotations

import csv
import json
import io
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import celeba_dist
from celeba_dist.config import load_config
from celeba_dist.data.streams import ShardData
from celeba_dist.data.transforms import decode_rgb
from celeba_dist.evaluate import main as eval_main
from celeba_dist.export.cli import main as export_main
from celeba_dist.predict import main as predict_main
from celeba_dist.train.main import cli_main as train_main
from celeba_dist.train.main import main as train
from test_export import cli
from test_train import cpu_env

SETTINGS = ["data.batch_size=16", "data.num_workers=0", "data.image_size=[32, 32]", "log.progress_bar=false",
            "log.image_grid_size=0", "train.epochs=1", "train.eval_splits=[val]"]


@pytest.fixture(scope="module")
def run(pristine, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    train(load_config("smiling_simple_cnn", SETTINGS, data_dir=str(pristine), run_dir=str(run_dir)))
    return run_dir


@pytest.fixture(scope="module")
def images(pristine) -> Path:
    """The JPEGs the pristine shards were packed from."""
    return pristine.parent / "celeba-300-0" / "img_align_celeba"


def predict_rows(*args: str) -> dict[str, list[float]]:
    out = Path(args[args.index("--out") + 1])
    assert predict_main(list(args)) == 0
    with open(out, newline="") as fh:
        return {row["id"]: [float(row["Smiling_prob"])] for row in csv.DictReader(fh)}


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_ids_in_a_nested_folder_are_unique_and_name_their_files(run, images, tmp_path):
    folder = tmp_path / "photos"
    (folder / "good" / "sub").mkdir(parents=True)
    shutil.copyfile(images / "000001.jpg", folder / "good" / "a.jpg")
    shutil.copyfile(images / "000002.jpg", folder / "good" / "sub" / "a.jpg")
    Image.open(images / "000003.jpg").save(folder / "good" / "a.png")
    shutil.copyfile(images / "000004.jpg", folder / "good" / "000004.jpg")  # a unique name keeps its stem
    rows = predict_rows("--checkpoint", str(run), "--input", str(folder), "--out", str(tmp_path / "p.csv"))
    assert sorted(rows) == ["000004", "good/a.jpg", "good/a.png", "good/sub/a.jpg"]
    model, preprocess = celeba_dist.load(run)
    for key, probs in rows.items():
        file = folder / key if (folder / key).is_file() else folder / "good" / f"{key}.jpg"
        assert probs == pytest.approx(model(preprocess([file]))[0].tolist(), abs=1e-6), key
    # one image file as the input: its row is the folder's row for that file
    single = predict_rows("--checkpoint", str(run), "--input", str(folder / "good" / "a.png"),
                          "--out", str(tmp_path / "one.csv"))
    assert single == {"a": rows["good/a.png"]}


def test_an_id_never_repeats_another_files_path(tmp_path):
    """``x.jpg.png`` beside ``x.jpg`` and ``sub/x.jpg``: the two ``x`` files are named by their paths, so the
    third, whose stem is ``x.jpg``, is too; every id is unique and names one file."""
    from celeba_dist.data.folder import find_images

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("x.jpg", "sub/x.jpg", "x.jpg.png"):
        (folder / name).write_bytes(b"image")
    assert dict(find_images(folder)) == {"x.jpg": folder / "x.jpg", "sub/x.jpg": folder / "sub" / "x.jpg",
                                         "x.jpg.png": folder / "x.jpg.png"}


def test_predict_with_loader_workers_writes_each_image_once(run, images, tmp_path):
    """``data.num_workers`` (2 by default) splits the images between the loader workers: one row per image,
    with the probabilities of a run without workers."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(1, 8):
        shutil.copyfile(images / f"{i:06d}.jpg", folder / f"{i:06d}.jpg")
    rows = {}
    for workers in (0, 2):
        out = tmp_path / f"p{workers}.csv"
        assert predict_main(["--checkpoint", str(run), "--input", str(folder), "--out", str(out),
                             "--set", f"data.num_workers={workers}"]) == 0
        with open(out, newline="") as fh:
            rows[workers] = [(row["id"], float(row["Smiling_prob"])) for row in csv.DictReader(fh)]
    assert sorted(i for i, _ in rows[2]) == [f"{i:06d}" for i in range(1, 8)]
    assert dict(rows[2]) == pytest.approx(dict(rows[0]), abs=1e-5)


def test_a_16_bit_png_reads_as_its_8_bit_image_not_white(run, images, tmp_path):
    grey = np.asarray(Image.open(images / "000005.jpg").convert("L"))
    folder = tmp_path / "png"
    folder.mkdir()
    Image.fromarray(grey).save(folder / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")  # 65535 is 255: the same picture
    assert Image.open(folder / "sixteen.png").mode == "I;16"
    decoded = np.asarray(decode_rgb((folder / "sixteen.png").read_bytes()))
    assert decoded.shape == (*grey.shape, 3) and (decoded == grey[..., None]).all()
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.int32) * 257).save(buf, format="TIFF")  # mode I, the same 16-bit values
    assert (np.asarray(decode_rgb(buf.getvalue())) == grey[..., None]).all()
    rows = predict_rows("--checkpoint", str(run), "--input", str(folder), "--out", str(tmp_path / "p.csv"))
    assert rows["sixteen"] == pytest.approx(rows["eight"], abs=1e-6)


def test_a_damaged_jpeg_is_named_by_its_file(run, images, tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "cut.jpg").write_bytes((images / "000006.jpg").read_bytes()[:3000])
    proc = cli("predict", "--checkpoint", str(run), "--input", str(folder), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert f"{folder / 'cut.jpg'}: Premature end of JPEG file" in said
    assert "JpegWarning" not in said  # no bare Python warning without the file's name


@pytest.mark.parametrize("args, says", [
    (["--batch-size", "-1"], "argument --batch-size: must be >= 1, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--out", "{tmp}"], "argument --out: {tmp} is a folder"),
    (["--out", "{tmp}/afile/x.csv"], "argument --out: cannot write {tmp}/afile/x.csv: {tmp}/afile is a file"),
])
def test_bad_numbers_and_outputs_stop_predict_before_any_work(run, images, tmp_path, capsys, args, says):
    (tmp_path / "afile").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as stop:
        predict_main(["--checkpoint", str(run), "--input", str(images), *out, *args])
    assert stop.value.code == 2 and says.format(tmp=tmp_path) in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("out", ["{tmp}", "{tmp}/afile/x.json"])
def test_a_bad_out_stops_eval_before_it_evaluates(run, tmp_path, capsys, out):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        eval_main(["--run", str(run), "--split", "val", "--out", out.format(tmp=tmp_path)])
    said = capsys.readouterr()
    assert stop.value.code == 2 and "argument --out" in said.err and not said.out  # no table: nothing was computed
    assert (tmp_path / "afile").read_text() == "mine"


def test_eval_reports_a_failed_metrics_write_in_one_line(run, capsys):
    blocked = run / "eval_val.json"  # eval --run's default output, here a folder
    blocked.mkdir()
    try:
        assert eval_main(["--run", str(run), "--split", "val"]) == 1
    finally:
        blocked.rmdir()
    assert error_line(capsys).startswith(f"celeba-dist eval: error: cannot write the metrics to {blocked}")


def test_input_mistakes_are_named(run, images, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copyfile(images / "000001.jpg", folder / "a.jpg")
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    for source, extra, says in (
            (folder, [], f"{folder / 'gone.jpg'} is a link to {tmp_path / 'nowhere.jpg'}, which does not exist"),
            (tmp_path / "missing", [], f"--input {tmp_path / 'missing'} does not exist"),
            (tmp_path / "notes.txt", [], "is neither a folder nor an image file"),
            (images, ["--split", "test"], f"--split test needs a packed shards folder, and {images} is not one")):
        assert predict_main(["--checkpoint", str(run), "--input", str(source), "--out", str(out), *extra]) == 1
        assert says in error_line(capsys) and not out.exists()


def test_a_missing_or_folder_checkpoint_is_named_not_called_corrupt(run, pristine, tmp_path, capsys):
    missing, folder = tmp_path / "nonexist.pt", run / "checkpoints"
    for name, main, args in (
            ("eval", eval_main, ["--checkpoint", str(missing)]),
            ("predict", predict_main, ["--checkpoint", str(missing), "--input", str(pristine),
                                       "--out", str(tmp_path / "p.csv")]),
            ("export", export_main, [str(missing), str(tmp_path / "export")]),
            ("train", train_main, ["--config", "smiling_simple_cnn", "--data", str(pristine), "--run-dir",
                                   str(tmp_path / "run"), "--resume", str(missing), "--set", *SETTINGS])):
        assert main(args) == 1, name
        assert error_line(capsys) == f"celeba-dist {name}: error: no checkpoint file {missing}"
    assert eval_main(["--checkpoint", str(folder)]) == 1
    assert error_line(capsys) == f"celeba-dist eval: error: {folder} is a folder, not a checkpoint file"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint file {missing}"):
        celeba_dist.load(missing)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "export").exists()


def test_loaded_model_gives_probabilities_without_an_autograd_graph(run, images):
    model, preprocess = celeba_dist.load(run)
    probs = model(preprocess([images / "000001.jpg"]))  # no torch.no_grad() here, as in a notebook
    assert probs.grad_fn is None and not probs.requires_grad
    assert torch.all((probs >= 0) & (probs <= 1))


def test_eval_of_a_run_scores_its_best_checkpoint_on_the_split_asked(run, pristine, tmp_path, capsys):
    """`eval --run RUN --split val` evaluates RUN's best.pt, not its newest checkpoint, on val: every val sample
    once, and the metrics the run itself recorded for val."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    best = torch.load(copy / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    newer = {**best, "model": {k: -v if v.is_floating_point() else v for k, v in best["model"].items()}}
    torch.save(newer, copy / "checkpoints" / "step-999999999.pt")  # a later checkpoint that validation never chose
    assert eval_main(["--run", str(copy), "--split", "val"]) == 0
    capsys.readouterr()
    got = json.loads((copy / "eval_val.json").read_text())
    recorded = json.loads((run / "metrics.json").read_text())["val"]
    assert got["split"] == "val" and got["checkpoint"] == str(copy / "checkpoints" / "best.pt")
    assert got["mean"]["num_samples"] == ShardData(str(pristine)).split("val").num_samples == recorded["mean"]["num_samples"]
    assert got["attributes"] == recorded["attributes"] and got["mean"] == recorded["mean"]



def test_ctrl_c_ends_predict_at_once_with_130_and_writes_nothing(run, pristine, tmp_path):
    """A Ctrl-C in `predict` (here while it writes its rows): exit 130, one line, no traceback, no CSV and no
    temporary file left."""
    out = tmp_path / "p.csv"
    proc = subprocess.Popen([sys.executable, "-m", "celeba_dist", "predict", "--checkpoint", str(run), "--input",
                             str(pristine), "--out", str(out), "--batch-size", "1"],
                            env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".p.csv.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "predict ended before its rows were being written"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "celeba-dist predict: interrupted"
    assert "Traceback" not in stderr and "wrote" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_with_another_tools_config_json_is_not_read_as_an_export(tmp_path):
    """A Hugging Face model folder (its own config.json and model.safetensors) is named as not ours, not
    read until a KeyError or a load_state_dict error."""
    hub = tmp_path / "vit-model"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"model_type": "vit", "num_labels": 40}))
    (hub / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        celeba_dist.load(hub)
    assert str(err.value) == f"{hub / 'config.json'} is not a celeba-dist export (format None)"
