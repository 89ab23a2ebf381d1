"""The benchmarks run and end with the JSON line that RESULTS.md figures are read from."""

import json
import os
import subprocess
import sys

from conftest import ROOT

TINY = ["--d=32", "--expansion_factor=2", "--batch_size=64", "--iters=2", "--peak_size=512"]


def _last_json(script, *flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user
    out = subprocess.run([sys.executable, os.path.join("benchmarks", script), *flags], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_step_benchmark_reports_throughput_against_matmul_peak():
    result = _last_json("train_step.py", *TINY, "--architecture=topk", "--k=4")
    assert {"tokens_per_s", "flops_per_s", "matmul_flops_per_s", "peak_memory_bytes"} <= set(result)
    assert result["n_latents"] == 64 and result["tokens_per_s"] > 0
    assert 0 < result["flops_per_s"] < 10 * result["matmul_flops_per_s"]


def test_group_step_benchmark_compares_group_with_separate_steps():
    result = _last_json("group_step.py", *TINY, "--group_size=2")
    assert result["group_size"] == 2
    assert result["speedup_step_only"] > 0 and result["speedup_with_input"] > 0
