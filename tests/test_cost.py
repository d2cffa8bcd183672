"""`xraycls cost`: arithmetic on fixed summaries against hand-computed answers (the fixed vs per-image
extrapolation included), aggregation of repeats, flavor matching, every bad input, the report files; the
preparation seconds read from real download (local HTTP server) and prepare reports, and one real run."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from _http_server import FileServer
from _project import PROJECT_ROOT
from PIL import Image

from xraycls.cli import main
from xraycls.data.cache import prepare_cache
from xraycls.data.download import download_nih
from xraycls.report.cost import describe, group_runs, load_run
from xraycls.report.cost.flavor import load_flavor, load_flavors
from xraycls.report.cost.report import write_cost_report
from xraycls.training.preparation import preparation_timing

FLAVORS = PROJECT_ROOT / "experiments" / "cost_study" / "flavors"  # the project's flavor files

# A run of 2 epochs over 1,000 training images (125 steps of 8) at 50 images/s, 100 val and 100 test
# images at 100 images/s, validated after each epoch and once more for the best checkpoint (6 + 6 + 3 =
# 15 s of validation).
# Per-image work = 2 x 1000 / 50 + (3 x 100 + 100) / 100 = 40 + 4 = 44 s; fixed = 100 - 44 = 56 s;
# preparation = 20 s (the cache), total = 120 s.
BASE = {
    "task_name": "demo",
    "resumed_from": None,
    "timing": {
        "total": 100.0, "setup": 10.0, "compile": 5.0, "train": 60.0, "validate": 15.0, "test": 5.0,
        "download": None, "extraction": None, "prepare": 20.0,
        "epochs": [{"epoch": 0, "train": 30.0, "validate": 6.0},
                   {"epoch": 1, "train": 30.0, "validate": 6.0}],
    },
    "throughput": {"train_images_per_s": 50.0, "eval_images_per_s": 100.0},
    "hardware": {"name": "cpu", "accelerator": "cpu", "devices": 1, "nodes": 1, "replicas": 1, "ipus": None,
                 "micro_batch": 8, "accumulation": 1, "global_batch": 8, "precision": "32-true"},
    "data": {"split": "official", "source": "cache", "image_size": 64, "input_size": 64, "global_batch": 16,
             "images": {"train": 1000, "val": 100, "test": 100}},
    "versions": {"devices": []},
    "preparation": {"prepare_in_run": False},
}  # fmt: skip
FLAVOR = """\
hardware: {hardware}
plan: {plan}
price_per_hour: {price}
currency: USD
source: placeholder for a test
as_of: null
placeholder: true
"""


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def write_run(path: Path, **changes: object) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(merge(BASE, changes)))
    return path


def write_flavor(folder: Path, name: str, *, hardware: str = "cpu", plan: str = "{accelerator: cpu}",
                 price: object = 3.6, extra: str = "") -> Path:  # fmt: skip
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(FLAVOR.format(hardware=hardware, plan=plan, price=price) + extra)
    return path


@pytest.fixture
def three_repeats(tmp_path: Path) -> list[Path]:
    """Three repeats whose training took 100, 110 and 90 s (mean 100, sample std 10)."""
    return [write_run(tmp_path / "runs" / f"r{i}", timing={"total": t}) for i, t in enumerate((100, 110, 90))]


# ------------------------------------------------------------------------------------------ arithmetic
def test_one_run_against_hand_computed_seconds_and_money(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "run"))
    assert run.per_image == pytest.approx(44.0)
    assert run.fixed == pytest.approx(56.0)
    assert (run.preparation, run.training, run.total) == (20.0, 100.0, 120.0)
    scaled = run.scaled(10)
    # Ours: preparation 10 x 20 = 200, training 56 + 10 x 44 = 496; naive: 10 x 120 = 1,200.
    assert scaled == pytest.approx(
        {"preparation": 200.0, "training": 496.0, "total": 696.0, "naive": 1200.0, "difference": 504.0}
    )
    flavor = load_flavor(write_flavor(tmp_path / "flavors", "cpu_vm", price=3.6))
    assert flavor.money(run.total) == pytest.approx(0.12)  # 120 s at 3.6 per hour
    assert flavor.money(scaled["total"]) == pytest.approx(0.696)


@pytest.mark.parametrize(
    ("changes", "per_image"),
    [
        # No re-validation (validate == sum over epochs): 2 x 100 val + 100 test at 100/s = 3 s.
        ({"timing": {"validate": 12.0}}, 40.0 + 3.0),
        # No test run: 3 x 100 val = 3 s.
        ({"timing": {"test": None}}, 40.0 + 3.0),
        # Two replicas measured 100 train images/s: 2 x 1000 / 100 = 20 s.
        ({"throughput": {"train_images_per_s": 100.0}}, 20.0 + 4.0),
        # The loader drops the last partial step of 8 images: 1,010 train images -> 1,008 trained per epoch.
        ({"data": {"images": {"train": 1010}}}, 2 * 1008 / 50 + 4.0),
        # An IPU plan hands 128 images per host call: 1,000 -> 7 x 128 = 896 trained per epoch.
        ({"hardware": {"samples_per_host_step": 128}}, 2 * 896 / 50 + 4.0),
        # No eval throughput (too few batches): the measured 15 + 5 s of evaluation count as per-image work.
        ({"throughput": {"eval_images_per_s": None}}, 40.0 + 20.0),
    ],
)
def test_per_image_work_counts_each_evaluation(tmp_path: Path, changes: dict, per_image: float) -> None:
    run = load_run(write_run(tmp_path / "run", **changes))
    assert run.per_image == pytest.approx(per_image)
    assert run.fixed == pytest.approx(100.0 - per_image)


def test_preparation_adds_download_and_cache_and_moves_an_in_run_cache_build(tmp_path: Path) -> None:
    download = load_run(write_run(tmp_path / "a", timing={"download": 30.0, "extraction": 10.0}))
    assert download.preparation == 50.0  # extraction happens inside the download's wall time: not added
    built = load_run(write_run(tmp_path / "b", preparation={"prepare_in_run": True}))
    assert (built.preparation, built.training) == (20.0, 80.0)  # the run's own 100 s held the 20 s build
    assert any("built the cache" in note for note in built.notes)


def test_repeats_aggregate_to_mean_sample_std_and_n(tmp_path: Path, three_repeats: list[Path]) -> None:
    flavors = {"cpu_vm": load_flavor(write_flavor(tmp_path / "flavors", "cpu_vm", price=36.0))}
    (group,) = group_runs([load_run(path) for path in three_repeats], flavors)
    assert group.flavor is flavors["cpu_vm"] and group.label == "cpu_vm"
    training = group.stat("training")
    assert (training.mean, training.std, training.n) == (pytest.approx(100.0), pytest.approx(10.0), 3)
    # 36 per hour = 0.01 per second: 120 s -> 1.2, std 0.1.
    money = group.stat("total", money=True)
    assert (money.mean, money.std) == (pytest.approx(1.2), pytest.approx(0.1))
    # At 10x: fixed parts 56, 66, 46 kept; per-image 440 and preparation 200 each -> 696, 706, 686.
    scaled = group.scaled_stat("total", 10)
    assert (scaled.mean, scaled.std) == (pytest.approx(696.0), pytest.approx(10.0))
    assert group.scaled_stat("naive", 10).std == pytest.approx(100.0)


def test_describe_leaves_out_missing_values_and_has_no_std_for_one_value() -> None:
    assert describe([None, 4.0]) == describe([4.0])
    assert (describe([4.0]).mean, describe([4.0]).std, describe([4.0]).n) == (4.0, None, 1)
    assert describe([None]).n == 0 and describe([]).mean is None
    assert describe([1.0, 2.0, 3.0, 4.0]).std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))


# -------------------------------------------------------------------------------------------- flavors
def test_runs_are_priced_by_the_one_flavor_whose_plan_fits(tmp_path: Path) -> None:
    folder = tmp_path / "flavors"
    write_flavor(folder, "cpu_vm")
    write_flavor(
        folder, "h100", hardware="gpu", plan="{accelerator: gpu, devices: 1}", extra="device_match: H100\n"
    )
    write_flavor(
        folder, "h200", hardware="gpu", plan="{accelerator: gpu, devices: 1}", extra="device_match: H200\n"
    )
    write_flavor(folder, "vpod16", hardware="vpod16", plan="{accelerator: ipu, ipus: 16}")
    gpu = {"name": "gpu", "accelerator": "gpu"}
    runs = [
        write_run(tmp_path / "cpu"),
        write_run(tmp_path / "h100", hardware=gpu, versions={"devices": ["NVIDIA H100 80GB HBM3"]}),
        write_run(tmp_path / "gpu_unnamed", hardware={**gpu, "precision": "bf16-mixed"}),
        write_run(
            tmp_path / "ipu", hardware={"name": "vpod16", "accelerator": "ipu", "devices": 4, "ipus": 16}
        ),
    ]
    groups = {g.label: g for g in group_runs([load_run(run) for run in runs], load_flavors(folder))}
    assert set(groups) == {"cpu_vm", "h100", "vpod16", "gpu: gpu x1"}
    unpriced = groups["gpu: gpu x1"]
    assert unpriced.flavor is None and unpriced.stat("total", money=True).mean is None
    assert "time only: no flavor's plan fits" in unpriced.notes[0]  # no device name: neither H100 nor H200


def test_flavor_globs_assign_runs(tmp_path: Path, three_repeats: list[Path]) -> None:
    folder = tmp_path / "flavors"
    write_flavor(folder, "vm_a", price=1.0)
    write_flavor(folder, "vm_b", price=2.0)
    runs = [load_run(path) for path in three_repeats]
    groups = group_runs(runs, load_flavors(folder), {"vm_b": "*/runs/r*"})
    assert [(g.label, len(g.runs)) for g in groups] == [("vm_b", 3)]
    assert group_runs(runs, load_flavors(folder))[0].flavor is None  # both fit: time only
    with pytest.raises(ValueError, match="matches none of the 3 runs"):
        group_runs(runs, load_flavors(folder), {"vm_a": "*/elsewhere/*"})
    with pytest.raises(ValueError, match="matches both --flavor vm_a and vm_b"):
        group_runs(runs, load_flavors(folder), {"vm_a": "*/r0", "vm_b": "*/r*"})
    with pytest.raises(ValueError, match="no flavor 'vm_c'"):
        group_runs(runs, load_flavors(folder), {"vm_c": "*"})


def test_committed_flavors_load_and_all_say_their_price_is_a_placeholder() -> None:
    flavors = load_flavors(FLAVORS)
    assert {"cpu_vm", "gpu_1xh100", "gpu_1xh200", "gpu_8xh100", "vpod4_cpu60_vm", "vpod4_bare_metal",
            "vpod16_bare_metal"} <= set(flavors)  # fmt: skip
    for flavor in flavors.values():
        assert flavor.placeholder and "placeholder" in flavor.source.lower(), flavor.name
        assert (PROJECT_ROOT / "conf" / "hardware" / f"{flavor.hardware}.yaml").is_file(), flavor.name
    demo_cpu = {"name": "cpu", "accelerator": "cpu", "devices": 1, "nodes": 1}
    assert [f.name for f in flavors.values() if f.matches(demo_cpu)] == ["cpu_vm"]
    h200 = {"name": "gpu", "accelerator": "gpu", "devices": 1, "nodes": 1}
    assert [f.name for f in flavors.values() if f.matches(h200, ["NVIDIA H200"])] == ["gpu_1xh200"]


# ------------------------------------------------------------------------------------------ bad input
def test_a_run_directory_without_summary_is_named(tmp_path: Path) -> None:
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match=r"unfinished: no summary\.json"):
        load_run(tmp_path / "unfinished")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timing": {"total": None}}, r"timing\.total is missing"),
        ({"throughput": {"train_images_per_s": None}}, r"throughput\.train_images_per_s is missing"),
        ({"resumed_from": "/runs/x/checkpoints/last.ckpt"}, "resumed from"),
        ({"throughput": {"train_images_per_s": 0}}, "not a measured rate"),
    ],
)
def test_an_incomplete_summary_is_named(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_run(write_run(tmp_path / "run", **changes))


@pytest.mark.parametrize(
    ("price", "extra", "message"),
    [
        ("null", "", "price_per_hour must be a number"),
        ("'cheap'", "", "price_per_hour must be a number"),
        ("-1", "", "price_per_hour must be a number"),
        (1.0, "plan: {accelerator: cpu, cores: 4}\n", "unknown keys"),
    ],
)
def test_a_flavor_without_a_usable_price_is_named(
    tmp_path: Path, price: object, extra: str, message: str
) -> None:
    path = write_flavor(tmp_path, "vm", price=price, extra=extra)
    with pytest.raises(ValueError, match=message) as error:
        load_flavors(tmp_path)
    assert str(path) in str(error.value)
    path.write_text("hardware: cpu\nplan: {accelerator: cpu}\ncurrency: USD\nsource: x\nplaceholder: true\n")
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: price_per_hour must be a number .* got None"
    ):
        load_flavor(path)
    path.write_text(
        FLAVOR.format(hardware="cpu", plan="{accelerator: cpu}", price=1).replace("true", "false")
    )
    with pytest.raises(ValueError, match="needs as_of"):
        load_flavor(path)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"timing": {"epochs": [{"epoch": 0, "train": 30.0, "validate": 6.0}]}}, "epochs: 2 vs 1"),
        ({"data": {"images": {"train": 500}}}, "images"),
        ({"data": {"split": "seed_random"}}, "split"),
    ],
)
def test_mixed_experiments_under_one_flavor_build_no_table(tmp_path: Path, changes: dict, field: str) -> None:
    runs = [write_run(tmp_path / "runs" / "a"), write_run(tmp_path / "runs" / "b", **changes)]
    write_flavor(tmp_path / "flavors", "cpu_vm")
    with pytest.raises(ValueError, match=f"mixed experiments under cpu: cpu x1: .*{field}"):
        group_runs([load_run(run) for run in runs], {})
    out = tmp_path / "report"
    argv = ["cost", "--runs", *map(str, runs), "--flavors", str(tmp_path / "flavors"), "--out", str(out)]
    argv += ["--flavor", "cpu_vm=*/runs/*"]
    assert main(argv) == 2
    assert not out.exists()


def test_runs_of_different_models_are_not_repeats(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "a"), write_run(tmp_path / "b")]
    for run, backbone in zip(runs, ("test_vit", "vit_base_patch16_224.orig_in21k"), strict=True):
        (run / "config.yaml").write_text(f"model:\n  backbone: {backbone}\n")
    with pytest.raises(ValueError, match="backbone: 'test_vit' vs 'vit_base_patch16_224.orig_in21k'"):
        group_runs([load_run(run) for run in runs], {})
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a run summary"):
        load_run(tmp_path / "list")


def test_cli_names_a_bad_flavor_argument_and_a_missing_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = write_run(tmp_path / "run")
    assert main(["cost", "--runs", str(run), "--flavor", "cpu_vm", "--out", str(tmp_path / "o")]) == 2
    assert "expected NAME=RUN_GLOB" in capsys.readouterr().err
    assert main(["cost", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope: no summary.json" in err


# --------------------------------------------------------------------------------------------- report
def test_report_files_hold_the_expected_rows(
    tmp_path: Path, three_repeats: list[Path], capsys: pytest.CaptureFixture
) -> None:
    write_flavor(tmp_path / "flavors", "cpu_vm", price=36.0)
    out = tmp_path / "report"
    argv = ["cost", "--runs", *map(str, three_repeats), "--flavors", str(tmp_path / "flavors")]
    assert main([*argv, "--scale", "10", "--out", str(out)]) == 0
    assert "cpu_vm" in capsys.readouterr().out
    markdown = (out / "cost_report.md").read_text()
    assert "**PLACEHOLDER PRICES**" in markdown and "cpu_vm" in markdown
    assert "| cpu_vm | 3 | 20.0 s ± 0.0 s | 100.0 s ± 10.0 s | 120.0 s ± 10.0 s |" in markdown
    assert "1.2 ± 0.1 USD*" in markdown  # total cost, placeholder-marked
    assert "| cpu_vm | 11.6 min ± 10.0 s | 20.0 min ± 100.0 s | 504.0 s ± 90.0 s |" in markdown
    assert "1,038 s train_runtime (published)" in markdown and "NOT measured here" in markdown
    with open(out / "cost_groups.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["flavor"], row["n"], row["currency"], row["price_placeholder"]) == (
        "cpu_vm",
        "3",
        "USD",
        "True",
    )
    assert float(row["total_s_mean"]) == pytest.approx(120.0) and float(row["total_s_std"]) == pytest.approx(
        10.0
    )
    assert float(row["scaled_total_s_mean"]) == pytest.approx(696.0)
    assert float(row["scaled_naive_cost_mean"]) == pytest.approx(12.0)  # 1,200 s at 0.01 per second
    with open(out / "cost_runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert sorted(float(r["training_s"]) for r in runs) == [90.0, 100.0, 110.0]
    with open(out / "published.csv") as handle:
        assert all(r["measured"] == "False" for r in csv.DictReader(handle))
    for chart in ("time_per_flavor.png", "cost_per_flavor.png"):
        with Image.open(out / chart) as image:
            assert image.format == "PNG" and image.width > 500, chart


def test_unpriced_runs_get_a_time_report_without_a_cost_chart(
    tmp_path: Path, three_repeats: list[Path]
) -> None:
    groups = group_runs([load_run(path) for path in three_repeats], {})
    written = write_cost_report(groups, tmp_path / "out", scale=500)
    assert "cost_chart" not in written and (tmp_path / "out" / "time_per_flavor.png").stat().st_size > 0
    assert "| cpu: cpu x1 | 3 |" in written["markdown"].read_text()
    assert "PLACEHOLDER" not in written["markdown"].read_text()
    with pytest.raises(ValueError, match="scale must be a number > 0"):
        write_cost_report(groups, tmp_path / "out", scale=0)


# -------------------------------------------------------------------------------- preparation reports
def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_download_and_prepare_reports_give_the_preparation_seconds(tmp_path: Path) -> None:
    pngs = {}
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(buffer, format="PNG")
        pngs[f"images/00000001_00{i}.png"] = buffer.getvalue()
    root = tmp_path / "nih"
    with FileServer() as server:
        server.files = {
            "images_001.tar.gz": _tar_gz(pngs),
            "Data_Entry_2017_v2020.csv": b"Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
            b"Patient Gender,View Position\n00000001_000.png,No Finding,0,1,50,M,PA\n"
            b"00000001_001.png,Effusion,1,1,50,M,PA\n",
            "train_val_list.txt": b"00000001_000.png\n",
            "test_list.txt": b"00000001_001.png\n",
        }
        sources = tmp_path / "sources.tsv"
        rows = ["name\tkind\turl\tmd5\tsize_bytes"]
        for name, data in server.files.items():
            kind = "archive" if name.endswith(".gz") else "labels" if name.endswith(".csv") else "split_list"
            rows.append(f"{name}\t{kind}\t{server.url(name)}\t{hashlib.md5(data).hexdigest()}\t{len(data)}")
        sources.write_text("\n".join(rows) + "\n")
        first = download_nih(root, sources=sources, progress=False)
        second = download_nih(root, sources=sources, progress=False)  # nothing left to do: still timed
    assert first.ok() and second.ok()
    report = json.loads((root / "download_report.json").read_text())
    assert [run["seconds"] for run in report["runs"]] == [round(first.seconds, 3), round(second.seconds, 3)]
    assert report["seconds"] == pytest.approx(first.seconds + second.seconds, abs=2e-3)
    marker = json.loads((root / "archives" / "images_001.tar.gz.done").read_text())
    assert report["extract_seconds"] == marker["extract_seconds"] and report["archives_timed"] == 1

    before = time.time()
    prepared = prepare_cache(root, tmp_path / "cache", size=16, workers=1, progress=False)
    timing, provenance = preparation_timing(root, tmp_path / "cache", 16, run_started_at=before)
    assert timing == {"download": report["seconds"], "extraction": marker["extract_seconds"],
                      "prepare": prepared["seconds"]}  # fmt: skip
    assert provenance["prepare_in_run"] is True
    _, later = preparation_timing(root, tmp_path / "cache", 16, run_started_at=time.time() + 1)
    assert later["prepare_in_run"] is False
    # Another cache size, the PNG source, or no folders: nothing is claimed.
    assert preparation_timing(root, tmp_path / "cache", 32)[0]["prepare"] is None
    assert preparation_timing(None, tmp_path / "cache", 16, source="png")[0]["prepare"] is None
    assert preparation_timing(None, None, None)[0] == {"download": None, "extraction": None, "prepare": None}


# -------------------------------------------------------------------------------------- one real run
@pytest.mark.slow
def test_a_real_run_summary_prices_and_extrapolates(demo_run: tuple[Path, dict, float]) -> None:
    """The suite's shared demo run (conftest): its summary carries the cache's prepare seconds and whether
    the run built the cache itself, and `xraycls cost` reads it; 1x from the report is the run's own time."""
    run_dir, summary, _seconds = demo_run
    timing = summary["timing"]
    assert timing["prepare"] > 0 and timing["download"] is None  # synthetic data: nothing was downloaded
    run = load_run(run_dir)
    built = summary["preparation"]["prepare_in_run"]  # True when no earlier test had built the cache
    assert run.training == pytest.approx(timing["total"] - (timing["prepare"] if built else 0.0))
    assert run.preparation == timing["prepare"]
    # Throughputs measured on a shared CPU are noisy: per-image work may even exceed the run's time, and the
    # report then says so rather than hiding it.
    assert run.per_image > 0 and run.fixed == pytest.approx(run.training - run.per_image)
    assert any("exceeds the measured training" in note for note in run.notes) == (
        run.per_image > run.training
    )
    (group,) = group_runs([run], load_flavors(FLAVORS))
    assert group.flavor is not None and group.flavor.name == "cpu_vm"
    assert group.scaled_stat("total", 1.0).mean == pytest.approx(run.total)


def test_the_committed_worked_example_matches_the_code(tmp_path: Path) -> None:
    """experiments/cost_study/example_cpu_demo: its five summaries still load, price as cpu_vm, and give the
    committed report's group numbers, with a training CV under the 20% warning (idle cores)."""
    example = PROJECT_ROOT / "experiments" / "cost_study" / "example_cpu_demo"
    runs = [load_run(path) for path in sorted((example / "runs" / "cpu").glob("seed_*"))]
    (group,) = group_runs(runs, load_flavors(FLAVORS))
    assert group.label == "cpu_vm" and len(group.runs) == 5
    assert group.training_cv < 0.20
    with open(example / "report" / "cost_groups.csv") as handle:
        (committed,) = list(csv.DictReader(handle))
    for name, stat in (("training_s", group.stat("training")), ("fixed_s", group.stat("fixed")),
                       ("scaled_total_s", group.scaled_stat("total", 500)),
                       ("total_cost", group.stat("total", money=True))):  # fmt: skip
        assert float(committed[f"{name}_mean"]) == pytest.approx(stat.mean), name
        assert float(committed[f"{name}_std"]) == pytest.approx(stat.std), name


# ------------------------------------------------------------------ refusals, warnings and variation
def test_a_summary_without_hardware_and_a_non_finite_scale_are_refused(
    tmp_path: Path, three_repeats: list[Path], capsys: pytest.CaptureFixture
) -> None:
    bare = write_run(tmp_path / "bare", hardware=None)
    with pytest.raises(ValueError, match=r"bare/summary.json: hardware \(the resolved plan.*\) is missing"):
        load_run(bare)
    runs = ["cost", "--runs", *map(str, three_repeats), "--out", str(tmp_path / "o")]
    for scale in ("inf", "nan", "-1"):
        assert main([*runs, "--scale", scale]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "scale must be a number > 0 and finite" in err
    assert not (tmp_path / "o" / "cost_report.md").exists()


def test_a_flavor_that_does_not_fit_the_recorded_hardware_is_warned_in_the_report(
    tmp_path: Path, three_repeats: list[Path]
) -> None:
    """`--flavor gpu_1xh200=*` on CPU runs prices CPU seconds at the GPU rate: the report says so at the top;
    a fitting flavor gets no warning."""
    flavors = tmp_path / "flavors"
    write_flavor(flavors, "gpu_1xh200", hardware="gpu", plan="{accelerator: gpu, devices: 1}", price=5.0)
    write_flavor(flavors, "cpu_vm")
    runs = [load_run(path) for path in three_repeats]
    for name, fits in (("gpu_1xh200", False), ("cpu_vm", True)):
        (group,) = group_runs(runs, load_flavors(flavors), {name: "*"})
        markdown = write_cost_report([group], tmp_path / name)["markdown"].read_text()
        assert ("**FLAVOR DOES NOT FIT THE RUNS**" in markdown) is not fits, name
        with open(tmp_path / name / "cost_groups.csv") as handle:
            (row,) = list(csv.DictReader(handle))
        assert (row["warnings"] == "") is fits
    assert group.warnings == []
    (group,) = group_runs(runs, load_flavors(flavors), {"gpu_1xh200": "*"})
    (warning,) = group.warnings
    assert (
        "'accelerator': 'cpu', 'devices': 1" in warning and "{'accelerator': 'gpu', 'devices': 1}" in warning
    )


def test_each_group_reports_its_coefficient_of_variation_and_warns_above_20_percent(
    tmp_path: Path, three_repeats: list[Path]
) -> None:
    quiet = group_runs([load_run(path) for path in three_repeats], {})  # 100, 110, 90 s: CV 10%
    noisy_runs = [
        write_run(tmp_path / "noisy" / f"r{i}", timing={"total": t}) for i, t in enumerate((60, 100, 140))
    ]
    noisy = group_runs([load_run(path) for path in noisy_runs], {})  # sample std 40 over mean 100: CV 40%
    assert quiet[0].training_cv == pytest.approx(0.10) and noisy[0].training_cv == pytest.approx(0.40)
    for name, groups, cv, warned in (("quiet", quiet, "10.0%", False), ("noisy", noisy, "40.0%", True)):
        markdown = write_cost_report(groups, tmp_path / name)["markdown"].read_text()
        assert "| training CV |" in markdown
        (row,) = [line for line in markdown.splitlines() if line.startswith("| cpu: cpu x1 | 3 |")]
        assert row.endswith(f" | {cv} |")
        assert ("**NOISY TIMINGS**" in markdown) is warned, name
        if warned:
            assert (
                "vary by 40.0%" in markdown
                and "the machine was not quiet; these means are not comparable" in markdown
            )
        with open(tmp_path / name / "cost_groups.csv") as handle:
            (csv_row,) = list(csv.DictReader(handle))
        assert float(csv_row["training_cv"]) == pytest.approx(float(cv[:-1]) / 100)
    (single,) = group_runs([load_run(three_repeats[0])], {})
    assert single.training_cv is None


def test_repeats_whose_auto_threads_differ_stay_one_group(tmp_path: Path) -> None:
    """cpu_threads=auto picks by the load each run met: repeats of one plan; each run keeps its count."""
    runs = []
    for i, threads in enumerate((1, 2, 2)):
        path = write_run(tmp_path / "runs" / f"r{i}", timing={"total": 100.0 + i})
        summary = json.loads((path / "summary.json").read_text())
        summary["hardware"].update(cpu_threads=threads, cpu_threads_source="auto")
        (path / "summary.json").write_text(json.dumps(summary))
        runs.append(load_run(path))
    (group,) = group_runs(runs, {})
    assert group.stat("training").n == 3
    assert [run.hardware["cpu_threads"] for run in group.runs] == [1, 2, 2]
