"""The cost study: what runs cost per rented machine (flavor) and at k x the data (`xraycls cost`).

`runs` reads run directories (summary.json timings) and groups repeats by flavor, `flavor` reads the price
files (experiments/cost_study/flavors/), `report` writes the markdown, CSVs and `charts`, beside the
guide's `published` figures. The run side (summary.json, preparation seconds) is `xraycls.training`'s.
"""

from xraycls.report.cost.flavor import Flavor, load_flavor, load_flavors, parse_flavor_assignments
from xraycls.report.cost.report import write_cost_report
from xraycls.report.cost.runs import CostGroup, RunCost, describe, group_runs, load_run

__all__ = [
    "Flavor",
    "load_flavor",
    "load_flavors",
    "parse_flavor_assignments",
    "write_cost_report",
    "CostGroup",
    "RunCost",
    "describe",
    "group_runs",
    "load_run",
]
