# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # xraycls walkthrough: the guide's notebook, step by step
#
# The guide (Graphcore's ViT walkthrough, repeated by Gcore on IPU pods) is a notebook: download NIH
# ChestX-ray14, look at the labels, fine-tune ViT-B/16 for 3 epochs, evaluate, save the model, reload it
# and draw nine X-rays titled "Prediction | Real". This notebook takes the same steps with xraycls. Each
# step is one command you could type in a shell (printed as `$ ...` above its output) or one public
# function of the package: the notebook adds no logic of its own.
#
# > **Medical disclaimer.** xraycls is research software. Any output that names a finding is an aid to
# > be checked by a radiologist, not a diagnosis.
#
# - `DEMO = True` (the default): a small synthetic set in the NIH layout (`xraycls synth`) and the tiny
#   ViT on the CPU, a few minutes end to end. **Its numbers come from SYNTHETIC images and say nothing
#   about real X-rays.**
# - `DEMO = False`: the real release (`xraycls download`, 42 GB, resumable) and the guide's recipe
#   (`experiment=seed_reproduction`: hours on one GPU). Long steps are better run in a terminal, with the
#   same commands.
#
# Everything is written under `WORK` (default: `notebook_run/` in the project, beside `data/`; the
# environment variable `XRAYCLS_NOTEBOOK_DIR` names another folder). Every step can be rerun: finished
# work is kept (delete `WORK` to start over).

# %%
import json
import os
import shlex
import subprocess
import sys
from codecs import getincrementaldecoder
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from IPython.display import Image, Markdown, display

import xraycls
from xraycls.data.cache import open_cache
from xraycls.data.images import load_xray
from xraycls.data.inspect import inspect_datamodule
from xraycls.data.labels import find_label_file
from xraycls.disclaimer import DISCLAIMER
from xraycls.evaluation.predictions import read_scored_images
from xraycls.findings import LABELS
from xraycls.inference import load_bundle
from xraycls.report.plots import plot_sample_grid

# %%
DEMO = True  # False: the real NIH release and the guide's recipe (experiment=seed_reproduction)


# %%
def find_project_root() -> Path:
    """The project (pyproject.toml, train.py, conf/): the one the imported package sits in (an editable
    install or a checkout), else the first above the working directory: the notebook runs from any folder."""
    package_parent = Path(xraycls.__file__).resolve().parents[1]
    for folder in (package_parent, Path.cwd(), *Path.cwd().parents):
        if all((folder / name).is_file() for name in ("pyproject.toml", "train.py", "conf/config.yaml")):
            return folder
    raise FileNotFoundError(f"no xraycls project beside {xraycls.__file__} or above {Path.cwd()}")


ROOT = find_project_root()
WORK = Path(os.environ.get("XRAYCLS_NOTEBOOK_DIR") or ROOT / "notebook_run").resolve()
WORK.mkdir(parents=True, exist_ok=True)
print(f"python {sys.executable}\nxraycls {xraycls.__file__}\nproject {ROOT}\nwork folder {WORK}")


def run(shown: list[str], command: list[str]) -> None:
    """Run one command in WORK, print it as a user types it, stream its output; a failure fails the cell."""
    print("$", shlex.join(shown), flush=True)
    decoder = getincrementaldecoder("utf-8")(errors="replace")
    with subprocess.Popen(command, cwd=WORK, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            print(decoder.decode(chunk), end="", flush=True)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, shown)


def xraycls_cli(*args: object) -> None:
    """`xraycls ARGS`, with this kernel's interpreter (python -m xraycls)."""
    args = [str(arg) for arg in args]
    run(["xraycls", *args], [sys.executable, "-m", "xraycls", *args])


def train_py(*overrides: str) -> None:
    """`python train.py OVERRIDES` of the project, with this kernel's interpreter."""
    run(["python", "train.py", *overrides], [sys.executable, str(ROOT / "train.py"), *overrides])


# %% [markdown]
# ## 1. The data folder
#
# The guide's first cell points at a dataset folder. Here it is `paths.data_dir`, which the Hydra config
# (`conf/`) turns into the dataset folder (`data.root`) and the cache folder (`data.cache_dir`) of the
# experiment: the same settings `train.py` will use below, composed with Hydra's API.

# %%
EXPERIMENT = "demo" if DEMO else "seed_reproduction"
# paths.data_dir. The real release: 42 GB of PNGs, a 7.3 GB cache at 256 px, one archive as it extracts.
DATA_DIR = WORK / "data"
RUNS_DIR = WORK / "runs"
RUN_DIR = RUNS_DIR / EXPERIMENT
# The demo: 8 epochs (experiment=demo alone trains 40) and 200 patient resamples (2,000 by default) keep the
# notebook within a few CPU minutes; no progress bars (their cursor codes clutter a notebook; the real run
# keeps them, for its hours).
OVERRIDES = [
    f"experiment={EXPERIMENT}",
    f"paths.data_dir={DATA_DIR}",
    f"paths.runs_dir={RUNS_DIR}",
    *(["trainer.max_epochs=8", "eval.bootstrap=200", "trainer.enable_progress_bar=false"] if DEMO else []),
]
DATA_NOTE = "SYNTHETIC data (demo): says nothing about real X-rays" if DEMO else "NIH ChestX-ray14"

with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
    cfg = compose("config", overrides=OVERRIDES)
RAW, CACHE = Path(cfg.data.root), Path(cfg.data.cache_dir)
SPLIT = cfg.data.split
print(f"experiment {EXPERIMENT}: dataset {RAW}, cache {CACHE} ({cfg.data.image_size} px), split {SPLIT}")

# %% [markdown]
# ## 2. Download (or, in the demo, make a synthetic set)
#
# `xraycls download` fetches the label file, NIH's split lists and the 12 image archives (md5-checked,
# resumable: rerun it after an interruption). The demo makes 600 synthetic images in the same layout
# instead, with a planted, learnable signal per finding.

# %%
if DEMO:
    xraycls_cli("synth", "--out", RAW, "--n", 600, "--size", 64, "--seed", 0, "--min-prevalence", 0.08)
else:
    xraycls_cli("download", "--root", RAW)

# %% [markdown]
# ## 3. Prepare the cache
#
# Decode and resize every PNG once into a uint8 memmap; training then reads the cache, never the PNGs.
# Corrupt or missing images are skipped and listed in `prepare_report.json`.

# %%
xraycls_cli("prepare", "--root", RAW, "--cache", CACHE, "--size", cfg.data.image_size, "--quiet")

# %% [markdown]
# ## 4. Look at the data
#
# One pass of the training DataModule over the cache (`xraycls inspect`, here its function
# `inspect_datamodule`) with the experiment's split: images, patients and positives per label in each
# part, and whether any patient sits in two parts.

# %%
summary = inspect_datamodule(
    cache_dir=str(CACHE),
    root=str(RAW),
    batch_size=int(cfg.data.batch_size),
    **{
        key: cfg.data[key]
        for key in ("image_size", "input_size", "split", "split_seed", "split_row_order", "num_workers")
    },
)
counts = pd.DataFrame(summary["positives"]).reindex(list(LABELS))
sizes = pd.DataFrame({"images": summary["images"], "patients": summary["patients"]}).T
print(f"Split {SPLIT}: {summary['leaked_patients']} patients in more than one part; {DATA_NOTE}")
display(sizes)
print(f"Positive images per label and part, split {SPLIT} ({DATA_NOTE})")
display(counts)
axes = counts.plot.bar(figsize=(11, 4), title=f"Positive images per label, split {SPLIT} ({DATA_NOTE})")
axes.set_ylabel("images")

# %%
images, index = open_cache(CACHE, int(cfg.data.image_size))
grid = plot_sample_grid(
    images[:9], index[list(LABELS)].to_numpy()[:9], WORK / "data_samples.png", title=f"9 images ({DATA_NOTE})"
)
display(Image(filename=grid))

# %% [markdown]
# ## 5. Train
#
# `python train.py experiment=...` fits, validates every epoch, tests the best checkpoint (by validation
# AUROC; `seed_reproduction` keeps the last epoch, as the guide did), chooses the operating thresholds on
# validation, exports the model bundle and writes its plots. The run directory is `RUN_DIR`; rerunning
# into a finished one changes nothing (`overwrite=true` starts it over).

# %%
train_py(*OVERRIDES, f"hydra.run.dir={RUN_DIR}")

# %% [markdown]
# The loss and learning rate per step (the guide's plot), then the validation AUROC per epoch, drawn by
# the run from its `metrics.csv`.

# %%
print(f"Training curves, split {SPLIT}: train loss and validation AUROC ({DATA_NOTE})")
display(Image(filename=RUN_DIR / "plots" / "train_loss_lr.png"))
display(Image(filename=RUN_DIR / "plots" / "val_auroc.png"))

# %% [markdown]
# ## 6. Evaluation, with intervals
#
# The run's `summary.json` holds the validation and test metrics of the best checkpoint, with 95%
# intervals from patient resamples (`metrics.test.ci`). `xraycls evaluate` scores any bundle on any part
# of a split, from the cache alone: below, the run's own split, its test part. The guide compared one
# number, without an interval; `auroc_seed_compat` is the one computed the guide's way.

# %%
run_summary = json.loads((RUN_DIR / "summary.json").read_text())
test = run_summary["metrics"]["test"]
headline = pd.DataFrame(
    {
        name: {"test": test[name], "95% CI low": test["ci"][name][0], "95% CI high": test["ci"][name][1]}
        for name in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat")
    }
).T
print(f"summary.json, split {SPLIT}, test part ({DATA_NOTE}); {test['ci']['resamples']} patient resamples")
display(headline)

# %%
EVAL_DIR = WORK / "evaluate"
xraycls_cli(
    "evaluate", "--model", RUN_DIR / "model", "--cache", CACHE, "--part", "test",
    "--bootstrap", cfg.eval.bootstrap, "--out", EVAL_DIR, "--quiet",
)  # fmt: skip
metrics = json.loads((EVAL_DIR / "metrics.json").read_text())
per_finding = pd.DataFrame(
    {
        "AUROC": metrics["auroc_per_finding"],
        "95% CI low": {name: low for name, (low, _) in metrics["ci"]["auroc_per_finding"].items()},
        "95% CI high": {name: high for name, (_, high) in metrics["ci"]["auroc_per_finding"].items()},
    }
)
print(
    f"xraycls evaluate: split {metrics['split']}, {metrics['part']} part, {metrics['images']} images of "
    f"{metrics['patients']} patients ({DATA_NOTE}); auroc_macro14 {metrics['auroc_macro14']:.3f} "
    f"(95% CI {metrics['ci']['auroc_macro14'][0]:.3f} to {metrics['ci']['auroc_macro14'][1]:.3f})"
)
print(metrics["disclaimer"])
display(per_finding)
display(Image(filename=EVAL_DIR / "roc.png"))

# %% [markdown]
# ## 7. Save and reload the model bundle
#
# The guide saved `./results` and reloaded it with transformers. An xraycls run saves `model/`:
# safetensors weights and a `config.json` (backbone, labels, preprocessing, thresholds), a plain folder
# you can copy anywhere. `load_bundle` rebuilds it with torch and timm alone (no Hydra, no Lightning, no
# pickle). Below, the reloaded bundle scores three test images from their PNG files; beside each, what the
# run itself wrote for that image in `predictions_test.csv`.

# %%
print(DISCLAIMER)
print(f"model bundle: {sorted(path.name for path in (RUN_DIR / 'model').iterdir())}")
bundle = load_bundle(RUN_DIR / "model")
test_images = read_scored_images(RUN_DIR / "predictions_test.csv")
names = list(test_images.images[:3])
pixels = [load_xray(RAW / "images" / name, int(bundle.preprocessing["image_size"])) for name in names]
reloaded = pd.DataFrame(bundle.predict_proba(pixels), index=names, columns=bundle.labels)
written = pd.DataFrame(test_images.probabilities[:3], index=names, columns=bundle.labels)
print(f"Probabilities, split {SPLIT}, test part ({DATA_NOTE}): the reloaded bundle, then the run's file")
display(reloaded.round(4))
display(written.round(4))

# %% [markdown]
# ## 8. Nine test X-rays: "Prediction | Real"
#
# The guide's last figure, from `xraycls predict --grid`: nine images of the test part, each titled with
# the findings the model flags (probability at or above its threshold, chosen on validation) and the real
# labels from the label file. The figure carries the disclaimer; so does every prediction file.

# %%
PREDICT_DIR = WORK / "predict"
nine = [RAW / "images" / name for name in test_images.images[:9]]
print(DISCLAIMER)
xraycls_cli(
    "predict", "--model", RUN_DIR / "model", *nine, "--out", PREDICT_DIR / "predictions.csv",
    "--grid", PREDICT_DIR / "grid.png", "--labels", find_label_file(RAW), "--quiet",
)  # fmt: skip
print(f"Split {SPLIT}, test part ({DATA_NOTE}). {DISCLAIMER}")
display(Image(filename=PREDICT_DIR / "grid.png"))

# %% [markdown]
# ## 9. What it cost
#
# `xraycls cost` turns the run's recorded timings into time and money per rented machine, and
# extrapolates to k x the data. **The shipped prices are placeholders** (marked `*`): put your provider's
# price in `experiments/cost_study/flavors/*.yaml` for real figures. The demo's timings are of a tiny
# model on SYNTHETIC data.

# %%
COST_DIR = WORK / "cost"
xraycls_cli("cost", "--runs", RUN_DIR, "--out", COST_DIR)
print(f"Timings of the {EXPERIMENT} run, split {SPLIT} ({DATA_NOTE})")
display(Markdown((COST_DIR / "cost_report.md").read_text()))
display(Image(filename=COST_DIR / "time_per_flavor.png"))
