"""``export --onnx``: the classifier (images → probabilities) as ONNX with a dynamic batch size, checked
against PyTorch with onnxruntime on the CPU before the export is kept."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from celeba_dist.data.transforms import normalize_batch
from celeba_dist.export.loading import AttributeClassifier

log = logging.getLogger(__name__)
TOLERANCE = 1e-4  # max abs difference of probabilities between onnxruntime and PyTorch


class OnnxMismatchError(RuntimeError):
    """onnxruntime's probabilities differ from PyTorch's beyond :data:`TOLERANCE`."""


def check_inputs(size: tuple[int, int], normalize: str, batch: int, seed: int) -> torch.Tensor:
    """A batch the model's size and normalisation, from random uint8 images."""
    g = torch.Generator().manual_seed(seed)
    return normalize_batch(torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=g), normalize)


def export_onnx(model: AttributeClassifier, path: Path, *, size: tuple[int, int], normalize: str,
                opset: int) -> float:
    """Write ``path`` and return the max abs difference of probabilities found by the check (raises
    :class:`OnnxMismatchError` past :data:`TOLERANCE`). The check uses another batch size than the export."""
    import onnxruntime

    model = model.eval().cpu()
    example = check_inputs(size, normalize, 2, seed=0)
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
                      input_names=["images"],
                      output_names=["probabilities"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = check_inputs(size, normalize, 5, seed=1)
    with torch.no_grad():
        expected = model(inputs)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    diff = float((got - expected).abs().max())
    if got.shape != expected.shape or diff >= TOLERANCE:
        raise OnnxMismatchError(f"{path}: onnxruntime's probabilities differ from PyTorch's by {diff:.2e} "
                                f"(shape {tuple(got.shape)} vs {tuple(expected.shape)}; tolerance {TOLERANCE:.0e}): "
                                "the export is not kept")
    return diff
