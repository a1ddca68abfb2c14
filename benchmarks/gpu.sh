#!/usr/bin/env bash
# The prepared single-GPU check (issue 20): the fused loss against the lm_head matmul bound
# and Liger-Kernel's fused JSD, and the on-policy step against TRL's GKDTrainer and
# DistillationTrainer, as one table (benchmarks/gpu_table.py says what each row measures and
# the targets). Under 8 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu.sh                      # a CUDA machine with torch installed
#   bash benchmarks/gpu.sh --wheelhouse DIR     # offline: pip installs from DIR only
#   bash benchmarks/gpu.sh --dry                # any machine: the setup and every row's code
#                                               # on CPU at toy shapes (what the tests run)
#
# The benchmark's own environment, benchmarks/.gpu-venv, sees the machine's CUDA torch
# (--system-site-packages) and gets distill plus the benchmark-only peers, liger-kernel and
# trl; they never enter distill's dependencies. --dry uses the current python as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
pip_from=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry=1 ;;
    --wheelhouse) pip_from=(--no-index --find-links "$2"); shift ;;
    *) echo "gpu.sh: unknown argument $1 (use --dry or --wheelhouse DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$dry" = 1 ]; then
  exec python benchmarks/gpu_table.py --dry --work "${TMPDIR:-/tmp}/distill-gpu-dry"
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "gpu.sh: this python has no CUDA torch (torch.cuda.is_available() is not True)" >&2; exit 1; }
if [ ! -x benchmarks/.gpu-venv/bin/python ]; then
  python3 -m venv --system-site-packages benchmarks/.gpu-venv
fi
. benchmarks/.gpu-venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "${pip_from[@]}" -e . liger-kernel trl
exec timeout 470 python benchmarks/gpu_table.py --trl-python "$(command -v python)" --work benchmarks/.gpu-work
