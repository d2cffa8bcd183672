"""Hugging Face transformers ViT classifiers <-> xraycls bundles: `import_hf` and `export_hf`.

`import_hf` turns a ``ViTForImageClassification`` folder (the guide's fine-tuned model) into a bundle that
`load_bundle` and ``xraycls predict`` use: timm names (`xraycls.model.hf_vit`), classifier rows reordered
by label name from its ``id2label`` into `LABELS` order, preprocessing from ``preprocessor_config.json``,
and what the folder says about its training under ``extra.provenance``. It reads json, safetensors and
``torch.load(weights_only=True)`` only: transformers need not be installed.

`export_hf` writes a bundle as a ``ViTForImageClassification`` folder (config.json with our labels and
``problem_type: multi_label_classification``, model.safetensors with transformers' names,
preprocessor_config.json) for serving with transformers, and checks transformers' logits against the
bundle's before the folder is kept. Its config keeps timm's layer norm eps (1e-6), so both compute the
same function. Needs transformers (``pip install -e .[hf]``).

Preprocessing differs in one detail: transformers' processor resizes any image straight to the model's
size (bilinear), xraycls decodes to gray, resizes to ``image_size`` then ``input_size`` (area).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch

from xraycls.data.transforms import DeviceNormalize
from xraycls.files import atomic_dir
from xraycls.findings import LABELS
from xraycls.inference.bundle import export_bundle, load_bundle, make_preprocessing
from xraycls.model import hf_vit
from xraycls.model.backbone import create_backbone, load_weights_file

__all__ = ["HF_PREPROCESSOR", "HF_EXPORT_ATOL", "import_hf", "export_hf"]

log = logging.getLogger(__name__)

HF_PREPROCESSOR = "preprocessor_config.json"
HF_EXPORT_ATOL = 1e-4  # max |logit difference| transformers vs timm accepted at export (seen: ~1e-6)
_INSTALL_HINT = "needs the transformers package: pip install -e .[hf]"
_TIMM_FAMILIES = {  # (width, depth, heads, mlp width) -> timm's name stem
    (192, 12, 3, 768): "vit_tiny",
    (384, 12, 6, 1536): "vit_small",
    (768, 12, 12, 3072): "vit_base",
    (1024, 24, 16, 4096): "vit_large",
    (1280, 32, 16, 5120): "vit_huge",
}
_TRAINING_FILES = ("all_results.json", "train_results.json", "eval_results.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def _label_order(config: dict[str, Any], rows: int, where: str) -> list[int]:
    """Row of the transformers classifier for each of `LABELS`; ValueError naming missing/extra labels."""
    id2label = config.get("id2label") or {}
    try:
        names = [str(id2label[key]) for key in sorted(id2label, key=int)]
        ids = sorted(int(key) for key in id2label)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{where}: id2label {id2label} is not a mapping of 0..n-1 to names") from err
    if ids != list(range(rows)):
        raise ValueError(f"{where}: id2label has ids {ids}, the classifier {rows} rows")
    missing = [name for name in LABELS if name not in names]
    extra = sorted({name for name in names if name not in LABELS or names.count(name) > 1})
    if missing or extra:
        raise ValueError(
            f"{where}: its labels are not xraycls's {len(LABELS)}: missing {missing}, extra or repeated "
            f"{extra} (expected exactly {list(LABELS)})"
        )
    return [names.index(name) for name in LABELS]


def _hf_preprocessing(src: Path, image_size: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The bundle's preprocessing from ``preprocessor_config.json`` (if absent: ViTImageProcessor's)."""
    path = src / HF_PREPROCESSOR
    raw = _read_json(path) if path.is_file() else None
    if raw is None:
        log.warning(
            "%s: no %s; ViTImageProcessor's defaults assumed (mean = std = 0.5)", src, HF_PREPROCESSOR
        )
    proc = raw or {}
    size = proc.get("size", image_size) if proc.get("do_resize", True) else image_size
    if isinstance(size, dict):  # {"height": h, "width": w}; other forms (shortest_edge) are not ViT's
        size = size.get("height") if size.get("height") == size.get("width") else None
    if size != image_size:
        raise ValueError(
            f"{path}: size {proc.get('size')!r} is not the model's image_size {image_size} squared"
        )
    factor = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    if not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise ValueError(f"{path}: rescale to {factor} per unit; xraycls scales uint8 by 1/255 only")
    if proc.get("do_normalize", True):
        mean, std = proc.get("image_mean", [0.5] * 3), proc.get("image_std", [0.5] * 3)
    else:
        mean, std = 0.0, 1.0
    return make_preprocessing(image_size, image_size, mean, std), raw


def _timm_backbone(arch: hf_vit.VitArch) -> tuple[str, dict[str, Any]]:
    """A timm ViT name and `create_backbone` keywords that rebuild `arch` with a 15-way head."""
    stem = _TIMM_FAMILIES.get((arch.hidden_size, arch.depth, arch.heads, arch.mlp_size))
    exact = f"{stem}_patch{arch.patch_size}_{arch.image_size}"
    name = exact if stem and timm.is_model(exact) else f"{stem or 'vit_base'}_patch16_224"
    kwargs: dict[str, Any] = {"num_classes": len(LABELS)}
    with torch.device("meta"):
        base = hf_vit.timm_arch(timm.create_model(name, pretrained=False))
    wanted = {
        "patch_size": (arch.patch_size, base.patch_size),
        "img_size": (arch.image_size, base.image_size),
        "embed_dim": (arch.hidden_size, base.hidden_size),
        "depth": (arch.depth, base.depth),
        "num_heads": (arch.heads, base.heads),
        "mlp_ratio": (arch.mlp_size / arch.hidden_size, base.mlp_size / base.hidden_size),
        "qkv_bias": (arch.qkv_bias, base.qkv_bias),
    }
    kwargs |= {key: mine for key, (mine, theirs) in wanted.items() if mine != theirs}
    return name, kwargs


def _provenance(
    src: Path, config: dict[str, Any], weights: Path, proc: dict[str, Any] | None
) -> dict[str, Any]:
    """What the folder says about the model's origin and training (trainer_state.json, *_results.json)."""
    prov: dict[str, Any] = {
        "source": "transformers ViTForImageClassification",
        "source_dir": str(src.resolve()),
        "weights_file": weights.name,
        "architectures": config.get("architectures"),
        "name_or_path": config.get("_name_or_path"),
        "transformers_version": config.get("transformers_version"),
        "problem_type": config.get("problem_type"),
        "source_labels": [config["id2label"][key] for key in sorted(config["id2label"], key=int)],
        "layer_norm_eps": {"transformers": config.get("layer_norm_eps", 1e-12), "timm": 1e-6},
        "image_processor": proc,
    }
    state_path = src / "trainer_state.json"
    if state_path.is_file():
        state = _read_json(state_path)
        history = state.get("log_history") or []
        keep = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size", "best_metric")
        prov["trainer_state"] = {key: state.get(key) for key in keep if key in state}
        prov["trainer_state"]["log_history_last"] = history[-3:]
        runtime = [entry["train_runtime"] for entry in history if "train_runtime" in entry]
        if runtime:
            prov["trainer_state"]["train_runtime_s"] = runtime[-1]
    for name in _TRAINING_FILES:
        if (src / name).is_file():
            prov[name.removesuffix(".json")] = _read_json(src / name)
    return prov


def import_hf(src_dir: Path, out_dir: Path) -> Path:
    """Write the ``ViTForImageClassification`` folder `src_dir` as an xraycls bundle `out_dir`; returns it.

    Raises FileNotFoundError for a missing folder, config or weights file; ValueError for labels other than
    `LABELS` (names missing or extra), a shape timm's ViT cannot rebuild, a pickle that is not plain tensors.
    """
    src = Path(src_dir)
    where = f"transformers folder {src}"
    if not src.is_dir():
        raise FileNotFoundError(f"{where}: no such folder")
    config = hf_vit.read_hf_config(src)
    if config is None:
        raise FileNotFoundError(f"{where}: {hf_vit.HF_CONFIG} is missing")
    weights = hf_vit.hf_weights_file(src)
    encoder, classifier = hf_vit.split_classifier(load_weights_file(weights))
    if not hf_vit.is_hf_vit(encoder) or "weight" not in classifier:
        raise ValueError(
            f"{where}: not a ViTForImageClassification (no ViT encoder or no classifier.weight); a bare ViT "
            f"is fine-tuning material: model.weights={src}"
        )
    if config.get("problem_type") == "single_label_classification":
        log.warning("%s was trained single-label (softmax); xraycls reads its logits through a sigmoid", src)
    order = _label_order(config, classifier["weight"].shape[0], where)
    arch = hf_vit.hf_arch(encoder, config, where)
    state = hf_vit.hf_to_timm(encoder, where)
    state["head.weight"] = classifier["weight"][order]
    state["head.bias"] = classifier.get("bias", torch.zeros(len(order)))[order]
    name, kwargs = _timm_backbone(arch)
    model = create_backbone(name, weights="none", **kwargs)
    hf_vit.check_same_arch(arch, hf_vit.timm_arch(model), where, name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where}: its tensors do not fit timm's {name} {kwargs}: {err}") from err
    prep, proc = _hf_preprocessing(src, arch.image_size)
    extra = {"provenance": _provenance(src, config, weights, proc)}
    export_bundle(
        model, Path(out_dir), backbone_name=name, backbone_kwargs=kwargs, preprocessing=prep, extra=extra
    )
    log.info("imported %s as %s (%s %s)", src, out_dir, name, kwargs)
    return Path(out_dir)


def _per_channel(value: float | list[float]) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def export_hf(model_dir: Path, out_dir: Path) -> Path:
    """Write the bundle `model_dir` as a transformers ``ViTForImageClassification`` folder; returns it.

    Refuses (ValueError) a backbone transformers' ViT cannot express (e.g. global_pool avg) and an
    `out_dir` holding anything but a previous export; RuntimeError when transformers is missing or its
    logits differ from the bundle's by more than `HF_EXPORT_ATOL` (then nothing is left at `out_dir`).
    """
    try:
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    except ImportError as err:
        raise RuntimeError(f"export to a transformers folder {_INSTALL_HINT}") from err
    bundle = load_bundle(Path(model_dir))
    model, out_dir = bundle.model, Path(out_dir)
    obstacles = hf_vit.timm_vit_obstacles(model) if hasattr(model, "blocks") else ["not a timm ViT"]
    if obstacles:
        raise ValueError(
            f"model bundle {model_dir} ({bundle.config['backbone']}) cannot be written as a transformers "
            f"ViT: {', '.join(obstacles)}"
        )
    arch = hf_vit.timm_arch(model)
    prep = bundle.preprocessing
    if arch.image_size != int(prep["input_size"]):
        raise ValueError(
            f"model bundle {model_dir}: img_size {arch.image_size} != input_size {prep['input_size']}"
        )
    config = ViTConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.heads,
        intermediate_size=arch.mlp_size,
        hidden_act="gelu",
        layer_norm_eps=float(model.norm.eps),  # timm's, so both compute the same function
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=3,
        qkv_bias=arch.qkv_bias,
        id2label=dict(enumerate(bundle.labels)),
        label2id={name: i for i, name in enumerate(bundle.labels)},
        problem_type="multi_label_classification",
        architectures=["ViTForImageClassification"],
        xraycls={
            "source_bundle": str(Path(model_dir).resolve()),
            "backbone": bundle.config["backbone"],
            "preprocessing": prep,
            "thresholds": (bundle.config.get("extra") or {}).get("thresholds"),
            "metrics": bundle.config.get("metrics") or {},
            "xraycls_version": bundle.config.get("xraycls_version"),
        },
    )
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": arch.image_size, "width": arch.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_per_channel(prep["mean"]),
        image_std=_per_channel(prep["std"]),
    )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf_tensors = hf_vit.timm_to_hf(tensors, arch.depth)
    if out_dir.exists() and any(out_dir.iterdir()) and hf_vit.read_hf_config(out_dir) is None:
        raise ValueError(
            f"export to {out_dir}: it exists and is not a transformers folder; refusing to replace it"
        )
    with atomic_dir(out_dir) as tmp:  # kept only when transformers reproduces the bundle's logits
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        safetensors.torch.save_file(hf_tensors, str(weights), metadata={"format": "pt"})
        os.chmod(weights, stat.S_IMODE(os.stat(tmp / "config.json").st_mode))  # safetensors writes 0600
        _check_logits(bundle, ViTForImageClassification.from_pretrained(tmp).eval(), arch.image_size)
    log.info("transformers ViTForImageClassification written to %s", out_dir)
    return out_dir


def _check_logits(bundle: Any, hf_model: torch.nn.Module, size: int, count: int = 2) -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(count, size, size), dtype=np.uint8))
    prep = bundle.preprocessing
    inputs = DeviceNormalize(prep["mean"], prep["std"])(images)
    with torch.no_grad():
        ours = bundle.model.to("cpu").eval()(inputs)
        theirs = hf_model(pixel_values=inputs).logits
    diff = float((ours - theirs).abs().max())
    if not diff <= HF_EXPORT_ATOL:
        raise RuntimeError(f"transformers' logits differ from the bundle's by {diff:.2e} > {HF_EXPORT_ATOL}")
