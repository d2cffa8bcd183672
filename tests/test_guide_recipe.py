"""The guide's recipe (`experiment=seed_reproduction`): its settings in the real config, and the split's row
order from the config through the DataModule to the held-out images."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from _project import compose_cfg
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from xraycls.data.datamodule import NIHDataModule
from xraycls.data.labels import read_label_file
from xraycls.data.splits import attach_official_split, build_split
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.training import instantiate_callbacks

# The guide's logs (Graphcore's walkthrough on 4 IPUs): images, global batch, optimizer steps.
GUIDE_TRAIN, GUIDE_VAL, GUIDE_BATCH, GUIDE_STEPS, GUIDE_EPOCHS = 106_514, 5_606, 128, 2_496, 3


def test_seed_reproduction_config_is_the_guides_recipe(tmp_path: Path) -> None:
    cfg = OmegaConf.to_container(compose_cfg(["experiment=seed_reproduction"], tmp_path), resolve=True)
    data, optim, trainer, model = cfg["data"], cfg["optim"], cfg["trainer"], cfg["model"]
    assert cfg["seed"] == 1337
    assert (data["split"], data["split_seed"], data["split_row_order"]) == ("seed_random", 1337, "file_name")
    assert data["val_fraction"] is None  # the split's default, 0.05
    assert data["augment"]["enabled"] is False and data["input_size"] == 224
    # IPUTrainer: no gradient clipping, weight decay 0; lr 2e-4, cosine to 0 after a 25% linear warm-up.
    assert optim["gradient_clip_val"] is None and trainer["gradient_clip_val"] is None
    assert optim["weight_decay"] == 0.0 and model["weight_decay"] == 0.0
    assert optim["lr"] == model["lr"] == 2e-4
    assert optim["warmup_ratio"] == model["warmup_ratio"] == 0.25
    assert optim["min_lr_ratio"] == model["min_lr_ratio"] == 0.0
    assert optim["betas"] == [0.9, 0.999] and optim["layer_decay"] is None
    assert trainer["max_epochs"] == GUIDE_EPOCHS
    # The guide reported its final model: no choice of epoch on the set that is also reported.
    assert cfg["callbacks"]["model_checkpoint"]["monitor"] is None
    assert data["batch_size"] * trainer["accumulate_grad_batches"] == GUIDE_BATCH
    # 832 full batches per epoch (drop_last) x 3 epochs: the guide's 2,496 optimizer steps.
    assert GUIDE_TRAIN // GUIDE_BATCH * GUIDE_EPOCHS == GUIDE_STEPS
    assert math.ceil(0.05 * (GUIDE_TRAIN + GUIDE_VAL)) == GUIDE_VAL


def test_other_recipes_keep_the_label_file_order(tmp_path: Path) -> None:
    for overrides in ([], ["experiment=official_split"]):
        cfg = compose_cfg(overrides, tmp_path)
        assert cfg.data.split_row_order == "label_file", overrides
    datamodule = instantiate(compose_cfg(["experiment=seed_reproduction"], tmp_path).data)
    assert isinstance(datamodule, NIHDataModule) and datamodule.hparams.split_row_order == "file_name"
    (checkpoint,) = [
        cb
        for cb in instantiate_callbacks(compose_cfg(["experiment=seed_reproduction"], tmp_path))
        if type(cb) is ModelCheckpoint  # the best-epoch one; LastCheckpoint subclasses it
    ]
    assert checkpoint.monitor is None and checkpoint.save_top_k == 1


def test_a_wrong_row_order_stops_the_datamodule_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown split_row_order 'random'; choose one of"):
        NIHDataModule(root=str(tmp_path), source="png", split="seed_random", split_row_order="random")


@pytest.fixture(scope="module")
def shuffled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic NIH tree whose label file lists its rows out of file-name order."""
    root = tmp_path_factory.mktemp("nih")
    make_synthetic_nih(root, 80, size=32, seed=2)
    label_file = root / "Data_Entry_2017_v2020.csv"
    rows = pd.read_csv(label_file)
    rows.sample(frac=1.0, random_state=0).to_csv(label_file, index=False)
    return root


@pytest.mark.parametrize("row_order", ["label_file", "file_name"])
def test_the_datamodule_splits_in_the_configured_row_order(shuffled_tree: Path, row_order: str) -> None:
    datamodule = NIHDataModule(
        root=str(shuffled_tree),
        source="png",
        image_size=32,
        input_size=32,
        split="seed_random",
        split_seed=1337,
        split_row_order=row_order,
        batch_size=4,
        num_workers=0,
    )
    datamodule.setup("fit")
    table = attach_official_split(read_label_file(shuffled_tree / "Data_Entry_2017_v2020.csv"), shuffled_tree)
    if row_order == "file_name":
        table = table.sort_values("image").reset_index(drop=True)
    expected = build_split(table, "seed_random", seed=1337)
    names = datamodule.table["image"].to_numpy()
    held_out = set(names[datamodule.assignment.indices("val")])
    assert held_out == set(table["image"].to_numpy()[expected.indices("val")])
    assert len(held_out) == math.ceil(0.05 * 80)
    assert datamodule.data_summary()["split_row_order"] == row_order
