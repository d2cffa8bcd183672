"""The backbone: the tiny test ViT, every weight source round-tripped through real files, the offline hub."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from xraycls.model.backbone import (
    DEFAULT_BACKBONE,
    WeightsUnavailableError,
    check_hub_weights,
    create_backbone,
    load_weights_file,
    param_groups,
)


@pytest.fixture(scope="module")
def tiny(tiny_backbone: str, tiny_backbone_kwargs: dict) -> Callable[..., nn.Module]:
    """Builds the tiny model (conf/model/vit_tiny.yaml) with `weights` and keyword overrides, in eval mode."""

    def build(weights: str | Path = "none", **kwargs: object) -> nn.Module:
        return create_backbone(tiny_backbone, weights=weights, **{**tiny_backbone_kwargs, **kwargs}).eval()

    return build


@pytest.fixture(scope="module")
def model(tiny: Callable[..., nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32))


def _same_outputs(a: nn.Module, b: nn.Module, images: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(images), b.eval()(images))


def test_tiny_backbone_is_small_and_fast(model: nn.Module, images: torch.Tensor) -> None:
    assert model.patch_embed.grid_size == (4, 4)  # 64 px in patches of 16: 16 tokens (+ CLS)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    timings = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a thread pool stalls when a busy shared CPU leaves it one core
    try:
        with torch.no_grad():
            for _ in range(10):
                start = time.perf_counter()
                logits = model(images)
                timings.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert logits.shape == (4, 15)
    # ~10 ms on one free core; the best of 10 tolerates the first call's set-up and a busy machine.
    assert min(timings) < 0.25, f"tiny ViT forward took {min(timings):.3f} s at best"


def test_safetensors_round_trip(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, tiny: Callable[..., nn.Module]
) -> None:
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    assert _same_outputs(model, tiny(path), images)


def test_pth_state_dict_round_trip(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, tiny: Callable[..., nn.Module]
) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    assert _same_outputs(model, tiny(path), images)


def test_training_checkpoint_with_backbone_prefix(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, tiny: Callable[..., nn.Module]
) -> None:
    # An xraycls Lightning checkpoint: the module's state_dict under "state_dict", keys "backbone.*".
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": {"lr": 2e-4}}, path)
    assert _same_outputs(model, tiny(path), images)


def test_flat_npz_round_trip(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, tiny: Callable[..., nn.Module]
) -> None:
    path = tmp_path / "tiny.npz"
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})
    assert _same_outputs(model, tiny(path), images)


def _google_layout(model: nn.Module) -> dict[str, np.ndarray]:
    """A timm ViT's weights in the layout of Google's original JAX/Flax ViT .npz checkpoints."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        block, pre = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = f"{block}MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            out[f"{attn}{name}/kernel"] = sd[f"{pre}attn.qkv.weight"][rows].T.reshape(dim, heads, -1)
            out[f"{attn}{name}/bias"] = sd[f"{pre}attn.qkv.bias"][rows].reshape(heads, -1)
        out[f"{attn}out/kernel"] = sd[f"{pre}attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        out[f"{attn}out/bias"] = sd[f"{pre}attn.proj.bias"]
        for norm, torch_name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{block}{norm}/scale"] = sd[f"{pre}{torch_name}.weight"]
            out[f"{block}{norm}/bias"] = sd[f"{pre}{torch_name}.bias"]
        for r in range(2):
            out[f"{block}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{pre}mlp.fc{r + 1}.weight"].T
            out[f"{block}MlpBlock_3/Dense_{r}/bias"] = sd[f"{pre}mlp.fc{r + 1}.bias"]
    return out


def test_google_jax_npz_round_trip(
    images: torch.Tensor, tmp_path: Path, tiny: Callable[..., nn.Module]
) -> None:
    # Google's checkpoints are CLS-token ViTs (a final norm, no fc_norm): the tiny model, CLS-token pooled.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny(global_pool="token")
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **_google_layout(model))
    assert _same_outputs(model, tiny(path, global_pool="token"), images)


def test_other_head_is_replaced_and_position_grid_resampled(
    model: nn.Module, tmp_path: Path, tiny: Callable[..., nn.Module]
) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        imagenet = tiny(num_classes=1000)  # a file with a 1000-way head, like a pretrained checkpoint
    path = tmp_path / "in1k.safetensors"
    safetensors.torch.save_file(imagenet.state_dict(), str(path))

    loaded = tiny(path, img_size=96)
    assert loaded.head.weight.shape == (15, 64)
    assert torch.equal(loaded.blocks[3].mlp.fc1.weight, imagenet.blocks[3].mlp.fc1.weight)
    assert loaded.pos_embed.shape == (1, 1 + 6 * 6, 64)  # 96 / 16 = 6 patches a side, resampled
    assert torch.equal(loaded.pos_embed[:, 0], imagenet.pos_embed[:, 0])  # the CLS position is kept


class _Payload:
    """Unpickling this runs code: it would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_never_run(tmp_path: Path, tiny: Callable[..., nn.Module]) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*will not be unpickled"):
        load_weights_file(path)
    with pytest.raises(ValueError, match="evil.pth"):
        tiny(path)
    assert not marker.exists()


def test_bad_files_are_named(model: nn.Module, tmp_path: Path, tiny: Callable[..., nn.Module]) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tiny(tmp_path / "missing.safetensors")
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"weights\.h5.*unknown format"):
        tiny(odd)
    wider = tmp_path / "wider.safetensors"
    safetensors.torch.save_file(
        create_backbone("vit_tiny_patch16_224", weights="none").state_dict(), str(wider)
    )
    with pytest.raises(ValueError, match=r"wider\.safetensors.*does not fit backbone 'test_vit'"):
        tiny(wider)
    with pytest.raises(ValueError, match="not a timm model"):
        create_backbone("vit_bogus_patch99", weights="none")


# --- hub -------------------------------------------------------------------------------------------------


@pytest.fixture()
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_hub_raises_one_clear_error(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        create_backbone(DEFAULT_BACKBONE, weights="hub")
    message = str(caught.value)
    assert DEFAULT_BACKBONE in message and "HF_HUB_OFFLINE" in message
    assert "model.weights=/path/file.safetensors" in message and "model.weights=none" in message
    assert time.perf_counter() - start < 5  # raised up front, before building ViT-B


def test_unreachable_hub_raises(empty_hub_cache: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(WeightsUnavailableError, match=f"{endpoint}.*did not answer.*model.weights=none"):
        create_backbone(DEFAULT_BACKBONE, weights="hub")


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_silent_hub_times_out(
    empty_hub_cache: Path, online: None, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="Timeout"):
        check_hub_weights(DEFAULT_BACKBONE, timeout_s=0.5)
    assert time.perf_counter() - start < 5


def test_hub_weights_from_the_local_cache_work_offline(
    empty_hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    images: torch.Tensor,
    tiny: Callable[..., nn.Module],
) -> None:
    # Lay out the hub cache as huggingface_hub does for timm/test_vit.r160_in1k (test_vit's default tag).
    with torch.random.fork_rng():
        torch.manual_seed(2)
        pretrained = tiny(num_classes=1000)
    repo = empty_hub_cache / "models--timm--test_vit.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(
        pretrained.state_dict(), str(repo / "snapshots" / commit / "model.safetensors")
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    loaded = tiny("hub")
    assert loaded.head.weight.shape == (15, 64)  # the 1000-way head is replaced
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), pretrained.forward_features(images))


# --- parameter groups ------------------------------------------------------------------------------------


def _lr_and_decay_by_name(model: nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def test_param_groups_skip_weight_decay_on_biases_norms_and_embeddings(model: nn.Module) -> None:
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=None)
    settings = _lr_and_decay_by_name(model, groups)
    assert len(settings) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert settings[name] == (1e-3, 0.0), name
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"):
        assert settings[name] == (1e-3, 0.05), name


def test_layer_decay_gives_early_layers_smaller_lr(tiny: Callable[..., nn.Module]) -> None:
    # ViT-B/16's layout, CLS-token pooled: its final norm sits before the head (average pooling's fc_norm
    # comes after the pooling and goes with the head).
    model = tiny(global_pool="token")
    lr, decay, depth = 1e-3, 0.5, len(model.blocks)  # test_vit: depth 6
    settings = _lr_and_decay_by_name(model, param_groups(model, lr, 0.05, layer_decay=decay))
    assert settings["head.weight"][0] == pytest.approx(lr)
    assert settings["norm.weight"][0] == pytest.approx(lr * decay)  # timm groups it with the last block
    assert settings["patch_embed.proj.weight"][0] == pytest.approx(lr * decay ** (depth + 1))
    assert settings["pos_embed"] == (pytest.approx(lr * decay ** (depth + 1)), 0.0)
    for i in range(depth):  # block i is layer i + 1
        assert settings[f"blocks.{i}.mlp.fc1.weight"][0] == pytest.approx(lr * decay ** (depth - i))


def test_param_groups_reject_bad_settings(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, 1e-3, 0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="lr"):
        param_groups(model, 0.0, 0.05)
