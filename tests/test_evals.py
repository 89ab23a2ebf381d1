"""The field's evaluations (saejax.evals, saejax.evals.suite): each metric on a hand-computed
case; SAELens' synthetic-benchmark scores and SAEBench core's metrics against sae_lens' and
sae_bench's own functions on the same arrays (tests/saebench_peer.py, in the SAELens
environment); and `python -m saejax.evals`' registry on a trained run and a sweep, its result
JSON validated by sae_bench's own result class."""

import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, toy_config
from saejax import evals, results, train
from saejax.evals import suite
from saejax.evals import __main__ as evals_cli
from test_analysis import run  # noqa: F401  (the fixture: a tiny GPT-2 and its SAE)
from test_crosscoder import CROSSCODER
from test_shapes import TINY
from test_saelens_interop import saelens_python

PEER = os.path.join(ROOT, "tests", "saebench_peer.py")


# ------------------------------------------------------------------------------------------
# Hand-computed cases.
# ------------------------------------------------------------------------------------------
def test_reconstruction_metrics_on_a_hand_computed_case():
    x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    x_hat = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    latents = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]])
    m = {k: float(v) for k, v in evals.reconstruction_metrics(
        evals.reconstruction_sums(x, x_hat, latents)).items()}
    # residuals 0 and 1; E||x||^2 = 2.5, ||E x||^2 = 1.25, so the variance is 1.25.
    assert m["mse"] == pytest.approx(0.5)
    assert m["explained_variance"] == pytest.approx(1 - 0.5 / 1.25)
    # per row: 1 - r / ||x - mean||^2 = 1 - 0 / 0.5 and 1 - 1 / 0.5 (x - mean: +-(0.5, -1))
    assert m["explained_variance_legacy"] == pytest.approx((1.0 + (1 - 1 / 1.25)) / 2)
    assert m["cossim"] == pytest.approx(1.0)
    assert m["l2_norm_in"] == pytest.approx(1.5) and m["l2_norm_out"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0 / 1.5)
    assert m["l0"] == pytest.approx(1.5) and m["l1"] == pytest.approx(2.0)


def test_sums_add_over_batches():
    rng = np.random.default_rng(1)
    x, x_hat, z = (rng.normal(size=(8, 3)), rng.normal(size=(8, 3)), rng.normal(size=(8, 4)))
    whole = evals.reconstruction_sums(x, x_hat, z)
    halves = [evals.reconstruction_sums(x[i:i + 4], x_hat[i:i + 4], z[i:i + 4]) for i in (0, 4)]
    added = {k: halves[0][k] + halves[1][k] for k in whole}
    a, b = evals.reconstruction_metrics(whole), evals.reconstruction_metrics(added)
    for k in ("mse", "explained_variance", "cossim", "l2_ratio", "l0", "l1"):
        assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5), k


def test_density_metrics_on_a_hand_computed_case():
    density = evals.feature_density(jnp.array([0.0, 5.0, 50.0, 500.0]), 1000)
    m = {k: float(v) for k, v in evals.density_metrics(density).items()}
    assert m["frac_alive"] == 0.75
    assert m["freq_over_1_percent"] == 0.5 and m["freq_over_10_percent"] == 0.25
    assert m["normalized_freq_over_1_percent"] == pytest.approx(0.55 / 0.555)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.555)
    assert float(evals.density_metrics(jnp.zeros(3))["normalized_freq_over_1_percent"]) == 0.0


def test_max_cosine_to_others_on_a_hand_computed_case_in_chunks():
    rows = jnp.array([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    got = np.asarray(evals.max_cosine_to_others(rows, chunk=2))
    np.testing.assert_allclose(got, [2 ** -0.5, 2 ** -0.5, 0.0], atol=1e-6)


def test_downstream_scores_on_a_hand_computed_case():
    assert float(evals.loss_recovered(2.0, 2.5, 4.0)) == pytest.approx(0.75)  # CE score
    assert float(evals.downstream_score(0.5, 2.0)) == pytest.approx(0.75)     # KL score
    sums = {"ce_clean": 4.0, "ce_sae": 5.0, "ce_zero_ablation": 8.0, "kl_sae": 1.0,
            "kl_zero_ablation": 4.0, "positions": 2.0}
    m = evals.downstream_metrics(sums)
    assert m["loss_recovered"] == pytest.approx(0.75) and m["kl_score"] == pytest.approx(0.75)


def test_downstream_sums_needs_a_dict_of_interventions_for_several_hooks():
    seen = []

    def lm_forward(tokens, interventions):  # logits from one-hot tokens; records the splices
        seen.append(sorted(interventions or ()))
        return jax.nn.one_hot(tokens, 5) * 3.0

    tokens = jnp.array([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"several hooks \['a', 'b'\].*dict of interventions"):
        evals.downstream_sums(lm_forward, tokens, ("a", "b"), [lambda x: x])
    seen.clear()
    out = evals.downstream_sums(lm_forward, tokens, ("a", "b"),
                                [{"a": lambda x: x, "b": lambda x: x}])
    # clean, both hooks zero-ablated, then the one spliced pass with both replaced.
    assert seen == [[], ["a", "b"], ["a", "b"]]
    assert float(out[0]["positions"]) == 2.0
    # One hook: a function alone still names its hook.
    seen.clear()
    evals.downstream_sums(lm_forward, tokens, "a", [lambda x: x])
    assert seen == [[], ["a"], ["a"]]


def test_mcc_is_one_to_one_where_mmcs_is_not():
    # Two copies of feature 0 and nothing of feature 1.
    decoder = jnp.array([[1.0, 0.0], [-2.0, 0.0]])
    features = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    assert evals.mean_correlation_coefficient(decoder, features) == pytest.approx(0.5)
    assert float(evals.feature_uniqueness(decoder, features)) == 0.5
    # A third latent on feature 1 (sign flipped: signs are ignored).
    decoder = jnp.concatenate([decoder, jnp.array([[0.0, -3.0]])])
    assert evals.mean_correlation_coefficient(decoder, features) == pytest.approx(1.0)
    assert float(evals.feature_uniqueness(decoder, features)) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(evals.best_matching_features(decoder, features), [0, 0, 1])


def test_firing_classification_on_a_hand_computed_case():
    latents = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    codes = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    counts = evals.firing_counts(latents, codes, jnp.array([0, 1, 2]))
    np.testing.assert_array_equal(counts.T, [[1, 1, 1, 0], [1, 0, 0, 2], [0, 0, 0, 3]])
    m = {k: float(v) for k, v in evals.firing_classification(counts).items()}
    # latent 0: P = R = F1 = 1/2, accuracy 1/3; latent 1: all 1; latent 2 (never fires, its
    # feature never active): P = R = F1 = 0 (undefined counts as 0), accuracy 1.
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["f1_score"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx((1 / 3 + 1 + 1) / 3)


# ------------------------------------------------------------------------------------------
# Against sae_lens and sae_bench, and the registry on a trained run.
# ------------------------------------------------------------------------------------------
NB, ROWS, D, N, F = 2, 40, 6, 10, 5
B, S, V = 2, 7, 11


def _arrays(rng) -> dict:
    x = rng.normal(0.5, 1, (NB, 1, ROWS, D)).astype(np.float32)
    clean = rng.normal(size=(NB, B, S, V)).astype(np.float32)
    spliced = (clean + 0.3 * rng.normal(size=clean.shape)).astype(np.float32)
    ablated = (clean + 1.5 * rng.normal(size=clean.shape)).astype(np.float32)
    # sae_lens' KL counts the last position, saejax's (and both CEs) do not: equal logits
    # there make the KL scores comparable (the KLs differ by S / (S - 1)).
    spliced[:, :, -1] = ablated[:, :, -1] = clean[:, :, -1]
    latents = np.maximum(rng.normal(-0.5, 1, (NB, 1, ROWS, N)), 0).astype(np.float32)
    latents[..., 0] = 0.0  # a dead latent
    return {"x": x, "x_hat": (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32),
            "latents": latents,
            "codes": np.maximum(rng.normal(-0.5, 1, (NB, 1, ROWS, F)), 0).astype(np.float32),
            "decoder": rng.normal(size=(N, D)).astype(np.float32),
            "encoder": rng.normal(size=(D, N)).astype(np.float32),
            "true_features": rng.normal(size=(F, D)).astype(np.float32),
            "lm_tokens": rng.integers(0, V, (NB, B, S)), "clean_logits": clean,
            "sae_logits": spliced, "ablated_logits": ablated}


@pytest.fixture(scope="module")
def peer_process(tmp_path_factory):
    """tests/saebench_peer.py started first: it imports torch, sae_lens and sae_bench and
    scores the arrays while the fixtures below train and evaluate, then validates their
    result files."""
    python = saelens_python()
    work = tmp_path_factory.mktemp("saebench-peer")
    arrays = _arrays(np.random.default_rng(0))
    np.savez(work / "a.npz", **arrays)
    paths = {"synthetic": str(work / "run"), "lm": str(work / "lm_run")}
    request = {"arrays": str(work / "a.npz"),
               "results": [suite.result_path(p, "core") for p in paths.values()]}
    (work / "request.json").write_text(json.dumps(request))
    process = subprocess.Popen([python, PEER, str(work / "request.json")], cwd=str(work),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield arrays, paths, process
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def trained(peer_process):
    """A tiny synthetic crosscoder (three hooks, decoder rows of every hook side by side: the
    widest case of a batch; the SAE and the transcoder read one entry each), evaluated by
    every registered eval."""
    workdir = peer_process[1]["synthetic"]
    config = toy_config("smoke", **{**TINY, **CROSSCODER, "sae.architecture": "relu",
                                    "sae.l1_coefficient": 0.3, "sae.expansion_factor": 2,
                                    "train.steps": 10, "evals.eval_batches": 2})
    train.train_and_evaluate(config, workdir)
    written = suite.run(workdir, options={"eval_batches": 2}, log=lambda *_: None)
    return workdir, written


@pytest.fixture(scope="module")
def lm_core(peer_process, run):  # noqa: F811  (test_analysis' tiny GPT-2 run)
    """Core on a run with a language model (a copy of test_analysis' tiny GPT-2 SAE)."""
    workdir = peer_process[1]["lm"]
    shutil.copytree(run.workdir, workdir, ignore=shutil.ignore_patterns("analysis"))
    return suite.run(workdir, ["core"], {"eval_batches": 2, "sequences": 8},
                     log=lambda *_: None)["core"]


@pytest.fixture(scope="module")
def peer(peer_process, trained, lm_core):
    arrays, _, process = peer_process
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    return arrays, json.loads(stdout.strip().splitlines()[-1])


def test_recovery_metrics_equal_sae_lens_synthetic(peer):
    a, ref = peer
    flat = lambda k: a[k].reshape(-1, a[k].shape[-1])
    got = evals.recovery_metrics(a["decoder"], a["true_features"], [flat("latents")],
                                 [flat("codes")])
    want = ref["synthetic"]
    assert got["mcc"] == pytest.approx(want["mcc"], abs=1e-6)
    assert got["uniqueness"] == pytest.approx(want["uniqueness"])
    for k, v in want["classification"].items():
        assert got[f"classification/{k}"] == pytest.approx(v, abs=1e-6), k


def test_core_metrics_equal_sae_lens_and_sae_bench(peer):
    a, ref = peer
    sums = [evals.reconstruction_sums(a["x"][i, 0], a["x_hat"][i, 0], a["latents"][i, 0])
            for i in range(NB)]
    total = {k: sum(s[k] for s in sums) for k in sums[0]}
    got = evals.reconstruction_metrics(total)
    for k, v in ref["core"]["sparsity_variance"].items():
        assert float(got[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    density = evals.feature_density(total["fire_counts"], total["rows"])
    np.testing.assert_allclose(density, ref["core"]["feature_density"], atol=1e-7)
    for k, v in evals.density_metrics(density).items():
        assert float(v) == pytest.approx(ref["core"]["misc"][k], abs=1e-7), k
    for name, rows in (("encoder", a["encoder"].T), ("decoder", a["decoder"])):
        np.testing.assert_allclose(evals.max_cosine_to_others(rows, chunk=4),
                                   ref["core"][f"max_{name}_cosine_sim"], atol=1e-6)


def test_downstream_scores_equal_sae_lens(peer):
    a, ref = peer
    sums = None
    for i in range(NB):
        def lm_forward(tokens, interventions, i=i):  # the three runs' logits, as given
            if interventions is None:
                return jnp.asarray(a["clean_logits"][i])
            zero = interventions["h"] is jnp.zeros_like
            return jnp.asarray(a["ablated_logits" if zero else "sae_logits"][i])
        out = evals.downstream_sums(lm_forward, jnp.asarray(a["lm_tokens"][i]), "h",
                                    [lambda x: x])[0]
        sums = out if sums is None else {k: sums[k] + out[k] for k in out}
    got = evals.downstream_metrics(sums)
    want = ref["core"]["downstream"]
    assert float(got["ce_clean"]) == pytest.approx(want["ce_loss_without_sae"], rel=1e-5)
    assert float(got["ce_sae"]) == pytest.approx(want["ce_loss_with_sae"], rel=1e-5)
    assert float(got["ce_zero_ablation"]) == pytest.approx(want["ce_loss_with_ablation"],
                                                           rel=1e-5)
    assert float(got["loss_recovered"]) == pytest.approx(want["ce_loss_score"], rel=1e-5)
    assert float(got["kl_score"]) == pytest.approx(want["kl_div_score"], rel=1e-5)
    assert float(got["kl_sae"]) == pytest.approx(want["kl_div_with_sae"] * S / (S - 1), rel=1e-5)


def test_core_json_is_a_valid_saebench_core_output(peer, trained, lm_core):
    _, ref = peer
    synthetic, with_lm = (ref["validated"][suite.result_path(p, "core")]
                          for p in (trained[0], lm_core["sae_cfg_dict"]["workdir"]))
    for validated in (synthetic, with_lm):
        assert validated["class"] == "CoreEvalOutput" and validated["extra_fields"] == ["saejax"]
    # Without a language model only the two model categories are left out.
    assert synthetic["placeholder_categories"] == ["model_behavior_preservation",
                                                   "model_performance_preservation"]
    assert synthetic["details"] == 32
    assert with_lm["placeholder_categories"] == [] and with_lm["details"] == 256
    # The CE and KL scores of the LM run, as training's loss recovered computes them.
    behaviour = lm_core["eval_result_metrics"]["model_behavior_preservation"]
    performance = lm_core["eval_result_metrics"]["model_performance_preservation"]
    assert performance["ce_loss_without_sae"] < performance["ce_loss_with_sae"] < performance[
        "ce_loss_with_ablation"]
    assert 0 < performance["ce_loss_score"] <= 1 and 0 < behaviour["kl_div_score"] <= 1
    assert performance["ce_loss_score"] == pytest.approx(evals.loss_recovered(
        performance["ce_loss_without_sae"], performance["ce_loss_with_sae"],
        performance["ce_loss_with_ablation"]))
    assert lm_core["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] \
        == 8 * 32


def test_registry_on_a_run_summary_and_sweep_table(trained, tmp_path):
    workdir, written = trained
    core, truth = written["core"], written["ground_truth"]
    assert core["eval_type_id"] == "core" and core["sae_cfg_dict"]["d_sae"] == 32
    assert core["sae_cfg_dict"]["shape"] == "crosscoder"
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    # The same definitions in summary.json (training's eval batches: the same 2 here).
    assert truth["eval_result_metrics"]["recovery"]["mcc"] == pytest.approx(summary["mcc"])
    assert truth["eval_result_metrics"]["recovery"]["mmcs"] == pytest.approx(summary["mmcs"])
    assert truth["eval_result_metrics"]["classification"]["f1_score"] == pytest.approx(
        summary["classification/f1_score"], abs=1e-6)
    assert core["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(summary["l0"],
                                                                           rel=1e-4)
    flat = results.eval_metrics(workdir)
    assert flat["eval:ground_truth/mcc"] == summary["mcc"] and "eval:core/l2_ratio" in flat
    # A sweep of that one point: its table and report get the evals' columns.
    sweep = tmp_path / "sweep"
    shutil.copytree(workdir, sweep / "p0")
    shutil.rmtree(sweep / "p0" / "analysis")
    (sweep / results.MANIFEST).write_text(json.dumps({"points": [{
        "name": "p0", "overrides": {}, "steps": summary["step"], "architecture": "relu",
        "n_latents": 32, "sparsity_level_name": "l1_coefficient", "sparsity_level": 0.3,
        "flops_per_token": summary["flops_per_token"]}]}))
    rows = evals_cli.run_sweep(str(sweep), ["ground_truth"], {"eval_batches": 2},
                               log=lambda *_: None)
    assert rows[0]["eval:ground_truth/mcc"] == pytest.approx(summary["mcc"])
    assert rows[0]["mcc"] == summary["mcc"]  # the summary's column too
    assert "eval:ground_truth/mcc" in (sweep / results.TABLE).read_text()
    report = (sweep / "report.md").read_text()
    assert "## Evaluations" in report and "| ground_truth/mcc |" in report.replace(" | ", " |\n| ")
    assert (sweep / "plots" / "evals.png").exists()


def test_registry_refuses_unknown_evals_and_skips_what_a_run_lacks(trained):
    workdir, written = trained
    with pytest.raises(suite.loaded_lib.AnalysisError, match="registered"):
        suite.run(workdir, ["nope"])
    context = suite.Context(workdir)
    lm_eval = suite.Eval("x", lambda c: {}, ("lm",), "")
    assert "language model" in suite.missing_needs(lm_eval, context)[0]
    with pytest.raises(ValueError, match="unknown"):
        suite.register("y", needs=("gpu",))
