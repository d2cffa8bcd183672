#!/usr/bin/env bash
# The cost study end to end: n repeats of one experiment on each hardware config (the sweep recipe
# conf/hparams_search/cost_study.yaml), then `xraycls cost`, which prices the runs with the flavors in
# experiments/cost_study/flavors/.
#
#   experiments/cost_study/run_study.sh [extra train.py overrides...]
#
# Settings (environment variables, defaults in brackets):
#   EXPERIMENT [demo]      conf/experiment/<name>.yaml, the same for every hardware
#   HARDWARE   [cpu]       comma-separated conf/hardware names, e.g. cpu,gpu
#   SEEDS      [1,2,3]     one repeat per seed (n = number of seeds)
#   SCALE      [500]       extrapolate to SCALE x the data
#   STUDY_DIR  [runs/cost_study/<experiment>]  sweep folder: <hardware>/seed_<seed>/ and report/
#   FLAVORS    []          space-separated NAME=RUN_GLOB for `xraycls cost --flavor`, e.g.
#                          "gpu_1xh100=*/gpu/*"; runs left out are priced by their recorded hardware plan
# Run it from the project root with the virtual environment active (or PYTHON=.venv/bin/python).
set -euo pipefail

EXPERIMENT=${EXPERIMENT:-demo}
HARDWARE=${HARDWARE:-cpu}
SEEDS=${SEEDS:-1,2,3}
SCALE=${SCALE:-500}
STUDY_DIR=${STUDY_DIR:-runs/cost_study/$EXPERIMENT}
PYTHON=${PYTHON:-python}

"$PYTHON" train.py -m hparams_search=cost_study \
  "experiment=$EXPERIMENT" "hardware=$HARDWARE" "seed=$SEEDS" "hydra.sweep.dir=$STUDY_DIR" "$@"

flavor_args=()
for item in ${FLAVORS:-}; do
  flavor_args+=(--flavor "$item")
done
"$PYTHON" -m xraycls.cli cost --runs "$STUDY_DIR"/*/seed_* --scale "$SCALE" --out "$STUDY_DIR/report" \
  ${flavor_args[@]+"${flavor_args[@]}"}
