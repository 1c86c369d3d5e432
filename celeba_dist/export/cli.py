"""``celeba-dist export RUN_OR_CHECKPOINT OUT_DIR``: a folder a Hugging Face Hub user recognises.

``model.safetensors`` (the weights only), ``config.json`` (model, attributes in output order, thresholds,
input size, normalisation, version, the resolved config) and ``README.md`` (a model card with the run's
metrics per attribute and its accuracy chart, ``accuracy.png``). It reads the checkpoint safely and the
run folder's ``metrics.json``, ``data.json`` and ``env.json`` when present; never the training data.
``metrics.json`` describes the run's best checkpoint only: the card of any other checkpoint says that its
weights were not evaluated, and how to evaluate them. The folder appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from PIL import Image

from celeba_dist import __version__
from celeba_dist.cli_args import positive_int, report_error
from celeba_dist.config import ConfigError
from celeba_dist.diskio import atomic_dir
from celeba_dist.export.card import model_card
from celeba_dist.export.loading import EXPORT_CONFIG, EXPORT_WEIGHTS, FORMAT, Trained, read_trained
from celeba_dist.train.checkpoint import BEST

log = logging.getLogger("celeba_dist.export")


def run_folder(source: Path) -> Path | None:
    """The run a checkpoint or run folder belongs to (RUN/checkpoints/x.pt → RUN)."""
    if source.is_dir():
        return source
    return source.parent.parent if source.parent.name == "checkpoints" else None


def export_meta(trained: Trained) -> dict:
    cfg = trained.cfg
    return {"format": FORMAT, "format_version": 1, "celeba_dist_version": __version__,
            "model": {"name": cfg.model.name, "options": dict(cfg.model.options)},
            "attributes": trained.attributes, "thresholds": [float(t) for t in trained.thresholds],
            "input_size": list(cfg.data.image_size), "transform": cfg.data.transform,
            "normalize": cfg.data.normalize, "loss": cfg.loss.name, "source": str(trained.source),
            "weights": trained.weights, "step": trained.step, "tta": cfg.eval.tta,
            "config": cfg.to_dict()}


def describes(metrics: dict | None, trained: Trained) -> bool:
    """Whether the run's ``metrics.json`` evaluated these very weights: its best step and weights choice
    (raw or EMA). A metrics.json of a version without ``best_step`` can only vouch for ``best.pt``."""
    if not metrics:
        return False
    if "best_step" not in metrics:
        return trained.source.name == BEST
    return metrics["best_step"] == trained.step and metrics.get("weights", trained.weights) == trained.weights


def _read_json(folder: Path | None, name: str) -> dict | None:
    path = folder / name if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def export(source: Path, out: Path, *, onnx: bool = False, opset: int = 18) -> Path:
    """Write the export folder ``out`` from a run folder or checkpoint; returns ``out``. With ``onnx``,
    also ``model.onnx``, checked against PyTorch by onnxruntime (the export fails if it differs)."""
    from safetensors.torch import save_file

    from celeba_dist.train.board import accuracy_bars

    trained = read_trained(source)
    run = run_folder(source)
    run_metrics = _read_json(run, "metrics.json")
    metrics = run_metrics if describes(run_metrics, trained) else None
    meta = export_meta(trained)
    chart = metrics.get("test") or metrics.get("val") if metrics else None
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained.state_dict.items()}
        save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt", "celeba_dist": __version__})
        (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if chart:
            Image.fromarray(accuracy_bars(chart)).save(tmp / "accuracy.png")
        if onnx:
            meta["onnx"] = _onnx(trained, tmp / "model.onnx", opset)
            (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        card = model_card(meta=meta, metrics=metrics, run_metrics=run_metrics, data=_read_json(run, "data.json"),
                          env=_read_json(run, "env.json"), has_chart=bool(chart))
        (tmp / "README.md").write_text(card)
    log.info("exported %s to %s", trained.source, out)
    return out


def _onnx(trained: Trained, path: Path, opset: int) -> dict:
    from celeba_dist.export.loading import build_classifier
    from celeba_dist.export.onnx import TOLERANCE, export_onnx

    diff = export_onnx(build_classifier(trained), path, size=tuple(trained.cfg.data.image_size),
                       normalize=trained.cfg.data.normalize, opset=opset)
    log.info("model.onnx checked with onnxruntime (CPU): max abs difference of probabilities %.2e (< %.0e)",
             diff, TOLERANCE)
    print(f"model.onnx: onnxruntime matches PyTorch, max abs difference of probabilities {diff:.2e} "
          f"(tolerance {TOLERANCE:.0e})")
    return {"file": path.name, "opset": opset, "input": "images (batch, 3, H, W), normalised",
            "output": "probabilities (batch, attributes)", "max_abs_diff_vs_pytorch": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba-dist export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run folder (its checkpoints/best.pt) or a checkpoint file")
    parser.add_argument("out", help="the export folder to create (must not exist, or be empty)")
    parser.add_argument("--onnx", action="store_true", help="also model.onnx (needs the 'export' extra)")
    parser.add_argument("--opset", type=positive_int, default=18, help="ONNX opset (default 18)")
    args = parser.parse_args(argv)
    try:
        export(Path(args.source), Path(args.out), onnx=args.onnx, opset=args.opset)
    except (ConfigError, FileNotFoundError, FileExistsError, RuntimeError, ValueError, OSError, ImportError) as exc:
        return report_error("celeba-dist export", exc)
    print(f"exported {args.source} to {args.out}: {EXPORT_WEIGHTS}, {EXPORT_CONFIG}, README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
