"""The analysis tools on every kind of dictionary beyond the SAE, on the tiny GPT-2 of
tests/test_analysis.py: a transcoder (trained, read at its input hook's store, writing the MLP
output), a crosscoder of two layers' residual streams and a CLT over both layers (random
params): the top activations against a brute-force encoding of the stores' rows (a CLT's
flat index included, sharded against one device), steering against a hand-written
intervention through `models.forward`, the dashboard's and review's pages, and the errors
that name the flag."""

import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from saejax import harvest, models, sae, train
from saejax.analysis import (dashboard, dashboard_data, interventions, kinds, loading, pages,
                             review, steer, top_activations)
from saejax.analysis.loading import AnalysisError, LoadedSAE
from saejax.data import store as store_lib
from test_analysis import run  # noqa: F401  (the fixture: tiny model and text)
import tiny_lm

INPUTS = ("blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized")
OUTPUTS = ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
RESID = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
TOP = dict(top_n=5, context_before=3, context_after=1, batch_sequences=8, max_rows=1024)


@pytest.fixture(scope="module")
def kinds_run(run, tmp_path_factory):  # noqa: F811
    """The stores of INPUTS, OUTPUTS and RESID from one harvest, a transcoder trained on
    INPUTS[1] -> OUTPUTS[1] for a few steps, and random crosscoder and CLT params."""
    root = tmp_path_factory.mktemp("kinds")
    text = os.path.join(os.path.dirname(run.checkpoint), "text.txt")
    stores = harvest.harvest(run.checkpoint, text, str(root / "stores"),
                             hooks=[*INPUTS, *OUTPUTS, *RESID], context_length=tiny_lm.CONTEXT,
                             batch_sequences=16, chunk_rows=256, max_sequences=32,
                             progress_every_s=1e9, exclude_positions=(),
                             exclude_token_ids="")["stores"]
    from experiments import gpt2_small  # pylint: disable=import-outside-toplevel
    config = gpt2_small.get_config("tiny")
    config.lm.checkpoint, config.lm.tokens, config.lm.hook = run.checkpoint, text, INPUTS[1]
    config.data.path = f"{stores[INPUTS[1]]},{stores[OUTPUTS[1]]}"
    config.sae.shape, config.sae.input_hook, config.sae.target_hook = (
        "transcoder", INPUTS[1], OUTPUTS[1])
    config.evals.loss_recovered_sequences = 0
    config.train.steps = 5
    train.train_and_evaluate(config, str(root / "transcoder"))
    return SimpleNamespace(checkpoint=run.checkpoint, stores=stores,
                           transcoder=str(root / "transcoder"))


def _random(shape_fields, n_latents=32, seed=0, scale=1.7):
    config = loading.sae_config_for("relu", **shape_fields)
    architecture = sae.from_config(config)
    params = architecture.init(jax.random.PRNGKey(seed), 64, n_latents, config)
    params = {k: np.asarray(v) for k, v in params.items()}
    # A bias that lets about half the latents fire, so every latent has examples.
    params["b_enc"] = np.full(params["b_enc"].shape, 0.05, np.float32)
    return LoadedSAE(params=params, input_scale=scale, architecture=architecture,
                     sae_config=config, source="/runs/random", kind="saejax", hook=None)


def crosscoder():
    return _random({"shape": "crosscoder", "hooks": ",".join(RESID)})


def clt():
    return _random({"shape": "clt", "layers": "0,1"})


def _brute_force(loaded, paths, n_rows):
    stacked = np.stack([store_lib.open_store(p).read(0, n_rows).result() for p in paths], 1)
    return np.asarray(kinds.encode(loaded, stacked))


def _check_top(top, latents):
    """The pass's counts and top rows are those of sorting each latent's column."""
    np.testing.assert_array_equal(top.fired, np.sum(latents > 0, axis=0))
    np.testing.assert_allclose(top.activation_sum, latents.sum(0), rtol=1e-4, atol=1e-4)
    for i in range(latents.shape[1]):
        order = np.argsort(-latents[:, i], kind="stable")[:top.values.shape[1]]
        order = order[latents[order, i] > 0]
        np.testing.assert_array_equal(top.rows[i, :len(order)], order)
        np.testing.assert_allclose(top.values[i, :len(order)], latents[order, i], rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------------------------------------
# Top activations and the dashboard.
# ------------------------------------------------------------------------------------------
def test_top_activations_of_each_kind_are_its_latents_over_the_stores(kinds_run):
    stores = kinds_run.stores   # the transcoder's: test_the_transcoder_dashboard_...
    cases = [(crosscoder(), [stores[h] for h in RESID], ",".join(stores[h] for h in RESID)),
             # a CLT's stores picked by hook among more (as a run's data.path names them)
             (clt(), [stores[h] for h in INPUTS],
              ",".join(stores[h] for h in (*OUTPUTS, *INPUTS)))]
    for loaded, paths, store in cases:
        sharded = top_activations.compute_top_activations(
            loaded, store, mesh=top_activations.default_mesh(32, model=4), **TOP)
        latents = _brute_force(loaded, paths, sharded.n_rows)
        assert latents.shape[1] == loaded.n_latents == sharded.n_latents
        assert np.sum(sharded.fired > 0) > loaded.n_latents // 4
        _check_top(sharded, latents)
        assert sharded.info["store"] == ",".join(paths)
    # The CLT's flat index: latent l * 32 + i is layer l's latent i, read at its input.
    loaded = cases[1][0]
    x = store_lib.open_store(stores[INPUTS[1]]).read(0, 64).result() * loaded.input_scale
    layer1 = np.maximum(x @ loaded.params["W_enc"][1] + loaded.params["b_enc"][1], 0)
    np.testing.assert_allclose(_brute_force(loaded, cases[1][1], 64)[:, 32:], layer1,
                               rtol=1e-5, atol=1e-5)
    single = top_activations.compute_top_activations(
        loaded, cases[1][2], mesh=top_activations.default_mesh(32, jax.devices()[:1]), **TOP)
    np.testing.assert_array_equal(sharded.rows, single.rows)
    np.testing.assert_array_equal(sharded.histogram, single.histogram)
    assert sharded.info["n_layers"] == 2 and sharded.info["latents_per_layer"] == 32


def test_wrong_stores_and_latents_are_refused_naming_the_flag(kinds_run):
    stores, loaded = kinds_run.stores, crosscoder()
    with pytest.raises(AnalysisError, match=r"--store=.* without blocks.1.hook_resid_post; .*"
                                            r"pass --store with their stores"):
        top_activations.compute_top_activations(loaded, stores[RESID[0]])
    with pytest.raises(AnalysisError, match=r"--store: .* holds blocks.0.ln2.hook_normalized, "
                                            r"where blocks.0.hook_resid_post was expected"):
        top_activations.compute_top_activations(
            loaded, f"{stores[INPUTS[0]]},{stores[RESID[1]]}")
    with pytest.raises(AnalysisError, match=r"--latents: latent 64 is out of range: the SAE "
                                            r"has latents 0..63"):
        dashboard_data.parse_latents("64,", clt().n_latents)
    with pytest.raises(AnalysisError, match=r"--latent=64: .* latents 0..63 \(a CLT's flat "
                                            r"index layer \* 32 \+ i over its 2 layers\)"):
        loading.check_latent(clt(), 64)
    with pytest.raises(AnalysisError, match=r"--store=.* names 2 stores; an SAE reads one"):
        top_activations.compute_top_activations(
            loading.load_sae(kinds_run.transcoder)._replace(
                architecture=sae.get("topk")), f"{stores[RESID[0]]},{stores[RESID[1]]}")


def test_the_transcoder_dashboard_and_review_pages(kinds_run):
    # Its latents are read from its input hook's store, picked among its run's data.path.
    prepared = dashboard.prepare(kinds_run.transcoder, latents="0:4", **TOP)
    assert kinds.kind_of(prepared.loaded).reads == (INPUTS[1],)
    assert prepared.top.info["store"] == kinds_run.stores[INPUTS[1]]
    _check_top(prepared.top, _brute_force(prepared.loaded, [kinds_run.stores[INPUTS[1]]],
                                          prepared.top.n_rows))
    index = dashboard.run(kinds_run.transcoder, latents="0:4", **TOP)  # reuses them
    page = open(os.path.join(os.path.dirname(index), "latents", "1.html")).read()
    assert f"read at {INPUTS[1]}" in page
    assert f"what the latent writes into {OUTPUTS[1]}" in page
    opened = review.open_review(kinds_run.transcoder, latents="0:4", **TOP)
    assert "rating" in opened.page_html("2") and f"Read at {INPUTS[1]}" in opened.index_html()
    # Blind, its controls read the input hook's store too.
    blind = review.open_review(kinds_run.transcoder, latents="0:4", blind=True, controls=2,
                               **TOP)
    assert blind.controls[1].info["store"] == kinds_run.stores[INPUTS[1]]
    assert all("rating" in blind.page_html(item.token) for item in blind.items)
    # The steering CLI's report says where it reads and writes.
    printed = steer.steer_run(kinds_run.transcoder, latent=1, prompt="alpha bravo", value=20.0,
                              new_tokens=2)
    assert f"Latent 1 (add 20) at {OUTPUTS[1]} (read at {INPUTS[1]})" in printed
    with pytest.raises(AnalysisError, match=r"--hook=blocks.0.hook_resid_post: a transcoder "
                                            r"reads .* leave --hook out"):
        steer.steer_run(kinds_run.transcoder, latent=1, prompt="alpha", hook=RESID[0])


def test_the_clt_logit_view_is_its_writes_summed(kinds_run):
    loaded = clt()
    W_U = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    up_ids, up, _, _ = dashboard_data.promoted_tokens(loaded, W_U, [3, 40], k=4)
    W_dec = loaded.params["W_dec"] / loaded.input_scale
    expected = np.stack([W_dec[0, 0, 3] + W_dec[0, 1, 3], W_dec[1, 1, 8]]) @ W_U
    np.testing.assert_allclose(up, -np.sort(-expected, axis=1)[:, :4], rtol=1e-4, atol=1e-4)
    # A crosscoder's: its decoder slice at its last hook.
    coder = crosscoder()
    _, up, _, _ = dashboard_data.promoted_tokens(coder, W_U, [5], k=4)
    expected = coder.params["W_dec"][5, 64:] / coder.input_scale @ W_U
    np.testing.assert_allclose(up[0], -np.sort(-expected)[:4], rtol=1e-4, atol=1e-4)
    top = top_activations.compute_top_activations(
        loaded, ",".join(kinds_run.stores[h] for h in INPUTS), **TOP)
    view = dashboard_data.latent_view(top, 40, loaded=loaded,
                                      token_text=top_activations.TokenText(None))
    assert view.where.startswith("layer 1's latent 8 (flat index 1 * 32 + 8), read at "
                                 "blocks.1.ln2.hook_normalized")
    page = pages.latent_page(view)
    assert "layer 1&#39;s latent 8" in page and "summed over the MLP outputs" in page


# ------------------------------------------------------------------------------------------
# Steering.
# ------------------------------------------------------------------------------------------
def _hand_steered(model, tokens, writes, delta):
    """Logits with `delta [b, s] * direction` added at each hook of `writes` ({hook: d})."""
    interventions = {h: (lambda x, d=d: x + delta[..., None] * d) for h, d in writes.items()}
    return models.forward(model.params, tokens, model.config, interventions=interventions)[0]


@pytest.mark.parametrize("which", ["transcoder", "crosscoder", "clt"])
def test_steering_each_kind_is_the_hand_written_intervention(kinds_run, which):
    loaded = {"transcoder": lambda: loading.load_sae(kinds_run.transcoder),
              "crosscoder": crosscoder, "clt": clt}[which]()
    kind = kinds.kind_of(loaded)
    model = loading.load_language_model(loaded, checkpoint=kinds_run.checkpoint)
    tokens = steer.encode_prompt(models.load_tokenizer(kinds_run.checkpoint),
                                 "alpha bravo charlie delta", bos_token_id=None)[None]
    clean_logits, cache = models.forward(model.params, tokens, model.config, hooks=kind.reads)
    f = np.asarray(kinds.encode(loaded, {h: cache[h] for h in kind.reads}))[0]
    latent = int(np.argmax(f[-1, :kind.per_layer]))  # a CLT's: of layer 0, writing both
    assert f[-1, latent] > 0
    writes = kinds.write_directions(loaded, latent)
    forward = jax.jit(interventions.make_forward(model.config, loaded, kind))
    for mode, value, delta in (("clamp", 30.0, 30.0 - f[:, latent]),
                               ("ablate", None, -f[:, latent]),
                               ("add", 20.0, np.full(len(f), 20.0))):
        expected = _hand_steered(model, tokens, writes, delta[None])
        args = interventions.intervention_args(loaded, latent, mode, value)
        logits, activation = forward(model.params, args, tokens)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(activation[0], f[:, latent], rtol=1e-4, atol=1e-5)
    # steer() runs that forward (the last case, add 20) and reports the hooks.
    result = steer.steer(model, loaded, tokens, latent, "add", 20.0, n_new_tokens=1)
    logp = jax.nn.log_softmax(expected[0, -1])
    clean = jax.nn.log_softmax(clean_logits[0, -1])
    kl = float(np.sum(np.exp(clean) * (clean - logp)))
    assert kl > 1e-3 and result.kl_last == pytest.approx(kl, rel=1e-3)
    assert result.write_hooks == tuple(writes) and result.read_hooks == kind.reads
    assert result.hook == ",".join(writes)
    if which == "clt":
        assert tuple(writes) == OUTPUTS
        assert tuple(kinds.write_directions(loaded, 40)) == (OUTPUTS[1],)
    n = loaded.n_latents
    with pytest.raises(AnalysisError, match=rf"--latent={n}: latent {n} is out of range"):
        steer.steer(model, loaded, tokens, n, "add", 1.0)
