"""The timm ViT backbone, built by name, with its weights from the hub, a local file or nowhere.

Weight sources (`weights=`):

- ``"hub"``: timm's pretrained download (Hugging Face hub, cached under ``HF_HOME``). A machine without the
  hub (no network, ``HF_HUB_OFFLINE=1``, endpoint unreachable) gets one `WeightsUnavailableError` before any
  work, naming both ways out: a local file or ``none``.
- a path: ``.safetensors``; ``.bin``/``.pth``/``.pt``/``.ckpt`` read with ``torch.load(weights_only=True)``
  (no pickled code runs); ``.npz`` read with ``allow_pickle=False``, either a flat state dict or Google's
  original JAX/Flax ViT checkpoint (e.g. ``ViT-B_16.npz`` of google-research/vision_transformer), which
  timm's own loader converts; or a transformers ViT folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) or one of its weight files, renamed to timm's by `xraycls.model.hf_vit` once its
  shape is checked against the backbone's. timm adapts the file to the model: positional embeddings are
  resampled to `img_size`, and a classifier of another size (the 21k-class head) is dropped for a new
  random one.
- ``"none"``: random initialisation.

The model for tests and the demo is a config, ``conf/model/vit_tiny.yaml``: timm's registered ``test_vit``
(6 blocks, 64 wide, ~0.3 M parameters) with 16 px patches and average pooling, at the demo's 64 px input.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from xraycls.model import hf_vit

__all__ = [
    "check_backbone_source",
    "DEFAULT_BACKBONE",
    "HUB_TIMEOUT_S",
    "WeightsUnavailableError",
    "create_backbone",
    "load_weights_file",
    "check_hub_weights",
    "param_groups",
    "backbone_depth",
]

log = logging.getLogger(__name__)

# The guide's google/vit-base-patch16-224-in21k (the original 2020 JAX weights), not `.augreg_in21k`.
DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"
HUB_TIMEOUT_S = 10.0  # seconds to wait for the hub to answer before declaring the weights unavailable

_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_WEIGHT_SUFFIXES = (".safetensors", ".npz", *_TORCH_SUFFIXES)
# Files timm's `load_state_dict_from_hf` looks for in a hub repo, in its order.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# A key of Google's JAX/Flax ViT layout; timm's `VisionTransformer.load_pretrained` converts those files.
_JAX_ANCHOR = "embedding/kernel"


class WeightsUnavailableError(RuntimeError):
    """The requested pretrained weights cannot be fetched here (offline, hub unreachable)."""


def _unavailable(name: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for backbone {name!r} are not available from the hub: {reason}. "
        f"Either give a local weights file (model.weights=/path/file.safetensors; .npz, .bin and .pth work "
        f"too) or train from random initialisation (model.weights=none)."
    )


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; also honour a value set after that.
    import huggingface_hub.constants as hub_constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(hub_constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def check_hub_weights(name: str, timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Raise `WeightsUnavailableError` unless timm can get `name`'s pretrained weights.

    Passes when a weight file of the model's hub repo is in the local cache (this works offline), or
    when the hub (``HF_ENDPOINT``, read now) answers a metadata request within `timeout_s` seconds.
    Raises ValueError for a name with no pretrained weights at all.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    cfg = _pretrained_cfg(name)
    if not cfg.hf_hub_id:
        if cfg.url:
            return  # a plain URL (torch.hub download): its failures surface from create_backbone
        raise ValueError(f"backbone {name!r} has no pretrained weights in timm; use model.weights=none")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
    if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in files):
        return
    if _hub_offline():
        raise _unavailable(name, f"HF_HUB_OFFLINE is set and {repo_id} is not in the local cache")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(repo_id, files[0], revision=revision or None, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, timeout=timeout_s)
    except Exception as err:  # any failure to reach the hub means the same thing to the user
        raise _unavailable(name, f"{url} did not answer ({type(err).__name__}: {err})") from err


def _pretrained_cfg(name: str) -> Any:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # e.g. a tag timm does not know
        raise ValueError(f"backbone {name!r}: {err}") from err
    if cfg is None:
        raise ValueError(f"backbone {name!r} has no pretrained weights in timm; use model.weights=none")
    return cfg


def load_weights_file(path: Path) -> dict[str, Tensor]:
    """Read a weights file into a flat {name: tensor} dict on the CPU, never unpickling code.

    Torch files may wrap the tensors in ``state_dict`` or ``model`` (training checkpoints); an xraycls
    checkpoint's ``backbone.`` prefix is stripped. Google JAX ``.npz`` files keep their own keys
    (``Transformer/encoderblock_0/...``); `create_backbone` hands those to timm's converter.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(f"weights file {path}: unknown format {suffix!r}, expected {_WEIGHT_SUFFIXES}")
    try:
        if suffix == ".safetensors":
            raw: Any = safetensors.torch.load_file(str(path), device="cpu")
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                raw = {key: torch.from_numpy(np.array(archive[key])) for key in archive.files}
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"weights file {path} holds pickled objects other than tensors and will not be unpickled "
            f"(weights_only=True); save a plain state_dict or a .safetensors file instead"
        ) from err
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"weights file {path} could not be read as {suffix}: {err}") from err
    return _flat_state_dict(raw, path)


def _flat_state_dict(raw: Any, path: Path) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"weights file {path} holds no {{name: tensor}} mapping (got {type(raw).__name__})")
    prefix = "backbone."
    if any(key.startswith(prefix) for key in raw):
        raw = {key.removeprefix(prefix): value for key, value in raw.items() if key.startswith(prefix)}
    not_tensors = sorted(key for key, value in raw.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise ValueError(f"weights file {path}: entries that are not tensors: {not_tensors[:5]}")
    return raw


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | os.PathLike[str] = "hub",
    num_classes: int = 15,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model `name` with a new `num_classes`-way head, logits out: [B, 3, H, W] -> [B, num_classes].

    `img_size`/`patch_size` override the architecture's (pretrained positional and patch embeddings are
    resampled by timm). Raises ValueError for an unknown name or unusable file, FileNotFoundError for a
    missing file, `WeightsUnavailableError` for hub weights this machine cannot fetch.
    """
    if not timm.is_model(name):
        check_backbone_source(name, "none")  # raises, naming similar models
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path_rate, **timm_kwargs}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    source = str(weights)
    if source.lower() == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if source.lower() == "hub":
        check_hub_weights(name)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as err:  # huggingface_hub and urllib errors are all OSErrors
            raise _unavailable(name, f"the download failed ({type(err).__name__}: {err})") from err
    return _create_from_file(name, Path(source), kwargs)


def check_backbone_source(name: str, weights: str | os.PathLike[str] = "hub") -> None:
    """What `create_backbone(name, weights=...)` would refuse, checked without building the model: an unknown
    timm name (ValueError), a weights path that does not exist (FileNotFoundError), hub weights this machine
    cannot get (`WeightsUnavailableError`)."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ValueError(f"model.backbone={name!r} is not a timm model (similar: {close})")
    source = str(weights)
    if source.lower() == "hub":
        check_hub_weights(name)
    elif source.lower() != "none" and not Path(source).exists():
        raise FileNotFoundError(f"model.weights={source!r}: no such file or folder (or use 'hub' or 'none')")


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    if path.is_dir():  # a transformers ViT folder: config.json + model.safetensors | pytorch_model.bin
        path = hf_vit.hf_weights_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights={str(path)!r}: no such file (or use 'hub' or 'none')")
    state_dict = load_weights_file(path)
    if hf_vit.is_hf_vit(state_dict):
        state_dict = hf_vit.hf_weights_for_backbone(state_dict, path, name, kwargs)
    if any(key.endswith(_JAX_ANCHOR) for key in state_dict):
        # Google's layout: timm's VisionTransformer.load_pretrained converts it (np.load, allow_pickle=False).
        overlay: dict[str, Any] = {"file": str(path), "custom_load": True}
    else:
        head = state_dict.get("head.weight")
        # The file's head size tells timm whether to keep the head (same size) or drop it.
        overlay = {"state_dict": state_dict, "num_classes": 0 if head is None else head.shape[0]}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"model.weights={str(path)!r} does not fit backbone {name!r}: {err}") from err
    log.info("backbone %s: weights from %s", name, path)
    return model


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, each with its own ``lr`` and ``weight_decay``.

    No weight decay on biases, norms and the model's `no_weight_decay()` names (pos_embed, cls_token).
    With `layer_decay`, a ViT of depth D gets lr * layer_decay ** (D + 1 - layer_id), by timm's grouping:
    layer 0 is the patch/position embedding and CLS token, block i is layer i + 1 (the final norm goes
    with the last block), the head is layer D + 1 (full lr; with average pooling, so is ``fc_norm``). Each
    group also keeps ``lr_scale`` (its fraction of `lr`).
    """
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"optim.lr must be a positive number, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay!r}")
    skip: Iterable[str] = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=tuple(skip))
        for group in groups:
            group["lr_scale"] = 1.0
    else:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {layer_decay!r}")
        groups = param_groups_layer_decay(
            model, weight_decay, no_weight_decay_list=tuple(skip), layer_decay=layer_decay
        )
    for group in groups:
        # timm's own schedulers read lr_scale; torch's LambdaLR scales each group's initial lr instead.
        group["lr"] = lr * group["lr_scale"]
    return groups


def backbone_depth(backbone: str, **kwargs: Any) -> int:
    """Number of transformer blocks of a timm model, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, **kwargs)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model {backbone!r} has no `blocks`: the IPU pipeline needs a ViT")
    return len(blocks)
