"""Published time and money figures of the guide we reproduce: shown as published, never as measured.

Sources: Graphcore's ViT NIH ChestX-ray14 tutorial (optimum-graphcore, SDK 3.0/3.1, 4 IPUs, one replica)
and the Gcore guide that repeated it on IPU vPOD4/vPOD16 flavors (each measurement averaged over 10 runs).
They ran ViT-B/16 on the NIH release, so they compare with our measured rows only for that workload.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PublishedFigure", "PUBLISHED", "PUBLISHED_ROWS"]


@dataclass(frozen=True)
class PublishedFigure:
    source: str  # who published it
    hardware: str  # what it ran on, as the source says
    figure: str  # what was measured
    value: str  # as published, units included


_GRAPHCORE = "Graphcore ViT NIH tutorial (optimum-graphcore)"
_GCORE = "Gcore IPU guide"
# The figures we know from the guide and the tutorial it follows: shown as published, never as measured.
PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure(_GRAPHCORE, "4 IPUs, one replica, SDK 3.0/3.1", "train_runtime, 3 epochs", "1,038 s"),
    PublishedFigure(_GRAPHCORE, "4 IPUs, one replica, SDK 3.0/3.1", "training throughput", "307.7 samples/s"),
    PublishedFigure(
        _GRAPHCORE, "4 IPUs, one replica, SDK 3.0/3.1", "eval AUC / eval loss", "0.7916 / 0.1785"
    ),
    PublishedFigure(
        _GCORE,
        "vPOD4 + Poplar server on a CPU60 VM; vPOD4 + bare-metal Poplar server; vPOD16 + bare-metal",
        "training time, mean of 10 runs",
        "6 to 15 min depending on the flavor",
    ),
    PublishedFigure(_GCORE, "vPOD16 vs vPOD4", "training speed", "vPOD16 about 2x faster than vPOD4"),
    PublishedFigure(_GCORE, "all flavors", "time in all, download included", "about 2 h"),
    PublishedFigure(_GCORE, "the smallest flavor", "money spent", "$17"),
    PublishedFigure(_GCORE, "-", "eval AUC / eval loss", "0.7681 / 0.1875"),
    PublishedFigure(_GCORE, "all flavors", "price per flavor", "not available to us"),
)


# Rows of the 1x table (flavor, n, preparation, training, total, and the three costs) from PUBLISHED.
PUBLISHED_ROWS: tuple[tuple[str, ...], ...] = (
    ("4 IPUs, Graphcore tutorial (PUBLISHED)", "-", "-", "1,038 s train_runtime (published)", "-", "-", "-",
     "-"),
    ("IPU vPOD4 / vPOD16 flavors, Gcore guide (PUBLISHED)", "10 each", "-",
     "6 to 15 min by flavor (published)", "about 2 h with the download (published)", "-", "-",
     "$17 on the smallest flavor (published)"),
)  # fmt: skip
