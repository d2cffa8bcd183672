"""Plots: training curves from a real CSVLogger metrics.csv, ROC curves and sample grids, checked as PNGs
and through the figures behind them (legend texts, tile titles, plotted values)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from xraycls.findings import LABELS, NUM_LABELS
from xraycls.model.module import XrayClassifier
from xraycls.report import plots
from xraycls.report.plots import plot_roc_curves, plot_sample_grid, plot_training_curves

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_real_png(path: Path, min_bytes: int = 8_000) -> np.ndarray:
    """A complete PNG of some size and more than a handful of colours; returns its pixels."""
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # checks the chunks' CRCs
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20 and pixels.std() > 5
    return pixels


@pytest.fixture(scope="module")
def metrics_csv(
    tmp_path_factory: pytest.TempPathFactory,
    cpu_trainer: Callable[..., L.Trainer],
    tiny_backbone: str,
    tiny_backbone_kwargs: dict,
) -> Path:
    """metrics.csv of a real fit: tiny ViT, random images, 2 epochs x 4 batches, 2 val batches."""
    root = tmp_path_factory.mktemp("fit")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 64, 64, generator=generator)
    labels = (torch.rand(32, NUM_LABELS, generator=generator) < 0.5).float()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = XrayClassifier(backbone=tiny_backbone, weights="none", **tiny_backbone_kwargs)
    logger = CSVLogger(root, name="run", version=0)
    trainer = cpu_trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        logger=logger,
        default_root_dir=root,
    )
    trainer.fit(module, loader, loader)
    return Path(logger.log_dir) / "metrics.csv"


@pytest.mark.slow
def test_training_curves_from_a_real_lightning_run(metrics_csv: Path, tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    written = plot_training_curves(metrics_csv, tmp_path / "plots")
    assert written == [tmp_path / "plots" / "train_loss_lr.png", tmp_path / "plots" / "val_auroc.png"]
    for path in written:
        assert_real_png(path)
    assert matplotlib.get_backend() == backend  # no global state touched
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["train_loss_lr.png", "val_auroc.png"]


@pytest.mark.slow
def test_training_curves_plot_the_logged_values(metrics_csv: Path) -> None:
    table = pd.read_csv(metrics_csv)
    fig = plots._loss_lr_figure(table)
    loss_ax, lr_ax = fig.axes
    logged = table[["step", "train/loss"]].dropna()
    assert len(logged) == 8  # 2 epochs x 4 steps
    np.testing.assert_allclose(loss_ax.lines[0].get_xdata(), logged["step"])
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), logged["train/loss"])
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), table["lr"].dropna())
    (ax,) = plots._val_auroc_figure(table).axes
    assert [line.get_label() for line in ax.lines] == list(plots._VAL_AUROC)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0, 1])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), table["val/auroc_macro14"].dropna())


def test_training_curves_skip_plots_whose_columns_are_absent(tmp_path: Path) -> None:
    only_val = tmp_path / "val.csv"
    pd.DataFrame({"epoch": [0, 1, 2], "step": [9, 19, 29], "val/auroc_macro14": [0.6, 0.7, 0.75]}).to_csv(
        only_val, index=False
    )
    assert plot_training_curves(only_val, tmp_path / "a") == [tmp_path / "a" / "val_auroc.png"]
    assert_real_png(tmp_path / "a" / "val_auroc.png")

    steps = np.arange(200)
    only_lr = tmp_path / "lr.csv"
    pd.DataFrame({"epoch": steps // 100, "step": steps, "lr": np.linspace(0, 2e-4, 200)}).to_csv(
        only_lr, index=False
    )
    assert plot_training_curves(only_lr, tmp_path / "b") == [tmp_path / "b" / "train_loss_lr.png"]
    assert len(plots._loss_lr_figure(pd.read_csv(only_lr)).axes) == 1  # the lr panel alone

    nothing = tmp_path / "other.csv"
    pd.DataFrame({"epoch": [0], "step": [0], "something": [1.0]}).to_csv(nothing, index=False)
    assert plot_training_curves(nothing, tmp_path / "c") == []
    assert not (tmp_path / "c").exists()


def test_training_curves_smooth_a_long_loss_curve() -> None:
    steps = np.arange(300)
    loss = 1.0 / (1 + steps / 50) + np.random.default_rng(0).normal(0, 0.05, 300)
    fig = plots._loss_lr_figure(pd.DataFrame({"step": steps, "train/loss": loss}))
    raw, smooth = fig.axes[0].lines
    assert np.std(np.diff(smooth.get_ydata())) < 0.3 * np.std(np.diff(raw.get_ydata()))


def test_training_curves_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics file not found: .*missing.csv"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv: not a readable metrics CSV"):
        plot_training_curves(empty, tmp_path)


def _scores(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    labels = (rng.random((n, NUM_LABELS)) < 0.2).astype(np.int64)
    labels[:, 13] = 0  # Hernia: no positives
    probs = np.clip(0.3 * labels + rng.random((n, NUM_LABELS)) * 0.8, 0, 1)
    return probs, labels


def test_roc_curves_one_per_label_with_auc_in_the_legend(tmp_path: Path) -> None:
    probs, labels = _scores()
    out = plot_roc_curves(probs, labels, tmp_path / "roc" / "test_roc.png", title="test split")
    assert out == tmp_path / "roc" / "test_roc.png"
    assert_real_png(out)

    fig = plots._roc_figure(probs, labels, LABELS, "test split")
    (ax,) = fig.axes
    texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(texts) == NUM_LABELS + 1 and texts[-1] == "chance"
    for k, name in enumerate(LABELS):
        if k == 13:
            assert texts[k] == "Hernia (AUC n/a: no positives)"
            continue
        expected = roc_auc_score(labels[:, k], probs[:, k])
        assert texts[k] == f"{name} (AUC {expected:.3f}, n+={labels[:, k].sum()})"
    assert ax.get_title() == "test split"
    assert len({line.get_color() for line in ax.lines[:NUM_LABELS]}) == NUM_LABELS  # distinguishable


def test_roc_curves_reject_bad_input(tmp_path: Path) -> None:
    probs, labels = _scores(20)
    with pytest.raises(ValueError, match=r"labels must be \[20, 15\]"):
        plot_roc_curves(probs, labels[:, :14], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels must be 0/1"):
        plot_roc_curves(probs, labels * 2, tmp_path / "x.png")
    probs[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plot_roc_curves(probs, labels, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sample_grid_titles_each_tile_with_its_labels(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    images = np.stack([((xx * 4 + yy * k) % 256).astype(np.uint8) for k in range(5)])
    labels = np.zeros((5, NUM_LABELS), dtype=np.int64)
    labels[1, [0, 2]] = 1  # Atelectasis, Effusion
    labels[2, 14] = 1  # No Finding
    labels[3, [3, 4, 5, 6, 7]] = 1
    out = plot_sample_grid(images, labels, tmp_path / "samples.png", ncols=3, title="val samples")
    pixels = assert_real_png(out)
    assert pixels.shape[1] > pixels.shape[0]  # 3 columns, 2 rows

    fig = plots._sample_grid_figure(images, labels, LABELS, 3, "val samples")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["No Finding", "Atelectasis, Effusion", "No Finding"]
    assert titles[3].replace("\n", " ") == "Infiltration, Mass, Nodule, Pneumonia, Pneumothorax"
    assert len(fig.axes) == 6 and titles[5] == ""  # one empty tile
    np.testing.assert_array_equal(fig.axes[4].images[0].get_array(), images[4])


def test_sample_grid_rejects_bad_input(tmp_path: Path) -> None:
    labels = np.zeros((2, NUM_LABELS))
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W\].*float32"):
        plot_sample_grid(np.zeros((2, 8, 8), np.float32), labels, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"labels must be \[2, 15\]"):
        plot_sample_grid(np.zeros((2, 8, 8), np.uint8), labels[:1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="ncols must be >= 1, got 0"):
        plot_sample_grid(np.zeros((2, 8, 8), np.uint8), labels, tmp_path / "x.png", ncols=0)
