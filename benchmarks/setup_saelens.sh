#!/usr/bin/env bash
# Creates the virtual environment that benchmarks/peers.py runs SAELens in, kept apart from
# saejax's own (torch and sae-lens are never dependencies of saejax).
#
#   bash benchmarks/setup_saelens.sh [VENV]      # default: benchmarks/.venv-saelens
#
# torch is installed first and pinned with a constraints file, so that sae-lens' dependencies
# cannot replace it with another release (an unpinned torch pulls gigabytes of CUDA packages).
# Set TORCH_VERSION or SAE_LENS_SPEC to change what is installed, and TORCH_PIP_ARGS to point
# pip at a CPU build where no local wheel is found (e.g. "--index-url <PyTorch's CPU index>").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-saelens}"
torch_version="${TORCH_VERSION:-2.13.0}"
sae_lens_spec="${SAE_LENS_SPEC:-sae-lens}"
sae_bench_spec="${SAE_BENCH_SPEC:-sae-bench==0.6.0}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
constraints="$venv/torch-constraints.txt"
echo "torch==$torch_version" > "$constraints"

"$venv/bin/python" -m pip install --upgrade pip
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip arguments
"$venv/bin/python" -m pip install ${TORCH_PIP_ARGS:-} "torch==$torch_version"
"$venv/bin/python" -m pip install -c "$constraints" "$sae_lens_spec"
# SAEBench, for its metric functions and result classes (tests/test_evals.py): without its
# dependencies (datasets, openai, sae-probes, torchvision: its evals' data and judges, which
# the parts the tests import do not read), plus the one its core module imports that
# sae-lens does not bring.
"$venv/bin/python" -m pip install -c "$constraints" --no-deps "$sae_bench_spec"
"$venv/bin/python" -m pip install -c "$constraints" tabulate
# scikit-learn: the reference for saejax.evals.probing.fit_logistic (tests/test_probing_evals.py).
"$venv/bin/python" -m pip install -c "$constraints" scikit-learn

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import sae_bench.evals.core.main  # noqa: F401  (what tests/saebench_peer.py imports)
print(f"SAELens environment ready: sae-lens {md.version('sae-lens')}, "
      f"sae-bench {md.version('sae-bench')}, torch {torch.__version__}")
PY
