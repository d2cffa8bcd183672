"""An NIH-layout dataset folder over the genuine sample beside the project (``../shared/nih``).

That folder holds 100 original NIH images (``sample/``), ``sample_manifest.csv`` (their official split
and PIL mode), the complete label file (``Data_Entry_2017_v2020.csv.gz``) and the official split lists.
`link_shared_sample` builds what `xraycls prepare` reads from them, for tests and benchmarks on real files:
the images as symlinks (nothing copied), the label file cut to the sample's rows, and the two split lists.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd

__all__ = ["link_shared_sample"]


def link_shared_sample(shared: Path, root: Path) -> Path:
    """Writes the dataset folder `root` (images/, Data_Entry_2017_v2020.csv, train_val_list.txt,
    test_list.txt) over the sample in `shared`; returns `root`."""
    manifest = pd.read_csv(shared / "sample_manifest.csv")
    (root / "images").mkdir(parents=True)
    for name in manifest["Image Index"]:
        (root / "images" / name).symlink_to(shared / "sample" / name)
    wanted = set(manifest["Image Index"])
    with gzip.open(shared / "Data_Entry_2017_v2020.csv.gz", "rt") as handle:
        lines = handle.read().splitlines()
    rows = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in wanted]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    for split, list_name in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        chosen = manifest.loc[manifest["official_split"] == split, "Image Index"]
        (root / list_name).write_text("\n".join(chosen))
    return root
