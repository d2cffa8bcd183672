"""XrayClassifier under a real Lightning Trainer on the CPU, with the tiny ViT and a separable toy problem."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from xraycls.findings import LABELS, NUM_LABELS
from xraycls.model.backbone import create_backbone
from xraycls.model.metrics import XrayMetrics
from xraycls.model.module import XrayClassifier, pos_weight_from_prevalence
from xraycls.model.schedule import warmup_cosine_factor

BATCH = 16


def _toy(n: int, seed: int) -> TensorDataset:
    """64x64 'normalised' images: each present label adds its own 8x8 texture, tiled over the image.

    The textures are fixed (one generator for all sets); the noise and labels come from `seed`.
    """
    textures = np.random.default_rng(1234).normal(0.0, 1.0, (NUM_LABELS, 3, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, NUM_LABELS)) < 0.3).astype(np.float32)
    signal = np.einsum("nl,lchw->nchw", labels, textures)
    images = rng.normal(0.0, 0.5, (n, 3, 64, 64)).astype(np.float32) + np.tile(signal, (1, 1, 8, 8))
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def _loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(_toy(n, seed), batch_size=BATCH, shuffle=shuffle, generator=generator)


@pytest.fixture(scope="module")
def make_module(tiny_backbone: str, tiny_backbone_kwargs: dict) -> Callable[..., XrayClassifier]:
    """Builds the module around the tiny model (conf/model/vit_tiny.yaml), seed 0, with keyword overrides."""

    def build(**kwargs: Any) -> XrayClassifier:
        settings = {"backbone": tiny_backbone, "weights": "none", **tiny_backbone_kwargs, **kwargs}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return XrayClassifier(**settings)

    return build


@pytest.fixture(scope="module")
def fitted(
    tmp_path_factory: pytest.TempPathFactory,
    cpu_trainer: Callable[..., L.Trainer],
    make_module: Callable[..., XrayClassifier],
) -> tuple[L.Trainer, XrayClassifier, Path]:
    """Four epochs on 128 toy images, validated on 64 others, then tested; metrics.csv from CSVLogger."""
    root = tmp_path_factory.mktemp("fit")
    module = make_module(lr=2e-3, warmup_ratio=0.1, weight_decay=0.01)
    logger = CSVLogger(root, name="run", version=0)
    trainer = cpu_trainer(default_root_dir=root, max_epochs=4, logger=logger, log_every_n_steps=1)
    trainer.fit(module, _loader(128, seed=1, shuffle=True), _loader(64, seed=2))
    trainer.test(module, _loader(64, seed=3), verbose=False)
    return trainer, module, Path(logger.log_dir) / "metrics.csv"


@pytest.mark.slow
def test_learns_a_separable_toy_problem(fitted: tuple[L.Trainer, XrayClassifier, Path]) -> None:
    _, module, csv = fitted
    assert module.last_metrics["val"]["auroc_macro14"] > 0.9
    assert module.last_metrics["test"]["auroc_macro14"] > 0.9
    val = pd.read_csv(csv).dropna(subset=["val/loss"])
    assert len(val) == 4  # one row per epoch
    # Predicting the 30% prevalence for every label would score a BCE of 0.61.
    assert val["val/loss"].iloc[-1] < min(0.55, 0.9 * val["val/loss"].iloc[0])
    assert val["val/auroc_macro14"].iloc[-1] > val["val/auroc_macro14"].iloc[0]
    train_loss = pd.read_csv(csv)["train/loss"].dropna()
    assert train_loss.tail(4).mean() < 0.8 * train_loss.head(4).mean()


@pytest.mark.slow
def test_logged_keys(fitted: tuple[L.Trainer, XrayClassifier, Path]) -> None:
    trainer, module, csv = fitted
    columns = set(pd.read_csv(csv).columns)
    expected = {"train/loss", "lr", "train/loss_epoch", "train/auroc_macro14"}
    for stage in ("val", "test"):
        expected |= {f"{stage}/{k}" for k in ("loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat")}
        expected |= {f"{stage}/auroc/{label}" for label in LABELS}
    assert expected <= columns, sorted(expected - columns)
    lr = pd.read_csv(csv)["lr"].dropna()
    assert len(lr) == 4 * 128 // BATCH  # one per optimizer step
    # The summary the run writes: the same numbers as were logged.
    test = module.last_metrics["test"]
    assert set(test) == {"loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat", "auroc_per_finding"}
    assert list(test["auroc_per_finding"]) == list(LABELS)
    assert trainer.callback_metrics["test/auroc_macro14"].item() == pytest.approx(test["auroc_macro14"])
    assert trainer.callback_metrics["test/loss"].item() == pytest.approx(test["loss"])


@pytest.mark.slow
def test_predict_returns_probabilities(fitted: tuple[L.Trainer, XrayClassifier, Path]) -> None:
    trainer, module, _ = fitted
    batches = trainer.predict(module, _loader(32, seed=3))
    probabilities = torch.cat(batches)
    assert probabilities.shape == (32, NUM_LABELS)
    assert torch.all((probabilities >= 0) & (probabilities <= 1))
    images = _toy(32, seed=3).tensors[0]
    module.eval()
    with torch.no_grad():
        assert torch.allclose(probabilities, torch.sigmoid(module(images)), atol=1e-6)


@pytest.mark.slow
def test_checkpoint_reloads_as_module_and_as_backbone_weights(
    fitted: tuple[L.Trainer, XrayClassifier, Path],
    tmp_path: Path,
    tiny_backbone_kwargs: dict,
    tiny_backbone: str,
) -> None:
    trainer, module, _ = fitted
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    images = _toy(8, seed=4).tensors[0]
    reloaded = XrayClassifier.load_from_checkpoint(path, weights="none").eval()
    assert reloaded.hparams.backbone == tiny_backbone and reloaded.hparams.lr == 2e-3
    backbone = create_backbone(tiny_backbone, weights=path, **tiny_backbone_kwargs).eval()
    module.eval()
    with torch.no_grad():
        expected = module(images)
        assert torch.equal(reloaded(images), expected)
        assert torch.equal(backbone(images), expected)


def test_steps_run_without_a_trainer_and_never_log(
    monkeypatch: pytest.MonkeyPatch, make_module: Callable[..., XrayClassifier]
) -> None:
    module = make_module()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a step called self.log")

    monkeypatch.setattr(module, "log", refuse)
    monkeypatch.setattr(module, "log_dict", refuse)
    images, labels = _toy(BATCH, seed=5).tensors
    out = module.training_step((images, labels), 0)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert not out["logits"].requires_grad and out["logits"].shape == (BATCH, NUM_LABELS)
    assert torch.equal(out["labels"], labels)
    module.eval()
    with torch.no_grad():
        for step in (module.validation_step, module.test_step):
            out = step((images, labels), 0)
            assert set(out) == {"loss", "logits", "labels"}
            assert out["loss"].item() == pytest.approx(module.loss(out["logits"], labels).item())
    metrics = (module.train_metrics, module.val_metrics, module.test_metrics)
    assert all(metric.counts.update_count == 0 for metric in metrics)


class _ScheduleProbe(L.Callback):
    """Records, per batch, the scheduler steps taken before it, its lr, and the lr the module logged."""

    def __init__(self) -> None:
        self.steps_before: list[int] = []
        self.lrs: list[float] = []
        self.logged_lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._read_logged_lr(trainer)
        self.steps_before.append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer: L.Trainer, *args: object) -> None:
        self._read_logged_lr(trainer)

    def _read_logged_lr(self, trainer: L.Trainer) -> None:
        # Callbacks' on_train_batch_end runs before the module's, so read what the last batch logged here.
        if "lr" in trainer.callback_metrics:
            self.logged_lrs.append(trainer.callback_metrics["lr"].item())


@pytest.mark.slow
def test_lr_schedule_steps_once_per_optimizer_step(
    tmp_path: Path, cpu_trainer: Callable[..., L.Trainer], make_module: Callable[..., XrayClassifier]
) -> None:
    module = make_module(lr=1e-3, warmup_ratio=0.5)
    probe = _ScheduleProbe()
    trainer = cpu_trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        callbacks=[probe],
        log_every_n_steps=1,
    )
    trainer.fit(module, _loader(8 * BATCH, seed=6))

    assert trainer.estimated_stepping_batches == 4
    assert probe.steps_before == [0, 0, 1, 1, 2, 2, 3, 3]  # one scheduler step per two batches
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    factor = warmup_cosine_factor(4, warmup_ratio=0.5)
    assert probe.lrs == pytest.approx([1e-3 * factor(step) for step in probe.steps_before])
    assert probe.logged_lrs == pytest.approx(probe.lrs, abs=1e-9)


class _HostReads(TorchDispatchMode):
    """Counts tensor -> Python value reads: on a GPU each one waits for every queued kernel."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
        torch.ops.aten.equal.default,
    )

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
def test_batch_hooks_only_keep_outputs_and_log_on_the_loggers_steps(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cpu_trainer: Callable[..., L.Trainer],
    make_module: Callable[..., XrayClassifier],
) -> None:
    """Per batch the module keeps the detached logits and labels and reads nothing back to the host; it
    logs `train/loss` and `lr` only on the steps the logger writes; the metrics update once per stage and
    epoch, with every batch of it (the AUROC over all images, as a per-batch update would give)."""
    updates: list[tuple[str, int]] = []
    update = XrayMetrics.update

    def record_update(self: XrayMetrics, logits: torch.Tensor, *args: Any) -> None:
        updates.append((self.stage, len(logits)))
        update(self, logits, *args)

    monkeypatch.setattr(XrayMetrics, "update", record_update)
    module = make_module()
    reads = _HostReads()
    for hook in ("on_train_batch_end", "on_validation_batch_end"):
        original = getattr(module, hook)

        def counted(*args: Any, _original: Any = original) -> None:
            with reads:
                _original(*args)

        monkeypatch.setattr(module, hook, counted)
    logged: list[str] = []
    log = module.log
    monkeypatch.setattr(module, "log", lambda name, *a, **k: (logged.append(name), log(name, *a, **k))[1])

    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = cpu_trainer(default_root_dir=tmp_path, max_epochs=2, logger=logger, log_every_n_steps=3)
    trainer.fit(module, _loader(8 * BATCH, seed=1, shuffle=True), _loader(3 * BATCH, seed=2))

    assert reads.count == 0
    assert updates == [("val", 3 * BATCH), ("train", 8 * BATCH)] * 2  # validation ends before its epoch
    table = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    for key in ("train/loss", "lr"):
        # 16 optimizer steps; Lightning writes after steps 3, 6, ..., 15 (its step column counts from 0).
        assert table.dropna(subset=[key])["step"].tolist() == [2, 5, 8, 11, 14], key
        assert logged.count(key) == 5, key  # nothing logged that the logger would not write
    assert module.last_metrics["train"]["auroc_macro14"] > 0.5
    assert trainer.progress_bar_metrics.keys() == {"val/loss", "val/auroc_macro14"}


def test_pos_weight_changes_the_loss_as_computed_by_hand(make_module: Callable[..., XrayClassifier]) -> None:
    weights = [float(w) for w in np.linspace(0.5, 8.0, NUM_LABELS)]
    weighted, plain = make_module(pos_weight=weights), make_module()
    rng = np.random.default_rng(8)
    logits = torch.from_numpy(rng.normal(size=(6, NUM_LABELS)).astype(np.float32))
    labels = torch.from_numpy((rng.random((6, NUM_LABELS)) < 0.4).astype(np.float32))

    p = torch.sigmoid(logits.double())
    y, w = labels.double(), torch.tensor(weights, dtype=torch.float64)
    by_hand = -(w * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert weighted.loss(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-5)
    unweighted = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert plain.loss(logits, labels).item() == pytest.approx(unweighted.item(), rel=1e-5)
    assert "pos_weight" not in weighted.state_dict()  # a hyperparameter, rebuilt from hparams


def test_pos_weight_from_prevalence() -> None:
    assert pos_weight_from_prevalence(torch.tensor([0.5, 0.1, 0.0, 0.002])) == pytest.approx(
        [1.0, 9.0, 100.0, 100.0]
    )
    assert pos_weight_from_prevalence(torch.tensor([1.0]), max_weight=50) == pytest.approx([1 / 50])
    with pytest.raises(ValueError, match="fractions"):
        pos_weight_from_prevalence(torch.tensor([1.5]))


def test_layer_decay_gives_early_blocks_smaller_lr(
    tmp_path: Path, cpu_trainer: Callable[..., L.Trainer], make_module: Callable[..., XrayClassifier]
) -> None:
    module = make_module(lr=1e-3, layer_decay=0.5)
    module.trainer = cpu_trainer(default_root_dir=tmp_path, max_epochs=-1, max_steps=10)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "step"
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    blocks = [lr_of[id(module.backbone.blocks[i].attn.qkv.weight)] for i in range(6)]
    assert blocks == sorted(blocks) and blocks[0] == pytest.approx(1e-3 * 0.5**6)
    assert lr_of[id(module.backbone.head.weight)] == pytest.approx(1e-3)
    assert optimizer.param_groups[0]["lr"] == 0.0  # the warm-up starts from 0


def test_compile_flag_compiles_the_backbone_in_place(make_module: Callable[..., XrayClassifier]) -> None:
    if not hasattr(torch.nn.Module, "compile"):  # torch < 2.2: the legacy IPU stack (make test-legacy)
        with pytest.raises(ValueError, match=r"model.compile=true needs torch >= 2.2"):
            make_module(compile=True)
        return
    module = make_module(compile=True)
    assert module.backbone._compiled_call_impl is not None  # forward goes through torch.compile
    assert all(not key.startswith("_orig_mod") for key in module.state_dict())
    assert make_module().backbone._compiled_call_impl is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pos_weight": [1.0] * 14}, "pos_weight"),
        ({"pos_weight": [1.0] * 14 + [-1.0]}, "pos_weight"),
        ({"warmup_ratio": 2.0}, "warmup_ratio"),
        ({"lr": -1.0}, "lr"),
        ({"layer_decay": 0.0}, "layer_decay"),
    ],
)
def test_bad_settings_stop_before_any_download(
    kwargs: dict, message: str, monkeypatch: pytest.MonkeyPatch, tiny_backbone: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were the backbone built first, this would say "offline"
    with pytest.raises(ValueError, match=message):
        XrayClassifier(backbone=tiny_backbone, weights="hub", **kwargs)


def test_num_classes_comes_from_the_labels_and_old_checkpoints_still_load(
    fitted: tuple[L.Trainer, XrayClassifier, Path], tmp_path: Path, tiny_backbone: str
) -> None:
    trainer, module, _ = fitted
    assert module.backbone.head.out_features == len(LABELS) and "num_classes" not in module.hparams
    with pytest.raises(TypeError, match="num_classes"):
        XrayClassifier(backbone=tiny_backbone, weights="none", num_classes=14)
    # A checkpoint saved while num_classes was a setting carries it in its hyperparameters.
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["num_classes"] = 15
    torch.save(checkpoint, path)
    images = _toy(4, seed=5).tensors[0]
    reloaded = XrayClassifier.load_from_checkpoint(path, weights="none").eval()
    module.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images), module(images))


@pytest.mark.slow
def test_nan_free_metrics_need_both_classes(fitted: tuple[L.Trainer, XrayClassifier, Path]) -> None:
    _, module, _ = fitted
    assert all(not math.isnan(v) for v in module.last_metrics["val"]["auroc_per_finding"].values())
