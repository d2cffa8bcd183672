"""Hugging Face transformers ViT <-> timm `VisionTransformer`: parameter names and architecture checks.

Works on transformers' files (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) with json,
safetensors and ``torch.load(weights_only=True)`` only, so converting needs no transformers install.
Names (transformers 4.x on-disk names; 5.x's in-memory names are read too), a ``vit.`` prefix stripped:

    embeddings.cls_token / position_embeddings (with the CLS row)  -> cls_token / pos_embed
    embeddings.patch_embeddings.projection                          -> patch_embed.proj
    encoder.layer.i.layernorm_before / layernorm_after              -> blocks.i.norm1 / norm2
    encoder.layer.i.attention.attention.query, key, value           -> blocks.i.attn.qkv (fused, q k v)
    encoder.layer.i.attention.output.dense                          -> blocks.i.attn.proj
    encoder.layer.i.intermediate.dense / output.dense               -> blocks.i.mlp.fc1 / fc2
    layernorm (final)                                               -> norm
    pooler.*, embeddings.mask_token: dropped; classifier: the caller's (see `split_classifier`)

Both compute the same function except for the layer norms' eps: transformers' ViT uses 1e-12, timm 1e-6.
A LayerNorm output then differs by a relative ~(1e-6 - 1e-12) / (2 var) for features of variance `var`:
~5e-7 for a trained ViT's hidden states (var >= 1), up to ~1e-3 on the near-zero CLS token of a freshly
initialised one (var ~ 1e-3). tests/test_hf_vit.py measures both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

__all__ = [
    "HF_CONFIG",
    "HF_WEIGHT_FILES",
    "VitArch",
    "hf_weights_file",
    "read_hf_config",
    "is_hf_vit",
    "split_classifier",
    "hf_arch",
    "timm_arch",
    "timm_vit_obstacles",
    "check_same_arch",
    "hf_to_timm",
    "timm_to_hf",
    "hf_weights_for_backbone",
]

HF_CONFIG = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' order of preference
_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# transformers module -> timm module within block i; None: the three parts of timm's fused qkv.
_BLOCK_NAMES: dict[str, str | None] = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": None,
    "attention.attention.key": None,
    "attention.attention.value": None,
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    # transformers 5.x in-memory names (its save_pretrained writes the 4.x names above)
    "attention.q_proj": None,
    "attention.k_proj": None,
    "attention.v_proj": None,
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_QKV = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}
_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DROPPED = ("pooler.", "embeddings.mask_token")


@dataclasses.dataclass(frozen=True)
class VitArch:
    """The shape of a plain ViT, as both libraries can state it."""

    patch_size: int
    hidden_size: int  # timm: embed_dim
    depth: int  # transformers: num_hidden_layers
    heads: int | None  # None: not known (a weights file without its config.json)
    mlp_size: int  # transformers: intermediate_size
    image_size: int
    qkv_bias: bool

    def differences(self, other: VitArch) -> list[str]:
        """'field self vs other' for each field that differs (an unknown head count matches any)."""
        out = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs and mine is not None and theirs is not None:
                out.append(f"{field.name} {mine} vs {theirs}")
        return out


def hf_weights_file(folder: Path) -> Path:
    """The weights file of a transformers model folder (safetensors preferred)."""
    folder = Path(folder)
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ValueError(f"transformers folder {folder}: sharded weights are not supported; save unsharded")
    raise FileNotFoundError(f"transformers folder {folder}: neither of {list(HF_WEIGHT_FILES)} is there")


def read_hf_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json, None if absent; ValueError unless it is a ViT's (``model_type: vit``)."""
    path = Path(folder) / HF_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("model_type") != "vit":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: model_type {kind!r} is not a transformers ViT ('vit')")
    return config


def is_hf_vit(state_dict: dict[str, Tensor]) -> bool:
    """Whether the keys are transformers ViT names (``[vit.]embeddings.patch_embeddings...``)."""
    return any(key.endswith(_ANCHOR) for key in state_dict)


def split_classifier(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the encoder's tensors without the ``vit.`` prefix, the ``classifier.*`` tensors without theirs)."""
    encoder, classifier = {}, {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            classifier[key.removeprefix("classifier.")] = value
        else:
            encoder[key.removeprefix("vit.")] = value
    return encoder, classifier


def _as_square(value: Any, what: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{where}: {what} {list(value)} is not square; only square ViTs convert")
        value = value[0]
    return int(value)


def hf_arch(encoder: dict[str, Tensor], config: dict[str, Any] | None, where: str) -> VitArch:
    """The architecture the tensors hold, cross-checked with config.json when there is one."""
    fc1_names = ("intermediate.dense.weight", "mlp.fc1.weight")
    needed = {_ANCHOR, "embeddings.position_embeddings", "embeddings.cls_token"} - set(encoder)
    if needed or not any(key.endswith(fc1_names) for key in encoder):
        raise ValueError(f"{where}: not a whole transformers ViT: no {sorted(needed) or 'MLP layers'}")
    proj = encoder[_ANCHOR]
    if proj.shape[2] != proj.shape[3]:
        raise ValueError(f"{where}: patch {list(proj.shape[2:])} is not square; only square ViTs convert")
    layers = {int(m.group(1)) for m in map(_LAYER.match, encoder) if m}
    tokens = encoder["embeddings.position_embeddings"].shape[1] - 1  # less the CLS row
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{where}: {tokens} position embeddings (+ CLS) are not a square grid of patches")
    fc1 = next(value for key, value in encoder.items() if key.endswith(fc1_names))
    bias = any(k.endswith(("attention.query.bias", "q_proj.bias")) for k in encoder)
    arch = VitArch(
        int(proj.shape[2]), int(proj.shape[0]), len(layers), None, fc1.shape[0], grid * proj.shape[2], bias
    )
    if config is None:
        return arch
    act = config.get("hidden_act", "gelu")
    if act != "gelu" or config.get("num_channels", 3) != 3:
        raise ValueError(
            f"{where}: hidden_act {act!r}, num_channels {config.get('num_channels', 3)}: timm's ViT has "
            f"exact GELU and 3 input channels"
        )
    stated = VitArch(
        patch_size=_as_square(config.get("patch_size", 16), "patch_size", where),
        hidden_size=int(config.get("hidden_size", 768)),
        depth=int(config.get("num_hidden_layers", 12)),
        heads=int(config.get("num_attention_heads", 12)),
        mlp_size=int(config.get("intermediate_size", 3072)),
        image_size=_as_square(config.get("image_size", 224), "image_size", where),
        qkv_bias=bool(config.get("qkv_bias", True)),
    )
    if arch.differences(stated):
        raise ValueError(f"{where}: weights vs config.json disagree: {', '.join(arch.differences(stated))}")
    return stated


def timm_arch(model: nn.Module) -> VitArch:
    """The architecture of a timm `VisionTransformer` (ValueError for any other model)."""
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ValueError(f"{type(model).__name__} is not a timm VisionTransformer")
    block = model.blocks[0]
    patch, image = tuple(model.patch_embed.patch_size), tuple(model.patch_embed.img_size)
    return VitArch(
        patch_size=patch[0] if len(set(patch)) == 1 else -1,
        hidden_size=int(model.embed_dim),
        depth=len(model.blocks),
        heads=int(block.attn.num_heads),
        mlp_size=int(block.mlp.fc1.out_features),
        image_size=image[0] if len(set(image)) == 1 else -1,
        qkv_bias=block.attn.qkv.bias is not None,
    )


def timm_vit_obstacles(model: nn.Module) -> list[str]:
    """What transformers' ViT (CLS token, pre-norm blocks, final LayerNorm, linear head) cannot express."""
    block, arch = model.blocks[0], timm_arch(model)
    checks = {
        f"global_pool {model.global_pool!r} (transformers' ViT classifies from the CLS token: 'token')": (
            model.global_pool == "token"
        ),
        "no class token": getattr(model, "cls_token", None) is not None,
        f"{getattr(model, 'num_reg_tokens', 0)} register tokens": getattr(model, "num_reg_tokens", 0) == 0,
        "position embeddings without the class token (no_embed_class)": not model.no_embed_class,
        "fc_norm after pooling": isinstance(model.fc_norm, nn.Identity),
        "no final norm": isinstance(model.norm, nn.LayerNorm),
        "pre-norm / patch norm": isinstance(model.norm_pre, nn.Identity)
        and isinstance(model.patch_embed.norm, nn.Identity),
        "layer scale": isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity),
        "qk norm / attention norm": all(
            isinstance(getattr(block.attn, name, nn.Identity()), nn.Identity) for name in ("q_norm", "norm")
        ),
        f"activation {type(block.mlp.act).__name__}": type(block.mlp.act) is nn.GELU
        and block.mlp.act.approximate == "none",
        "pre-logits layer": isinstance(getattr(model, "pre_logits", nn.Identity()), nn.Identity),
        "non-square patches or image": arch.patch_size > 0 and arch.image_size > 0,
        "head is not one Linear layer": isinstance(model.head, nn.Linear),
    }
    return [name for name, ok in checks.items() if not ok]


def check_same_arch(hf: VitArch, timm_side: VitArch, where: str, backbone: str) -> None:
    """One ValueError naming every field where the transformers ViT and the timm model differ."""
    diffs = hf.differences(timm_side)
    if diffs:
        raise ValueError(
            f"{where}: this transformers ViT does not match backbone {backbone!r} (transformers vs timm): "
            f"{', '.join(diffs)}; choose a backbone / img_size / patch_size of the same shape"
        )


def hf_to_timm(encoder: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """transformers ViT encoder tensors (no ``vit.`` prefix, no classifier) -> timm names; no head."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], list[Tensor | None]] = {}
    unknown = []
    for key, value in encoder.items():
        if key.startswith(_DROPPED):
            continue
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
            continue
        match = _LAYER.match(key)
        if match is None or match.group(2) not in _BLOCK_NAMES:
            unknown.append(key)
            continue
        index, module, kind = int(match.group(1)), match.group(2), match.group(3)
        target = _BLOCK_NAMES[module]
        if target is None:
            qkv.setdefault((index, kind), [None, None, None])[_QKV[module.rsplit(".", 1)[-1]]] = value
        else:
            out[f"blocks.{index}.{target}.{kind}"] = value
    if unknown:
        raise ValueError(f"{where}: tensors a plain transformers ViT does not have: {sorted(unknown)[:8]}")
    for (index, kind), parts in qkv.items():
        if any(part is None for part in parts):
            raise ValueError(f"{where}: layer {index} lacks one of query/key/value {kind}")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def timm_to_hf(state_dict: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A plain timm ViT's tensors -> a ``ViTForImageClassification`` file's (4.x names, ``vit.`` prefix)."""
    reverse = {timm_name: hf_name for hf_name, timm_name in _TOP_NAMES.items()}
    block_names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
    }
    block_names |= {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in reverse:
            out[f"vit.{reverse[key]}"] = value
        elif key.startswith("head."):
            out[f"classifier.{key.removeprefix('head.')}"] = value
    for i in range(depth):
        for kind in ("weight", "bias"):
            prefix = f"vit.encoder.layer.{i}."
            for timm_name, hf_name in block_names.items():
                out[f"{prefix}{hf_name}.{kind}"] = state_dict[f"blocks.{i}.{timm_name}.{kind}"]
            fused = state_dict.get(f"blocks.{i}.attn.qkv.{kind}")
            if fused is not None:
                for part, name in zip(fused.chunk(3, dim=0), ("query", "key", "value"), strict=True):
                    out[f"{prefix}attention.attention.{name}.{kind}"] = part.contiguous()
    return out


def hf_weights_for_backbone(
    state_dict: dict[str, Tensor], path: Path, name: str, kwargs: dict[str, Any]
) -> dict[str, Tensor]:
    """`create_backbone`'s hook: a transformers ViT's tensors, checked against timm's `name` (built with
    `kwargs` on the meta device) and renamed to timm's; the classifier is dropped (the head is new)."""
    where = f"model.weights={str(path)!r}"
    encoder, _ = split_classifier(state_dict)
    hf = hf_arch(encoder, read_hf_config(path.parent), where)
    with torch.device("meta"):
        target = timm.create_model(name, pretrained=False, **kwargs)
    check_same_arch(hf, timm_arch(target), where, name)
    if not isinstance(target.norm, nn.LayerNorm) or getattr(target, "cls_token", None) is None:
        raise ValueError(
            f"{where}: backbone {name!r} lacks the class token or final norm transformers' ViT has"
        )
    return hf_to_timm(encoder, where)
