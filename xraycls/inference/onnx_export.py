"""ONNX export of a bundle's backbone, checked against PyTorch with ONNX Runtime before it is kept.

The graph: input ``images`` float32 [batch, 3, input_size, input_size], normalised as
`ModelBundle.preprocess` gives it ((uint8 / 255 - mean) / std, the gray channel repeated to 3); output
``logits`` float32 [batch, len(labels)] in the bundle's label order (probabilities = sigmoid). The batch
axis is dynamic. The model's metadata (``metadata_props``) carries what a user needs beside the graph, as
JSON strings: ``labels``, ``preprocessing`` (the bundle's), ``thresholds`` (when the bundle has them),
``metrics``, plus ``disclaimer`` (`xraycls.disclaimer.DISCLAIMER`), ``xraycls_version`` and
``source_backbone``.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter, default since torch 2.9
and the one torch maintains. Both it and the deprecated TorchScript exporter (dynamo=False) export timm's
``test_vit`` (average pooling) and ViT-B/16 (CLS token) on torch 2.14; ONNX Runtime then matched PyTorch
to a max |logit difference| of about 3e-7 (test_vit) and 2e-6 (ViT-B/16) on CPU.

Check: `check_inputs` images of uint8 noise (a local generator), normalised as above, run through PyTorch
and ONNX Runtime (CPU), as one batch of `check_inputs` and as a batch of 1 (a second size for the dynamic
axis). If any logit differs by more than `atol`, `OnnxMismatchError` is raised and no file is left at
`out`: the model is written under a temporary name beside it and renamed only after the check passed.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xraycls
from xraycls.data.transforms import DeviceNormalize
from xraycls.disclaimer import DISCLAIMER
from xraycls.files import atomic_path
from xraycls.inference.bundle import ModelBundle

__all__ = ["ONNX_INPUT", "ONNX_OUTPUT", "OnnxMismatchError", "OnnxExportError", "export_onnx"]

log = logging.getLogger(__name__)

ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
_TRACE_BATCH = 2  # torch.export specialises a dimension of size 1, so trace with 2 to keep the batch dynamic


class OnnxExportError(RuntimeError):
    """The exporter could not turn the backbone into an ONNX graph."""


class OnnxMismatchError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


def _sample_inputs(bundle: ModelBundle, count: int, seed: int) -> torch.Tensor:
    prep = bundle.preprocessing
    size = int(prep["input_size"])
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, size=(count, size, size), dtype=np.uint8))
    # A CPU normaliser of its own: the bundle's may live on a GPU and must stay where it is.
    normalize = DeviceNormalize(prep["mean"], prep["std"], channels=int(prep.get("channels", 3)))
    return normalize(images)


def _metadata(bundle: ModelBundle) -> dict[str, str]:
    extra = bundle.config.get("extra") or {}
    props = {
        "labels": json.dumps(list(bundle.labels)),
        "preprocessing": json.dumps(bundle.preprocessing),
        "metrics": json.dumps(bundle.config.get("metrics") or {}),
        "disclaimer": DISCLAIMER,
        "xraycls_version": xraycls.__version__,
        "source_backbone": str(bundle.config.get("backbone", type(bundle.model).__name__)),
    }
    if extra.get("thresholds") is not None:
        props["thresholds"] = json.dumps(extra["thresholds"])
    return props


def _export(
    model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None, props: dict
) -> None:
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
        )
    except Exception as err:  # the exporter raises many types; one message names the model and opset
        raise OnnxExportError(
            f"ONNX export (opset {opset or 'default'}) failed: {type(err).__name__}: {err}"
        ) from err
    program.model.metadata_props.update(props)
    # One self-contained file (weights inside), so it can be renamed into place; limit 2 GB (ViT-L fits).
    program.save(str(path), external_data=False)


def _max_abs_diff(session: Any, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(inputs).float().numpy()
    (actual,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: inputs.numpy()})
    if actual.shape != expected.shape:
        raise OnnxMismatchError(f"ONNX output shape {list(actual.shape)} != PyTorch's {list(expected.shape)}")
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))


def export_onnx(
    bundle: ModelBundle,
    out: Path,
    *,
    opset: int | None = None,
    check_inputs: int = 4,
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the bundle's backbone as ONNX to `out` and check it against PyTorch (module doc).

    `opset` None takes the exporter's default. Returns a JSON-ready report: ``path``, ``bytes``,
    ``exporter``, ``opset``, ``input``/``output`` (name and shape, "batch" the dynamic axis),
    ``checked_batches``, ``max_abs_diff`` (logits), ``atol``, ``onnxruntime`` (version). Raises
    ValueError for bad arguments, OnnxExportError when the exporter fails and OnnxMismatchError when the
    outputs differ; in both cases nothing is left at `out` (an earlier file there is kept).
    """
    import onnx
    import onnxruntime

    out = Path(out)
    if check_inputs < 1:
        raise ValueError(f"check_inputs must be >= 1 (images compared with PyTorch), got {check_inputs}")
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")
    if out.is_dir():
        raise ValueError(f"ONNX output {out} is a folder; give a file name such as {out / 'model.onnx'}")
    model = getattr(bundle.model, "_orig_mod", bundle.model)
    if next(model.parameters()).device.type != "cpu":  # export and compare on the CPU; leave the bundle be
        model = copy.deepcopy(model).cpu()
    model.eval()
    inputs = _sample_inputs(bundle, max(check_inputs, _TRACE_BATCH), seed)
    with atomic_path(out) as tmp:  # nothing is written unless the check passes
        _export(model, inputs[:_TRACE_BATCH], tmp, opset, _metadata(bundle))
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        batches = [check_inputs, 1] if check_inputs > 1 else [1]
        diff = max(_max_abs_diff(session, model, inputs[:size]) for size in batches)
        if not diff <= atol:  # NaN fails too
            raise OnnxMismatchError(
                f"ONNX model for {out} does not reproduce PyTorch: max |logit difference| {diff:.3g} > "
                f"atol {atol:g} over {check_inputs} sample inputs; nothing was written"
            )
        opset_used = next(
            (
                entry.version
                for entry in onnx.load(str(tmp), load_external_data=False).opset_import
                if entry.domain in ("", "ai.onnx")
            ),
            None,
        )
    size = int(bundle.preprocessing["input_size"])
    report = {
        "path": str(out),
        "bytes": out.stat().st_size,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": opset_used,
        "input": {"name": ONNX_INPUT, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {"name": ONNX_OUTPUT, "shape": ["batch", len(bundle.labels)], "dtype": "float32"},
        "checked_batches": batches,
        "max_abs_diff": diff,
        "atol": atol,
        "onnxruntime": onnxruntime.__version__,
    }
    log.info("ONNX model written to %s (opset %s, max |logit diff| %.2g)", out, opset_used, diff)
    return report
