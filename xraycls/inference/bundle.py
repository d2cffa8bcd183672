"""The exported model: a ``model/`` folder that `load_bundle` turns back into a working classifier.

The folder holds exactly two files, neither of which can carry code (both get the umask's permissions):

- ``model.safetensors``: the timm backbone's state dict (float tensors, CPU, contiguous, no shared storage);
- ``config.json``: ``format`` and ``format_version``; ``backbone`` (timm name) and ``backbone_kwargs``
  (``num_classes``, ``img_size``, ``patch_size``, ...: the keywords of `create_backbone` that rebuild the
  architecture); ``labels`` (`xraycls.findings.LABELS`, the order of the 15 outputs); ``preprocessing``
  (``image_size``, ``input_size``, ``mean``, ``std``, ``channels``, ``rule``); ``metrics`` (headline
  results, e.g. {"test": {"split": "official", "auroc_macro14": 0.80}}); ``xraycls_version``; ``extra``
  (anything else the run adds, e.g. decision thresholds).

Loading needs neither Hydra nor the training code: `create_backbone(name, weights="none", **kwargs)` and a
strict `load_state_dict` of the safetensors file. Preprocessing is the training pipeline's own code:
`xraycls.data.images.load_xray(path, image_size)` -> `build_eval_transform(input_size)` ->
`DeviceNormalize(mean, std)`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

import xraycls
from xraycls.data.transforms import DeviceNormalize, build_eval_transform
from xraycls.files import atomic_dir, to_jsonable
from xraycls.findings import LABELS
from xraycls.model.backbone import create_backbone

__all__ = [
    "BUNDLE_WEIGHTS",
    "BUNDLE_CONFIG",
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "PREPROCESSING_RULE",
    "ModelBundle",
    "make_preprocessing",
    "export_bundle",
    "load_bundle",
]

log = logging.getLogger(__name__)

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_CONFIG = "config.json"
BUNDLE_FORMAT = "xraycls-model"
BUNDLE_FORMAT_VERSION = 1  # bump when a reader of the old layout would misread the new one
PREPROCESSING_RULE = (
    "xraycls.data.images.load_xray(path, image_size): decode to 8-bit gray (8-bit as is, colour by BT.601 "
    "luma, 16-bit by the image's own min..max) and resize to image_size x image_size (INTER_AREA when "
    "shrinking); xraycls.data.transforms.build_eval_transform(input_size): resize to input_size x "
    "input_size (INTER_AREA); DeviceNormalize(mean, std): float = (uint8 / 255 - mean) / std, the gray "
    "channel repeated to `channels`"
)
_CONFIG_KEYS = ("format", "format_version", "backbone", "backbone_kwargs", "labels", "preprocessing")
_PREPROCESSING_KEYS = ("image_size", "input_size", "mean", "std")


@dataclass(eq=False)
class ModelBundle:
    """A loaded bundle: the backbone (eval mode), its label order and its training preprocessing."""

    model: nn.Module  # the timm backbone: float [B, 3, input_size, input_size] -> logits [B, len(labels)]
    labels: list[str]  # output order, `xraycls.findings.LABELS`
    preprocessing: dict[str, Any]  # image_size, input_size, mean, std, channels, rule
    config: dict[str, Any]  # the whole config.json
    normalize: DeviceNormalize = field(init=False, repr=False)

    def __post_init__(self) -> None:
        prep = self.preprocessing
        self.normalize = DeviceNormalize(prep["mean"], prep["std"], channels=int(prep.get("channels", 3)))
        self._resize = build_eval_transform(int(prep["input_size"]))

    def to_uint8_batch(self, images_u8: Sequence[np.ndarray], first_index: int = 0) -> Tensor:
        """HxW uint8 images at ``image_size`` (what `load_xray(path, image_size)` gives) -> uint8 [B, in, in].

        The eval transform of training (a resize to ``input_size``), nothing normalised yet. Raises
        ValueError for an image of another dtype, rank or size, naming its index (+ `first_index`).
        """
        size = int(self.preprocessing["image_size"])
        input_size = int(self.preprocessing["input_size"])
        resized = []
        for i, image in enumerate(images_u8):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.shape != (size, size):
                raise ValueError(
                    f"image {first_index + i}: expected uint8 [{size}, {size}] (load_xray(path, {size})), "
                    f"got {image.dtype} {list(image.shape)}"
                )
            resized.append(self._resize(image=image)["image"])
        if not resized:
            return torch.empty((0, input_size, input_size), dtype=torch.uint8)
        return torch.from_numpy(np.stack(resized))

    def preprocess(self, images_u8: Sequence[np.ndarray]) -> Tensor:
        """HxW uint8 images at ``image_size`` -> float32 [B, 3, input_size, input_size], as in training.

        The result is on the normaliser's device: the CPU, or where `predict_proba` last ran.
        """
        return self.normalize(self.to_uint8_batch(images_u8).to(self.normalize.scale.device))

    def predict_proba(
        self, images_u8: Sequence[np.ndarray], device: str = "cpu", batch_size: int = 32
    ) -> np.ndarray:
        """Sigmoid probabilities float32 [B, len(labels)] (label order `labels`) for HxW uint8 images.

        Runs `batch_size` images at a time on `device`; the model and the normaliser stay moved there. uint8
        crosses to the device and is normalised there, as in training.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Moved outside inference mode: parameters made there could never take part in autograd again
        # (heatmap methods need gradients through the same model).
        self.model.to(device).eval()
        self.normalize.to(device)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images_u8), batch_size):
                batch = self.to_uint8_batch(images_u8[start : start + batch_size], start).to(device)
                outputs.append(torch.sigmoid(self.model(self.normalize(batch)).float()).cpu())
        if not outputs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return torch.cat(outputs).numpy()


def make_preprocessing(
    image_size: int, input_size: int, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> dict[str, Any]:
    """The ``preprocessing`` entry of config.json from the DataModule's settings (cache size, model input)."""
    mean_value = float(mean) if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std_value = float(std) if isinstance(std, (int, float)) else [float(s) for s in std]
    return {
        "image_size": int(image_size),
        "input_size": int(input_size),
        "mean": mean_value,
        "std": std_value,
        "channels": 3,
        "rule": PREPROCESSING_RULE,
    }


def _check_preprocessing(preprocessing: Any, where: str) -> dict[str, Any]:
    if not isinstance(preprocessing, dict):
        raise ValueError(f"{where}: preprocessing must be a mapping, got {type(preprocessing).__name__}")
    missing = [key for key in _PREPROCESSING_KEYS if key not in preprocessing]
    if missing:
        raise ValueError(f"{where}: preprocessing lacks {missing} (has {sorted(preprocessing)})")
    prep = {"channels": 3, "rule": PREPROCESSING_RULE, **preprocessing}
    for key in ("image_size", "input_size"):
        value = prep[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: preprocessing.{key} must be a positive int (pixels), got {value!r}")
    if prep["channels"] != 3:
        raise ValueError(
            f"{where}: preprocessing.channels must be 3 (the ViT input), got {prep['channels']!r}"
        )
    try:  # the normaliser checks mean/std (count, std > 0) with its own message
        DeviceNormalize(prep["mean"], prep["std"], channels=3)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: preprocessing mean/std unusable: {err}") from err
    return prep


def _tensors_for_safetensors(backbone: nn.Module) -> dict[str, Tensor]:
    """The state dict as CPU tensors that safetensors accepts: contiguous, each with its own storage.

    Tied parameters (two names, one storage) are written once per name; loading copies the same values
    into both, so the reloaded model computes the same function.
    """
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for name, tensor in backbone.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def _check_architecture(
    tensors: dict[str, Tensor], backbone_name: str, backbone_kwargs: dict[str, Any]
) -> None:
    """Fail at export, not at load, when `backbone_kwargs` do not rebuild the exported architecture."""
    # On the meta device: shapes only, no memory, no random init (about 1 s for ViT-B/16 instead of 4).
    try:
        with torch.device("meta"):
            empty = create_backbone(backbone_name, weights="none", **backbone_kwargs)
    except TypeError as err:  # a keyword the timm model does not take
        raise ValueError(f"backbone_kwargs {backbone_kwargs} do not fit {backbone_name!r}: {err}") from err
    expected = {name: tuple(t.shape) for name, t in empty.state_dict().items()}
    actual = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:5]
        unexpected = sorted(set(actual) - set(expected))[:5]
        shapes = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])[:5]
        differ = [(key, actual[key], expected[key]) for key in shapes]
        raise ValueError(
            f"backbone_kwargs {backbone_kwargs} do not rebuild the exported {backbone_name!r}: "
            f"missing {missing}, unexpected {unexpected}, (name, exported, rebuilt) shapes {differ}"
        )


def export_bundle(
    backbone: nn.Module,
    out_dir: Path,
    *,
    backbone_name: str,
    backbone_kwargs: dict[str, Any],
    preprocessing: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `backbone` as a bundle folder `out_dir` (see the module doc); returns `out_dir`.

    `backbone_kwargs` must rebuild the architecture with `create_backbone(backbone_name, weights="none",
    **backbone_kwargs)` (checked now); `preprocessing` needs image_size, input_size, mean, std (see
    `make_preprocessing`). The folder is written whole under a temporary name and renamed into place; an
    earlier bundle there is replaced, and a folder holding anything else is refused (ValueError). Call it
    on one process (global rank 0) only.
    """
    out_dir = Path(out_dir)
    backbone = getattr(backbone, "_orig_mod", backbone)  # torch.compile's wrapper prefixes every key
    if "weights" in backbone_kwargs:
        raise ValueError(
            f"backbone_kwargs must not hold 'weights' (the bundle holds them): {backbone_kwargs}"
        )
    num_classes = backbone_kwargs.get("num_classes")
    if num_classes != len(LABELS):
        raise ValueError(f"backbone_kwargs.num_classes must be {len(LABELS)} (LABELS), got {num_classes!r}")
    prep = _check_preprocessing(preprocessing, f"export to {out_dir}")
    tensors = _tensors_for_safetensors(backbone)
    _check_architecture(tensors, backbone_name, dict(backbone_kwargs))
    config = to_jsonable(
        {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "backbone": backbone_name,
            "backbone_kwargs": dict(backbone_kwargs),
            "labels": list(LABELS),
            "preprocessing": prep,
            "metrics": metrics or {},
            "xraycls_version": xraycls.__version__,
            "extra": extra or {},
        }
    )
    if out_dir.exists() and not (out_dir.is_dir() and _is_bundle_or_empty(out_dir)):
        raise ValueError(
            f"export to {out_dir}: it exists and is not a model bundle (no {BUNDLE_CONFIG}); "
            f"refusing to replace it"
        )
    with atomic_dir(out_dir) as tmp_dir:  # a previous bundle there is replaced whole, or kept on error
        safetensors.torch.save_file(tensors, str(tmp_dir / BUNDLE_WEIGHTS), metadata={"format": "pt"})
        text = json.dumps(config, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        (tmp_dir / BUNDLE_CONFIG).write_text(text, encoding="utf-8")
        # safetensors creates its file 0600 whatever the umask; the bundle's files share one mode, the
        # umask's (what config.json got), so whoever may read the config may read the weights.
        os.chmod(tmp_dir / BUNDLE_WEIGHTS, stat.S_IMODE(os.stat(tmp_dir / BUNDLE_CONFIG).st_mode))
    log.info("model bundle written to %s (%s, %d tensors)", out_dir, backbone_name, len(tensors))
    return out_dir


def _is_bundle_or_empty(folder: Path) -> bool:
    return (folder / BUNDLE_CONFIG).is_file() or not any(folder.iterdir())


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / BUNDLE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"model bundle {model_dir}: {BUNDLE_CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"model bundle {model_dir}: {BUNDLE_CONFIG} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ValueError(f"model bundle {model_dir}: {BUNDLE_CONFIG} must hold an object, got {kind}")
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"model bundle {model_dir}: {BUNDLE_CONFIG} lacks {missing}")
    if config["format"] != BUNDLE_FORMAT or config["format_version"] != BUNDLE_FORMAT_VERSION:
        raise ValueError(
            f"model bundle {model_dir}: unknown format {config['format']!r} version "
            f"{config['format_version']!r} (xraycls {xraycls.__version__} reads {BUNDLE_FORMAT!r} "
            f"version {BUNDLE_FORMAT_VERSION})"
        )
    if config["labels"] != list(LABELS):
        raise ValueError(
            f"model bundle {model_dir}: labels {config['labels']} do not match xraycls LABELS {list(LABELS)}"
        )
    kwargs = config["backbone_kwargs"]
    if not isinstance(kwargs, dict) or kwargs.get("num_classes") != len(LABELS) or "weights" in kwargs:
        raise ValueError(
            f"model bundle {model_dir}: backbone_kwargs must be a mapping with num_classes={len(LABELS)} "
            f"and no 'weights', got {kwargs!r}"
        )
    config["preprocessing"] = _check_preprocessing(config["preprocessing"], f"model bundle {model_dir}")
    return config


def load_bundle(model_dir: Path, device: str = "cpu") -> ModelBundle:
    """Rebuild the exported model from `model_dir`, on `device`, in eval mode; no pickle is read.

    Raises FileNotFoundError for a missing folder or file and ValueError for a config or weights file that
    is unreadable, of another format version, with another label list, or that does not fit the backbone.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model bundle {model_dir}: no such folder")
    config = _read_config(model_dir)
    weights_path = model_dir / BUNDLE_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"model bundle {model_dir}: {BUNDLE_WEIGHTS} is missing")
    try:
        state_dict = safetensors.torch.load_file(str(weights_path), device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(
            f"model bundle {model_dir}: {BUNDLE_WEIGHTS} is not a readable safetensors file ({err})"
        ) from err
    try:
        model = create_backbone(config["backbone"], weights="none", **config["backbone_kwargs"])
    except TypeError as err:  # a keyword timm's model does not take
        kwargs = config["backbone_kwargs"]
        raise ValueError(f"model bundle {model_dir}: backbone_kwargs {kwargs}: {err}") from err
    except ValueError as err:
        raise ValueError(f"model bundle {model_dir}: {err}") from err
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"model bundle {model_dir}: {BUNDLE_WEIGHTS} does not fit backbone {config['backbone']!r} "
            f"with {config['backbone_kwargs']}: {err}"
        ) from err
    model.to(device).eval()
    bundle = ModelBundle(
        model=model, labels=list(config["labels"]), preprocessing=config["preprocessing"], config=config
    )
    bundle.normalize.to(device)
    return bundle
