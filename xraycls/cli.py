"""The `xraycls` command line: data, plans and costs, prediction, evaluation, export and sweep reports.

Each command is a thin shell over one library function:

    download      fetch NIH ChestX-ray14 (labels, split lists, image archives), resumable
    synth         make a synthetic dataset in the NIH layout, with a learnable planted signal
    prepare       decode and resize the PNGs once into a uint8 memmap cache
    inspect       one pass of the DataModule over a cache, and a data summary
    plan          the resolved hardware plan of a training config
    cost          time and money per flavor from run directories, and at k x the data
    predict       probabilities and flagged findings for X-ray files
    evaluate      a model bundle on one part of a split: metrics, patient-bootstrap intervals, plots
    compare       runs or evaluations side by side: intervals, paired differences, forest plot
    export        a model bundle as ONNX (checked against PyTorch) or as a transformers ViT folder
    import-hf     a transformers ViTForImageClassification folder as a model bundle
    sweep-report  ranking, charts and importances of a finished sweep folder

Every output location (file or folder) is checked before the work starts: writable, or creatable, and a
file name where a file is written (`xraycls.files.check_output_file` / `check_output_dir`).

Errors and exit status: the project's own configuration and input errors (ValueError and its kinds:
PlanError, CheckpointError, LabelFileError, ...; FileNotFoundError; RuntimeError and its kinds:
IPUUnavailableError, OnnxMismatchError, ...) end in one line on stderr, ``xraycls <command>: error:
<message>``, and exit status 2, as argparse's own usage errors do. Any other OSError (the file system
failing during the work: a full disk, a permission changed under a running job) ends in one line naming the
path and the reason, and exit status 1: the settings were fine, the work failed. A command may also exit 1
for its own partial failures (`download`: files missing; `predict`: images that could not be read). Ctrl-C
exits 130 (rerun to resume). ``XRAYCLS_DEBUG=1`` in the environment (or ``-v``) shows the traceback instead.

Heavy imports (torch, Lightning) happen inside the handler so that `xraycls download --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from xraycls.errors import one_line
from xraycls.files import check_output_dir, check_output_file

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace], int]
# The project's Hydra configs (train.py's) and the cost study's flavors, beside the package in a checkout.
_CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
_FLAVOR_DIR = Path(__file__).resolve().parents[1] / "experiments" / "cost_study" / "flavors"
_COMMANDS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = handler
        return handler

    return register


@_command("download")
def _download(args: argparse.Namespace) -> int:
    """Fetch NIH ChestX-ray14 into --root (md5-checked, resumable); exit 1 if anything is missing."""
    from xraycls.data.download import download_nih, parse_archive_selection

    # None = every archive the sources list, so a mirror TSV with fewer archives still works.
    archives = None if args.archives == "all" else parse_archive_selection(args.archives)
    check_output_dir(args.root, "--root")
    report = download_nih(
        Path(args.root),
        archives,
        workers=args.workers,
        keep_archives=args.keep_archives,
        sources=Path(args.sources) if args.sources else None,
        progress=not args.quiet,
    )
    print(report.format())
    return 0 if report.ok() else 1


@_command("synth")
def _synth(args: argparse.Namespace) -> int:
    """Make a synthetic dataset in the NIH layout with a planted signal; print its summary (JSON)."""
    from xraycls.data.synthetic import make_synthetic_nih

    check_output_dir(args.out, "--out")
    summary = make_synthetic_nih(
        Path(args.out), args.n, size=args.size, seed=args.seed, min_prevalence=args.min_prevalence
    )
    print(json.dumps(summary, indent=2))
    return 0


@_command("prepare")
def _prepare(args: argparse.Namespace) -> int:
    """Decode and resize the PNGs once into the uint8 memmap cache (or find it complete and reuse it); list
    the corrupt images. The cache folder is checked (writable) only when there is work to do."""
    from xraycls.data.cache import prepare_cache

    report = prepare_cache(
        Path(args.root),
        Path(args.cache),
        size=args.size,
        workers=args.workers,
        progress=not args.quiet,
        label_file=Path(args.labels) if args.labels else None,
    )
    corrupt = report["corrupt"]
    if report.get("reused"):
        done = f"reused the complete {report['size']} px cache in {args.cache} ({report['ok']} images, "
        done += "made from these same inputs; nothing decoded)"
    else:
        done = f"prepared {report['ok']} images at {report['size']} px into {args.cache} "
        done += f"({report['images_per_s']:.0f} images/s)"
    print(f"{done}; corrupt: {len(corrupt)}; missing: {report['missing']['count']}")
    for item in corrupt:
        print(f"  corrupt: {item['image']}: {item['reason']}")
    return 0


@_command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    """One pass of the DataModule over a cache; print the data summary (JSON)."""
    from xraycls.data.inspect import inspect_datamodule

    summary = inspect_datamodule(
        cache_dir=args.cache,
        root=args.root,
        image_size=args.size,
        input_size=args.input_size,
        split=args.split,
        split_seed=args.split_seed,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    print(json.dumps(summary, indent=2))
    return 0


@_command("cost")
def _cost(args: argparse.Namespace) -> int:
    """Time and money per flavor of finished runs, and at k x the data: markdown, CSVs and charts."""
    from xraycls.report.cost import (
        group_runs,
        load_flavors,
        load_run,
        parse_flavor_assignments,
        write_cost_report,
    )

    check_output_dir(args.out, "--out")
    flavor_dir = Path(args.flavors) if args.flavors else _FLAVOR_DIR
    # An explicit --flavors must exist; without the project's flavors (an installed package), time only.
    flavors = load_flavors(flavor_dir) if args.flavors or flavor_dir.is_dir() else {}
    assign = parse_flavor_assignments(args.flavor)
    groups = group_runs([load_run(run_dir) for run_dir in args.runs], flavors, assign)
    written = write_cost_report(groups, Path(args.out), scale=args.scale)
    print(written["markdown"].read_text())
    print("wrote: " + ", ".join(str(path) for path in written.values()))
    return 0


@_command("plan")
def _plan(args: argparse.Namespace) -> int:
    """Print the resolved hardware plan of a training config and its overrides (JSON)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from xraycls.training import hardware_plan

    config_dir = Path(args.config_dir).resolve()
    if not (config_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--config-dir {config_dir}: no config.yaml (the project's conf/ folder)")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose("config", overrides=list(args.overrides))
    except HydraException as error:
        # Hydra's message spans lines (options, search path): keep it to one line naming the options.
        message = one_line(error)
        raise ValueError(f"overrides {list(args.overrides)}: {message}") from None
    # The plan reads hardware, model, data and trainer only: the run directory (hydra:runtime) does not
    # exist outside `train.py`, so nothing else is resolved.
    output = hardware_plan(cfg).to_dict()
    ipu = OmegaConf.to_container(cfg.hardware, resolve=True).get("ipu")
    if ipu:
        output["ipu"] = ipu
    print(json.dumps(output, indent=2))
    return 0


@_command("predict")
def _predict(args: argparse.Namespace) -> int:
    """Probabilities and flagged findings for image files, as CSV or JSON; exit 1 if any image failed."""
    from xraycls.disclaimer import DISCLAIMER
    from xraycls.inference.outputs import format_csv
    from xraycls.inference.predict_run import run_predict

    predictions = run_predict(
        Path(args.model),
        [Path(path) for path in args.paths],
        out=Path(args.out) if args.out else None,
        grid=Path(args.grid) if args.grid else None,
        grid_size=args.grid_size,
        labels_file=Path(args.labels) if args.labels else None,
        heatmaps_dir=Path(args.heatmaps) if args.heatmaps else None,
        finding=args.finding,
        **_inference_options(args),
    )
    # Without --out the CSV goes to stdout, so everything else goes to stderr.
    report = sys.stdout if args.out else sys.stderr
    if not args.out:
        sys.stdout.write(format_csv(predictions))
    for failure in predictions.failures:
        print(f"xraycls predict: failed: {failure}", file=sys.stderr)
    written = [args.out] if args.out else []
    if args.grid and predictions.paths:  # no grid when nothing was predicted
        written.append(args.grid)
    if predictions.heatmaps:
        written.append(f"{len(predictions.heatmaps)} heatmap(s) in {args.heatmaps}")
    print(
        f"predicted {len(predictions.paths)} image(s) on {predictions.device}, "
        f"{len(predictions.failures)} failed" + (f"; wrote {', '.join(written)}" if written else ""),
        file=report,
    )
    print(DISCLAIMER, file=report)
    return 1 if predictions.failures else 0


@_command("export")
def _export(args: argparse.Namespace) -> int:
    """Write a model bundle as ONNX, checked against PyTorch with ONNX Runtime, and print the report (JSON);
    or, with --hf, as a transformers ViTForImageClassification folder, checked against the bundle."""
    if args.hf is not None:
        given = {"--opset": args.opset, "--check-inputs": args.check_inputs}
        onnx_only = [name for name, value in given.items() if value is not None]
        if onnx_only:
            raise ValueError(f"{' and '.join(onnx_only)}: settings of --onnx; --hf takes neither")
        from xraycls.inference.hf_bundle import export_hf

        check_output_dir(args.hf, "--hf")
        written = export_hf(Path(args.model), Path(args.hf))
        print(f"wrote {written}: a transformers ViTForImageClassification folder (its logits checked)")
        return 0
    from xraycls.inference.bundle import load_bundle
    from xraycls.inference.onnx_export import export_onnx

    check_output_file(args.onnx, "--onnx")
    bundle = load_bundle(Path(args.model))
    check_inputs = 4 if args.check_inputs is None else args.check_inputs
    report = export_onnx(bundle, Path(args.onnx), opset=args.opset, check_inputs=check_inputs)
    print(json.dumps(report, indent=2))
    return 0


@_command("import-hf")
def _import_hf(args: argparse.Namespace) -> int:
    """Write a transformers ViTForImageClassification folder (the guide's model) as a model bundle."""
    from xraycls.inference.hf_bundle import import_hf

    check_output_dir(args.out, "--out")
    written = import_hf(Path(args.source), Path(args.out))
    print(
        f"imported {args.source} as the model bundle {written}; use it with xraycls predict --model {written}"
    )
    return 0


@_command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    """A model bundle on one part of a split: metrics.json (+ intervals), predictions.csv, plots."""
    from xraycls.evaluation.evaluate import run_evaluate

    check_output_dir(args.out, "--out")
    result = run_evaluate(
        Path(args.model),
        Path(args.out),
        cache_dir=Path(args.cache) if args.cache else None,
        root=Path(args.root) if args.root else None,
        split=args.split,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        part=args.part,
        bootstrap=args.bootstrap,
        seed=args.seed,
        **_inference_options(args),
    )
    ci = result["ci"] or {}
    interval = ci.get("auroc_macro14") or [None, None]
    shown = "" if interval[0] is None else f" (95% CI {interval[0]:.4f} to {interval[1]:.4f})"
    print(
        f"{result['split']} {result['part']}: {result['images']} images, {result['patients']} patients; "
        f"auroc_macro14 {result['auroc_macro14']:.4f}{shown}; wrote {args.out}"
    )
    return 0


@_command("sweep-report")
def _sweep_report(args: argparse.Namespace) -> int:
    """Write the report of a sweep folder (ranking, configurations, charts, importances); print its files."""
    from xraycls.experiment.report import write_sweep_report

    sweep_dir = Path(args.sweep_dir)
    out = Path(args.out) if args.out else sweep_dir / "report"
    check_output_dir(out, "--out")
    written = write_sweep_report(sweep_dir, out, allow_unfinished=args.allow_unfinished)
    for path in written.values():
        print(f"wrote {path}")
    return 0


@_command("compare")
def _compare(args: argparse.Namespace) -> int:
    """Runs or evaluate outputs side by side: AUROC with intervals, paired differences, forest plot."""
    from xraycls.evaluation.compare import run_compare

    check_output_dir(args.out, "--out")
    written = run_compare(
        [Path(p) for p in args.models], Path(args.out), bootstrap=args.bootstrap, seed=args.seed
    )
    print(written["markdown"].read_text(encoding="utf-8"))
    print("wrote: " + ", ".join(str(path) for path in written.values()))
    return 0


def _add_inference_arguments(
    p: argparse.ArgumentParser, *, batch_size: int, workers: int, workers_help: str
) -> None:
    """What running a bundle takes, for predict and evaluate alike: device, batching, calibration, bar."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per forward pass")
    p.add_argument("--workers", type=int, default=workers, help=workers_help)
    p.add_argument("--calibrated", action="store_true", help="apply the model's stored temperatures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _inference_options(args: argparse.Namespace) -> dict:
    """The keywords `_add_inference_arguments` gives predict and evaluate, for their library functions."""
    return {
        "device": args.device,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "progress": not args.quiet,
        "calibrated": args.calibrated,
    }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="xraycls", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch NIH ChestX-ray14 (labels, split lists, image archives)")
    p.add_argument("--root", required=True, help="dataset folder; images land in ROOT/images/")
    p.add_argument("--archives", default="all", help="'all' or archive numbers 1-12, e.g. '1,2' or '1-3'")
    p.add_argument("--workers", type=int, default=2, help="files downloaded at once")
    p.add_argument("--keep-archives", action="store_true", help="keep the .tar.gz files after extraction")
    p.add_argument("--sources", help="a TSV of mirror URLs with the package's columns (default: NIH's links)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("synth", help="make a synthetic dataset in the NIH layout with a planted signal")
    p.add_argument("--out", required=True, help="output folder (NIH layout)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-prevalence", type=float, default=0.0, help="raise every finding to this prevalence")

    p = sub.add_parser("prepare", help="decode and resize the PNGs once into a uint8 memmap cache")
    p.add_argument("--root", required=True, help="dataset folder with images/, a label file and split lists")
    p.add_argument("--cache", required=True, help="cache folder to write")
    p.add_argument(
        "--labels",
        default=None,
        help="the NIH label file, any variant, under any name (default: the first known name in ROOT: "
        "Data_Entry_2017_v2020.csv, Data_Entry_2017.csv, sample_labels.csv, each also .gz)",
    )
    p.add_argument("--size", type=int, default=256, help="cached image side in pixels")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("inspect", help="one pass of the DataModule over a cache and a data summary (JSON)")
    p.add_argument("--cache", required=True, help="cache folder written by `xraycls prepare`")
    p.add_argument("--root", default=None, help="dataset folder, to prepare the cache if it is missing")
    p.add_argument("--size", type=int, default=256, help="cached image side")
    p.add_argument("--input-size", type=int, default=224, help="model input side")
    p.add_argument("--split", default="official", help="official | patient_random | seed_random")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")

    p = sub.add_parser("cost", help="time and money per flavor from run directories, and at k x the data")
    p.add_argument("--runs", nargs="+", required=True, help="run directories (each with summary.json)")
    p.add_argument(
        "--flavor",
        action="append",
        default=[],
        metavar="NAME=RUN_GLOB",
        help="price the runs whose path matches RUN_GLOB with flavor NAME (repeatable); "
        "other runs are grouped by their recorded hardware plan",
    )
    p.add_argument(
        "--flavors",
        default=None,
        help="flavor folder (default: the project's experiments/cost_study/flavors)",
    )
    p.add_argument("--scale", type=float, default=500.0, help="extrapolate to this many times the data")
    p.add_argument("--out", default="cost_report", help="folder for the markdown, CSVs and charts")

    p = sub.add_parser("plan", help="the resolved hardware plan of a training config (JSON)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py, e.g. hardware=vpod16")
    p.add_argument(
        "--config-dir", default=str(_CONFIG_DIR), help="Hydra config folder (default: the project's conf/)"
    )

    p = sub.add_parser(
        "predict",
        help="probabilities and flagged findings for X-ray files (PNG, JPEG, DICOM); "
        "an aid to be checked by a radiologist, not a diagnosis",
    )
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="the model/ folder of a training run")
    p.add_argument("--out", default=None, help="predictions file, .csv or .json (default: CSV on stdout)")
    p.add_argument("--grid", default=None, help="write an n x n PNG of the first images with their flags")
    p.add_argument("--grid-size", type=int, default=3, help="n of the grid (n x n images)")
    p.add_argument(
        "--labels", default=None, help="an NIH label file: the grid shows each image's real labels"
    )
    p.add_argument(
        "--heatmaps", default=None, help="folder for HiResCAM overlays, one per image and flagged finding"
    )
    p.add_argument("--finding", default=None, help="with --heatmaps: draw this finding for every image")
    _add_inference_arguments(p, batch_size=32, workers=2, workers_help="threads reading image files")

    p = sub.add_parser(
        "export",
        help="write a model/ bundle as ONNX, checked against PyTorch with ONNX Runtime (JSON report), "
        "or as a transformers ViTForImageClassification folder",
    )
    p.add_argument("--model", required=True, help="the model/ folder of a training run")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", help="ONNX file to write (nothing is written if the check fails)")
    target.add_argument(
        "--hf", help="transformers folder to write (needs the hf extra; nothing is kept if the check fails)"
    )
    p.add_argument(
        "--opset", type=int, default=None, help="--onnx only: ONNX opset (default: the exporter's)"
    )
    p.add_argument(
        "--check-inputs", type=int, default=None, help="--onnx only: sample inputs compared with PyTorch (4)"
    )

    p = sub.add_parser(
        "import-hf",
        help="a transformers ViTForImageClassification folder (e.g. the guide's) as a model bundle",
    )
    p.add_argument(
        "--from", dest="source", required=True, help="folder with config.json and model.safetensors (or .bin)"
    )
    p.add_argument("--out", required=True, help="the model/ folder to write, e.g. RUN/model")

    p = sub.add_parser(
        "sweep-report", help="ranking, configurations, charts and importances of a finished sweep folder"
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder (trials.csv / optuna.db)")
    p.add_argument("--out", default=None, help="report folder (default: SWEEP_DIR/report)")
    p.add_argument(
        "--allow-unfinished", action="store_true", help="report without the unfinished trials, listing them"
    )

    p = sub.add_parser(
        "evaluate", help="a model bundle on one part of a split: metrics with patient-bootstrap intervals"
    )
    p.add_argument("--model", required=True, help="the model/ folder of a training run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", default=None, help="cache folder written by `xraycls prepare`")
    source.add_argument("--root", default=None, help="dataset folder (PNGs decoded on the fly, slow)")
    p.add_argument("--split", default=None, help="official | patient_random | seed_random "
                   "(default: the split the model trained on, else official)")  # fmt: skip
    p.add_argument("--split-seed", type=int, default=None, help="default: the model's, for its own split")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    p.add_argument("--part", default="test", help="train | val | test")
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="patient resamples for the intervals (0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    _add_inference_arguments(p, batch_size=64, workers=0, workers_help="DataLoader worker processes")
    p.add_argument("--out", default="evaluation", help="output folder")

    p = sub.add_parser(
        "compare", help="runs or evaluate outputs side by side, paired tests on the same images"
    )
    p.add_argument("models", nargs="+", help="run directories or `evaluate` output folders (2 or more)")
    p.add_argument("--bootstrap", type=int, default=2000, help="patient resamples (intervals, paired test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    p.add_argument("--out", default="comparison", help="output folder")
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return args.verbose or os.environ.get("XRAYCLS_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors end in one line on stderr and exit 2 (bad input) or 1 (the work failed on
    the file system): see the module doc. XRAYCLS_DEBUG=1 or -v: the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if _debug(args):
            raise
        print(f"xraycls {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # after the checks: a disk filling up, a folder made read-only meanwhile
        if _debug(args):
            raise
        print(f"xraycls {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xraycls {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
