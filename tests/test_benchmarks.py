"""The benchmarks run and end with the JSON line that RESULTS.md figures are read from."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

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
    # The FLOP/s printed are the tokens/s printed times the architecture's own count.
    from saejax import configs, sae  # pylint: disable=import-outside-toplevel
    sae_config = configs.apply_overrides(configs.base_config(), {"sae.k": 4}).sae
    count = sae.get("topk").flops_per_token(32, 64, sae_config)
    assert result["flops_per_s"] == pytest.approx(result["tokens_per_s"] * count)


def test_train_step_benchmark_counts_a_crosscoders_hooks():
    """A ReLU crosscoder of 3 hooks does 3 dictionaries' matmuls: 10 x 3d x n FLOPs a token."""
    result = _last_json("train_step.py", *TINY, "--shape=crosscoder", "--n_layers=3")
    assert result["shape"] == "crosscoder" and result["n_latents"] == 64
    assert result["flops_per_s"] / result["tokens_per_s"] == pytest.approx(10 * 3 * 32 * 64)


def test_train_step_benchmark_counts_a_matryoshka_skip_transcoders_own_flops():
    """A Matryoshka BatchTopK skip transcoder: the dense step (10 d n), the skip's matmul
    forward and backward (6 d d) and the prefix's masked decode forward and backward (6 d n)."""
    result = _last_json("train_step.py", *TINY, "--architecture=batchtopk", "--k=4",
                        "--shape=transcoder", "--skip_connection", "--matryoshka_widths=16")
    assert result["shape"] == "transcoder" and result["matryoshka_widths"] == [16]
    assert result["flops_per_s"] / result["tokens_per_s"] == pytest.approx(
        10 * 32 * 64 + 6 * 32 * 32 + 6 * 32 * 64)


def test_train_step_benchmark_counts_a_clts_layers_and_checks_its_memory_model():
    """A TopK CLT of 3 layers: 3 encoders and the full 3 x 3 masked decoder, 4 L d n + 6 L^2 n d
    FLOPs a token; its memory model within 1.5x of XLA's analysis."""
    result = _last_json("train_step.py", *TINY, "--shape=clt", "--n_layers=3",
                        "--architecture=topk", "--k=4", "--memory")
    assert result["shape"] == "clt" and result["n_latents"] == 64
    assert result["flops_per_s"] / result["tokens_per_s"] == pytest.approx(
        4 * 3 * 32 * 64 + 6 * 9 * 64 * 32)
    assert 1 / 1.5 <= result["memory_model_bytes"] / result["xla_bytes"] <= 1.5, result


def test_group_step_benchmark_compares_group_with_separate_steps():
    result = _last_json("group_step.py", *TINY, "--group_size=2")
    assert result["group_size"] == 2
    assert result["speedup_step_only"] > 0 and result["speedup_with_input"] > 0


def test_group_step_benchmark_with_the_lm_as_input():
    # A 2-layer GPT-2 of width 32 (random init) run on the fly: one forward of 4 x 16 tokens
    # per batch of 64, which a group of 2 runs once and 2 separate runs twice.
    result = _last_json("group_step.py", *TINY, "--group_size=2", "--source=lm", "--n_layer=2",
                        "--layer=1", "--n_head=2", "--vocab_size=64", "--context_length=16")
    assert result["source"] == "lm" and result["group_size"] == 2
    assert result["hook"] == "blocks.1.hook_resid_post" and result["lm_batch_sequences"] == 4
    assert result["model"] == {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64,
                               "init": "random"}
    assert result["d"] == 32 and result["n_latents"] == 64
    assert result["input_seconds_per_batch"] > 0 and result["lm_flops_per_token"] > 0
    assert result["speedup_step_only"] > 0 and result["speedup_with_input"] > 0
    assert result["solo_seconds_per_step_with_input"] > 0


def test_group_step_benchmark_over_hooks_of_one_forward():
    # 2 SAEs at two hooks of block 1, from one forward per batch, against 2 runs at one hook.
    result = _last_json("group_step.py", *TINY, "--group_size=2", "--over=hooks", "--n_layer=2",
                        "--layer=1", "--n_head=2", "--vocab_size=64", "--context_length=16")
    assert result["over"] == "hooks" and result["source"] == "lm"
    assert result["hooks"] == ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"]
    assert result["hook"] == "blocks.1.hook_resid_mid"  # the separate run's
    assert result["tokens_per_s_per_sae"] * 2 == pytest.approx(result["tokens_per_s"])
    assert result["separate_tokens_per_s_per_sae"] > 0 and result["speedup_with_input"] > 0


def test_batch_sum_benchmark_times_both_sums():
    result = _last_json("batch_sum.py", "--batch_size=64", "--n_latents=128", "--iters=2")
    assert result["jnp.sum(a, axis=0)"] > 0 and result["evals.batch_sum(a)"] > 0


def test_harvest_benchmark_ratio_is_the_quotient_of_its_two_rates(tmp_path):
    # A tiny random Llama saved by transformers: both forwards run its first 2 of 3 blocks.
    import re  # pylint: disable=import-outside-toplevel
    import pytest  # pylint: disable=import-outside-toplevel
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, os.path.join("benchmarks", "harvest.py"),
                          f"--checkpoint={tmp_path / 'llama'}", "--text=random", "--layer=1",
                          "--context_length=16", "--batch_sequences=2", "--iters=2",
                          "--peak_size=128"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["hook"] == "blocks.1.hook_resid_post" and result["model_type"] == "llama"
    saejax, reference = result["saejax_tokens_per_s"], result["transformers_tokens_per_s"]
    assert saejax > 0 and reference > 0 and result["store_write_tokens_per_s"] > 0
    assert abs(result["ratio"] - saejax / reference) <= 1e-9 * result["ratio"]
    printed = re.search(r"saejax / transformers: ([0-9.]+)x", out).group(1)
    assert printed == f"{saejax / reference:.2f}"
    # 2 blocks of 4 matrices (q, k, v, o) and 3 MLP matrices, and their two norms.
    assert result["params_used"] == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32)
    assert 0 < result["saejax_flops_per_s"] < 10 * result["matmul_flops_per_s"]


def test_heldout_fvu_groups_rows_and_skips_a_group_without_variance():
    from benchmarks import heldout_fvu  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    x_hat = x * 0.5
    groups = {"all": np.ones(64, bool), "one": np.arange(64) == 3}
    out = heldout_fvu.grouped_fvu(x, x_hat, groups)
    assert set(out) == {"all"} and out["all"]["rows"] == 64
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert out["all"]["fvu"] == pytest.approx(expected, rel=1e-5)
