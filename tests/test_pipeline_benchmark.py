"""benchmarks/pipeline.py runs end to end at tiny shapes and reports the three rates."""

import json
import os
import subprocess
import sys

from conftest import ROOT

TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--vocab_size=256", "--layer=1",
        "--sequences=8", "--context_length=16", "--batch_sequences=4", "--chunk_rows=64",
        "--read_rows=1024", "--expansion_factor=2", "--k=4", "--k_aux=8", "--batch_size=64",
        "--iters=2", "--peak_size=256"]


def test_pipeline_benchmark_reports_harvest_read_and_train_rates():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user
    out = subprocess.run([sys.executable, os.path.join("benchmarks", "pipeline.py"), *TINY],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("verdict: reading") for line in lines)
    for key in ("harvest_tokens_per_s", "harvest_flops_per_s", "read_tokens_per_s",
                "read_gb_per_s", "train_tokens_per_s", "matmul_flops_per_s",
                "read_over_train", "harvest_over_train", "peak_memory_bytes"):
        assert result[key] > 0, key
    assert result["harvest_tokens"] == 8 * 16
    # The harvest is smaller than --read_rows, so a random store of that size is read.
    assert result["read_store"] == "random rows" and result["read_rows"] == 1024
    assert result["train_n_latents"] == 64 and result["hook"] == "blocks.1.hook_resid_post"
