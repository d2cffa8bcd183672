#!/usr/bin/env bash
# The GPU check in one command, offline, on one NVIDIA GPU (about 6-8 minutes; estimate, not yet measured):
# installs xraycls with --no-deps against the torch already here, names any missing module in one line,
# then measures (experiments/benchmarks/gpu_check.py) and writes experiments/results/gpu_<card>_<date>.md.
#
#   experiments/benchmarks/gpu_check.sh              # the real check; refuses (exit 2) without CUDA
#   experiments/benchmarks/gpu_check.sh --dry-run    # every step on the CPU, tiny; result in $TMPDIR, DRY RUN
#   DRY_RUN=1 experiments/benchmarks/gpu_check.sh    # the same
#
# PYTHON picks the interpreter (default python3); GPU_CHECK_OUT the result file. The package goes to a
# scratch folder (pip --target), so the Python environment here is left as it was.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
DRY="${DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu_check: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done

# 1. The modules the check needs, before anything is installed or written (xraycls comes with step 3).
"$PYTHON" "$ROOT/experiments/benchmarks/gpu_check.py" modules

# 2. CUDA, or a one-line refusal.
if [ "$DRY" != "1" ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)'; then
  echo "gpu_check: torch sees no CUDA device here; nothing measured, nothing written (--dry-run tests the steps on the CPU)" >&2
  exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/xraycls-gpu-check-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 3. The package, no dependencies, no index: against this machine's torch, lightning, timm, ... Built from a
# copy of the sources, so the build leaves nothing in the checkout.
mkdir -p "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/xraycls" "$ROOT/hydra_plugins" "$WORK/src/"
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index --target "$WORK/site" "$WORK/src"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$WORK/site/bin:$PATH"
# From the scratch folder: `python -c` puts the current folder first on sys.path.
(cd "$WORK" && "$PYTHON" -c "import sys, xraycls; sys.exit(not xraycls.__file__.startswith('$WORK/site/'))") \
  || { echo "gpu_check: python imports another xraycls than the one just installed" >&2; exit 3; }

# 4. Every step, then the one result file.
ARGS=(run --workdir "$WORK/steps")
[ "$DRY" = "1" ] && ARGS+=(--dry-run)
[ -n "${GPU_CHECK_OUT:-}" ] && ARGS+=(--out "$GPU_CHECK_OUT")
mkdir -p "$WORK/steps"
"$PYTHON" "$ROOT/experiments/benchmarks/gpu_check.py" "${ARGS[@]}"
