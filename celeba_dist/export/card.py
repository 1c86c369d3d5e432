"""The model card of an export: a Hugging Face README.md with YAML metadata, built from the run's own files."""
from __future__ import annotations

from typing import Any

import yaml

from celeba_dist.train.metrics import METRICS

LIMITATIONS = """\
- **Labels.** CelebA's 40 attributes were annotated once per image by crowd workers; several (Attractive,
  Oval_Face, Pointy_Nose, Big_Lips, ...) are subjective, and published audits find many labels wrong.
  Accuracy on them measures agreement with those annotators, not a fact about the face.
- **Who is in it.** CelebA holds about 10,000 celebrities, mostly young, light-skinned and from Western
  media; the model is less reliable on faces unlike them. Check per-group performance before any use.
- **Images.** Aligned, cropped 178x218 celebrity photos; other crops, poses, resolutions or cameras are
  out of distribution.
- **Not for** identifying people, inferring sensitive traits (such as gender identity or ethnicity) or
  making decisions about individuals. Intended use: research and teaching on multi-label classification."""


def model_card(*, meta: dict[str, Any], metrics: dict | None, data: dict | None, env: dict | None,
               has_chart: bool) -> str:
    """README.md: metadata, the model, the recipe, the training data, the metrics, hardware and time."""
    front = {"library_name": "celeba-dist", "pipeline_tag": "image-classification",
             "tags": ["image-classification", "multi-label", "facial-attributes", "celeba", "celeba-dist",
                      meta["model"]["name"]],
             "datasets": ["celeba"], "metrics": ["accuracy", "f1", "roc_auc"]}
    parts = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---", f"# {meta['model']['name']} on CelebA attributes",
             _model_section(meta), _data_section(data), _metrics_section(metrics, has_chart),
             _hardware_section(env, metrics), "## Intended use and limitations\n\n" + LIMITATIONS,
             "## Recipe\n\nThe run's whole resolved configuration:\n\n```yaml\n"
             + yaml.safe_dump(meta["config"], sort_keys=False) + "```"]
    return "\n\n".join(p for p in parts if p) + "\n"


def _model_section(meta: dict) -> str:
    h, w = meta["input_size"]
    return (f"Multi-label classifier of {len(meta['attributes'])} CelebA attribute(s), trained with "
            f"celeba-dist {meta['celeba_dist_version']}. Input: RGB {h}x{w} (transform `{meta['transform']}`, "
            f"normalisation `{meta['normalize']}`); output: one probability per attribute, in the order of "
            f"`config.json`'s `attributes`, decided with its `thresholds`"
            + (", averaged with the mirrored image's (flip test-time augmentation)" if meta.get("tta") == "flip" else "")
            + ". Weights: " + ("the exponential moving average of the trained weights, which validation preferred"
                               if meta.get("weights") == "ema" else "the trained weights") + ".\n\n"
            "```python\nimport celeba_dist\nmodel, preprocess = celeba_dist.load(\"THIS_FOLDER\")\n"
            "probs = model(preprocess([\"face.jpg\"]))  # (1, attributes)\n```")


def _data_section(data: dict | None) -> str:
    if not data:
        return "## Training data\n\nNot recorded (the run predates `data.json`)."
    source = data.get("source") or {}
    counts = ", ".join(f"{name} {n:,}" for name, n in data["splits"].items())
    return (f"## Training data\n\nCelebA shards packed by celeba-dist from a `{source.get('kind')}` source "
            f"(partition: {source.get('partition')}); samples per split: {counts}. Shard manifest sha256: "
            f"`{data['manifest_sha256']}`.")


def _metrics_section(metrics: dict | None, has_chart: bool) -> str:
    if not metrics:
        return "## Metrics\n\nNone recorded: the run has not finished its final evaluation."
    out = ["## Metrics", f"Best epoch {metrics.get('best_epoch')} (selected on validation)."]
    for split in ("val", "test"):
        if split not in metrics:
            continue
        rows = [f"### {split} ({metrics[split]['mean']['num_samples']:,} images)", "",
                "| attribute | " + " | ".join(METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
        per = {**metrics[split]["attributes"], "**mean**": metrics[split]["mean"]}
        for name, values in per.items():
            rows.append(f"| {name} | " + " | ".join(_fmt(values.get(m)) for m in METRICS) + " |")
        out.append("\n".join(rows))
    if has_chart:
        out.append("Test accuracy per attribute:\n\n![accuracy per attribute](accuracy.png)")
    return "\n\n".join(out)


def _hardware_section(env: dict | None, metrics: dict | None) -> str:
    if not env:
        return ""
    devices = ", ".join(env.get("cuda_devices") or []) or env.get("device")
    seconds = sum(h.get("seconds", 0) for h in (metrics or {}).get("history", []))
    return (f"## Hardware and time\n\n{env.get('world_size')} process(es) on {devices} ({env.get('host')}), "
            f"precision `{env.get('mixed_precision')}`, torch {env.get('torch')}; {seconds:.0f} s of training "
            f"over {len((metrics or {}).get('history', []))} epoch(s).")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
