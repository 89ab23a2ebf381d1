"""Real activations end to end: a tiny trained GPT-2 checkpoint, `python -m saejax.harvest` to
activation stores, training from a store from the CLI, loss recovered; harvesting killed and
resumed; the on-the-fly LM source; and the errors a user meets on the way."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
import tiny_lm
from saejax import configs, models, train
from saejax.data import lm, store
from saejax.sharding import ConfigError

HOOK = "blocks.1.hook_resid_post"
HOLDOUT = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    checkpoint, text, loss = tiny_lm.make_tiny_lm(str(tmp_path_factory.mktemp("tiny_lm")))
    assert loss < 0.5  # it has learned to count; ablating it must hurt
    return checkpoint, text


def _run(module, *flags, timeout=300):
    out = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _harvest_flags(tiny, out, *extra):
    checkpoint, text = tiny
    return [f"--checkpoint={checkpoint}", f"--tokens={text}", f"--out={out}",
            f"--context_length={tiny_lm.CONTEXT}", f"--holdout_sequences={HOLDOUT}",
            "--chunk_rows=256", *extra]


def test_harvest_train_and_loss_recovered_from_the_cli(tiny, tmp_path):
    checkpoint, text = tiny
    stores = tmp_path / "stores"
    out = _run("saejax.harvest", *_harvest_flags(
        tiny, stores, f"--hooks={HOOK},blocks.0.hook_resid_mid", "--batch_sequences=16"))
    assert "tok/s" in out
    sequences = models.load_sequences(text, tiny_lm.CONTEXT, tokenizer_path=checkpoint)
    harvested = sequences[:-HOLDOUT]
    # By default the first position and the special tokens (<|endoftext|>, <unk>) are no rows.
    keep = (np.arange(tiny_lm.CONTEXT) > 0) & ~np.isin(harvested, [0, 1])
    n_rows = int(keep.sum())
    assert 0 < n_rows < harvested.size
    for hook in (HOOK, "blocks.0.hook_resid_mid"):
        opened = store.open_store(str(stores / hook), expected_d=64)
        assert opened.n_rows == n_rows
        assert opened.metadata["hook"] == hook and opened.metadata["layer"] == int(hook[7])
        assert opened.metadata["exclude_positions"] == [0]
        assert opened.metadata["exclude_token_ids"] == [0, 1]
        # Every row traces back to its token and its place in its sequence.
        np.testing.assert_array_equal(opened.token_ids(0, n_rows), harvested[keep])
        np.testing.assert_array_equal(opened.positions(0, n_rows), np.argwhere(keep))
        sequence, position = opened.sequence_position(100)
        assert harvested[sequence, position] == opened.token_ids(100, 101)[0]
    # The stored activations are the model's, at the kept tokens.
    model = lm.load(_tiny_config(tiny).lm, d=64)
    expected = np.asarray(lm.activations_fn(model)(model.params, sequences[3:5]))[keep[3:5]]
    first = int(keep[:3].sum())
    np.testing.assert_allclose(
        store.open_store(str(stores / HOOK)).read(first, first + len(expected)).result(),
        expected, rtol=1e-5, atol=1e-5)

    workdir = tmp_path / "run"
    out = _run("saejax.main", "--config=experiments/gpt2_small.py:tiny", f"--workdir={workdir}",
               f"--config.data.path={stores / HOOK}", f"--config.lm.checkpoint={checkpoint}",
               f"--config.lm.tokens={text}", "--config.mesh.model=2")
    assert "Loss recovered" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 60 and summary["d"] == 64
    assert summary["ce_clean"] < summary["ce_sae"] < summary["ce_zero_ablation"]
    assert 0.5 < summary["loss_recovered"] <= 1.0, summary
    assert 0 < summary["kl_sae"] < summary["kl_zero_ablation"]
    assert summary["fvu"] < 0.5
    params = train.load_params(str(workdir))
    assert params["W_dec"].shape == (256, 64)


def test_killed_harvest_resumes_without_repeating_or_losing_rows(tiny, tmp_path):
    flags = [f"--hooks={HOOK}", "--batch_sequences=2", "--max_sequences=600"]
    _run("saejax.harvest", *_harvest_flags(tiny, tmp_path / "whole", *flags))
    progress = tmp_path / "killed" / HOOK / "progress.json"
    proc = subprocess.Popen([sys.executable, "-m", "saejax.harvest",
                             *_harvest_flags(tiny, tmp_path / "killed", *flags)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    committed = 0
    while committed == 0:
        assert proc.poll() is None, "the harvest ended before it could be killed"
        assert time.time() < deadline
        if progress.exists():
            try:
                committed = json.loads(progress.read_text())["committed_rows"]
            except ValueError:
                pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    partial = json.loads(progress.read_text())["committed_rows"]
    whole_rows = store.open_store(str(tmp_path / "whole" / HOOK)).n_rows
    assert 0 < partial < whole_rows < 600 * tiny_lm.CONTEXT, partial

    out = _run("saejax.harvest", *_harvest_flags(tiny, tmp_path / "killed", *flags))
    assert f"{partial:,} already there" in out.replace("skipped ", "")
    whole, resumed = (store.open_store(str(tmp_path / w / HOOK)) for w in ("whole", "killed"))
    assert resumed.n_rows == whole.n_rows == whole_rows
    np.testing.assert_array_equal(resumed.positions(0, whole.n_rows),
                                  whole.positions(0, whole.n_rows))
    np.testing.assert_array_equal(resumed.read(0, whole.n_rows).result(),
                                  whole.read(0, whole.n_rows).result())
    np.testing.assert_array_equal(resumed.token_ids(0, whole.n_rows),
                                  whole.token_ids(0, whole.n_rows))


def _tiny_config(tiny, **overrides):
    """experiments/gpt2_small.py:tiny on the tiny model, with {"section.field": value}."""
    from experiments import gpt2_small  # pylint: disable=import-outside-toplevel
    config = gpt2_small.get_config("tiny")
    config.lm.checkpoint, config.lm.tokens = tiny
    config.lm.hook = HOOK
    return configs.apply_overrides(config, overrides)


def test_on_the_fly_lm_source_gives_the_stores_batches(tiny, tmp_path):
    """`data.source=lm` and a store harvested with the same chunking (and the same default
    exclusion of the first position and the special tokens) stream the same rows."""
    stores = tmp_path / "stores"
    batch_sequences = 8
    # The lm source's chunk: a forward batch of sequences less their first position.
    _run("saejax.harvest", *[f for f in _harvest_flags(tiny, stores) if "chunk_rows" not in f],
         f"--hooks={HOOK}", f"--batch_sequences={batch_sequences}",
         f"--chunk_rows={batch_sequences * (tiny_lm.CONTEXT - 1)}")
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    common = {"lm.batch_sequences": batch_sequences, "evals.loss_recovered_sequences": HOLDOUT}
    from saejax import data  # pylint: disable=import-outside-toplevel
    sources = [data.make_source(_tiny_config(tiny, **common, **{"data.source": source,
                                                                "data.path": str(stores / HOOK)}),
                                mesh=mesh, rules=_tiny_config(tiny).sharding_rules)
               for source in ("lm", "store")]
    assert sources[0].rows.n_rows == sources[1].rows.n_rows
    assert sources[0].rows.chunk_rows == sources[1].rows.chunk_rows
    np.testing.assert_allclose(sources[0].rows.read(97, 700).result(),
                               sources[1].rows.read(97, 700).result(), rtol=1e-5, atol=1e-5)
    for _ in range(3):
        a, b = (s.next_batch() for s in sources)
        # Both name their batch's one entry by the hook: lm.hook, and the store's metadata.
        assert list(a) == list(b) == [HOOK]
        np.testing.assert_allclose(np.asarray(a[HOOK]), np.asarray(b[HOOK]), rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(np.asarray(sources[0].eval_batch(1)[HOOK]),
                               np.asarray(sources[1].eval_batch(1)[HOOK]), rtol=1e-5, atol=1e-5)
    for source in sources:
        source.close()


def test_a_user_npy_array_trains(tiny, tmp_path):
    rows = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    np.save(tmp_path / "acts.npy", rows)
    config = _tiny_config(tiny, **{"data.source": "npy", "data.path": str(tmp_path / "acts.npy"),
                                   "data.npy_chunk_rows": 512, "evals.loss_recovered_sequences": 0,
                                   "train.steps": 20})
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["step"] == 20 and np.isfinite(summary["fvu"])


@pytest.mark.parametrize("overrides, message", [
    ({"data.d": 32, "data.source": "lm"},
     r"lm.checkpoint=.* has width n_embd=64 but data.d=32; set --config.data.d=64"),
    ({"data.source": "lm", "lm.hook": "blocks.7.hook_resid_post"},
     r"lm.hook='blocks.7.hook_resid_post' is not a hook point .* \(2 layers\)"),
    ({"data.source": "store", "data.path": ""}, r"data.source='store' needs data.path"),
    ({"data.source": "store", "data.path": "/nonexistent/store"},
     r"data.path='/nonexistent/store' does not exist"),
    ({"data.source": "lm", "lm.checkpoint": ""}, r"data.source='lm' needs lm.checkpoint"),
    ({"data.source": "npy", "lm.tokens": "", "data.path": "HERE"},
     r"evals.loss_recovered_sequences=16 needs lm.tokens: .* or set "
     r"--config.evals.loss_recovered_sequences=0"),
    ({"data.source": "lm", "evals.loss_recovered_sequences": 100_000},
     r"evals.loss_recovered_sequences=100000 but lm.tokens=.* holds only \d+ sequences"),
])
def test_bad_lm_and_store_inputs_name_the_field(tiny, tmp_path, overrides, message):
    if overrides.get("data.path") == "HERE":
        np.save(tmp_path / "acts.npy", np.zeros((4096, 64), np.float32))
        overrides = {**overrides, "data.path": str(tmp_path / "acts.npy")}
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(_tiny_config(tiny, **overrides), str(tmp_path / "run"))


def test_a_store_of_the_wrong_width_is_refused_before_training(tiny, tmp_path):
    writer = store.ActivationStoreWriter.create_or_open(
        str(tmp_path / "s"), d=32, dtype="float32", context_length=32, n_tokens=1024,
        chunk_rows=256)
    writer.write(0, np.zeros((1024, 32), np.float32), np.zeros((1024,), np.int32))
    config = _tiny_config(tiny, **{"data.path": str(tmp_path / "s")})
    with pytest.raises(store.StoreError, match=r"d=32 but data.d=64"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stores_of_one_harvest_read_in_lockstep_and_train_a_transcoder(tiny, tmp_path):
    """`data.path=A,B` reads the stores of several hooks of one harvest as one stream keyed by
    hook: the same rows at every hook (block 0's output is block 1's input, so those two
    entries are equal batch for batch, after a restore too), a transcoder trains from the MLP's
    input and output stores, and a store of another harvest is refused."""
    from saejax import data, harvest  # pylint: disable=import-outside-toplevel
    checkpoint, text = tiny
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.ln2.hook_normalized",
             "blocks.1.hook_mlp_out"]
    stores = harvest.harvest(checkpoint, text, str(tmp_path / "stores"), hooks=hooks,
                             context_length=tiny_lm.CONTEXT, batch_sequences=16,
                             holdout_sequences=HOLDOUT, chunk_rows=256)["stores"]
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    rules = _tiny_config(tiny).sharding_rules
    config = _tiny_config(tiny, **{"data.source": "store", "data.path": ",".join(
        stores[h] for h in hooks[:2]), "sae.shape": "transcoder", "sae.input_hook": hooks[0],
        "sae.target_hook": hooks[1]})
    assert data.batch_hooks(config) == tuple(hooks[:2])
    source = data.make_source(config, mesh=mesh, rules=rules)
    assert source.widths == {hooks[0]: 64, hooks[1]: 64}
    for _ in range(3):
        batch = source.next_batch()
        assert list(batch) == hooks[:2]
        np.testing.assert_array_equal(np.asarray(batch[hooks[0]]), np.asarray(batch[hooks[1]]))
    saved, expected = source.state(), source.next_batch()
    source.restore(saved)
    np.testing.assert_array_equal(np.asarray(source.next_batch()[hooks[1]]),
                                  np.asarray(expected[hooks[1]]))
    source.close()

    transcoder = configs.apply_overrides(config, {
        "data.path": f"{stores[hooks[2]]},{stores[hooks[3]]}", "sae.input_hook": hooks[2],
        "sae.target_hook": hooks[3], "sae.architecture": "relu",
        "evals.loss_recovered_sequences": HOLDOUT, "train.steps": 60, "train.log_every": 20,
        "train.checkpoint_every": 60})
    summary = train.train_and_evaluate(transcoder, str(tmp_path / "transcoder"))
    assert summary["shape"] == "transcoder" and np.isfinite(summary["fvu"])
    # The transcoder replaces the MLP's output in the LM: loss recovered and KL as for an SAE.
    assert summary["ce_clean"] < summary["ce_zero_ablation"]
    assert np.isfinite(summary["loss_recovered"]) and summary["kl_sae"] >= 0

    # Spliced in, a transcoder whose output is zero is the zero ablation of the MLP's output;
    # one whose output is the clean activation of its input hook, where that is the target's
    # own value (block 0's output is block 1's input), changes nothing.
    from saejax.evals import downstream  # pylint: disable=import-outside-toplevel
    model = lm.from_checkpoint(checkpoint, hooks[3])
    tokens = lm.split(transcoder.lm, model, HOLDOUT)[1]
    zero, = downstream.evaluate(model, tokens, batch_sequences=8, mesh=mesh,
                                input_hook=hooks[2], reconstruct=lambda p, x: x * p,
                                sae_params=[0.0])
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_sae"] == pytest.approx(zero["kl_zero_ablation"], rel=1e-5)
    same, = downstream.evaluate(lm.from_checkpoint(checkpoint, hooks[1]), tokens,
                                batch_sequences=8, mesh=mesh, input_hook=hooks[0],
                                reconstruct=lambda p, x: x * p, sae_params=[1.0])
    assert same["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert same["kl_sae"] == pytest.approx(0.0, abs=1e-5)

    other = harvest.harvest(checkpoint, text, str(tmp_path / "other"), hooks=hooks[3:],
                            context_length=tiny_lm.CONTEXT, batch_sequences=16,
                            holdout_sequences=HOLDOUT + 8, chunk_rows=256)["stores"]
    mixed = configs.apply_overrides(config, {"data.path": f"{stores[hooks[2]]},{other[hooks[3]]}",
                                             "sae.input_hook": hooks[2],
                                             "sae.target_hook": hooks[3]})
    with pytest.raises(store.StoreError, match=r"must come from one harvest"):
        data.make_source(mixed, mesh=mesh, rules=rules)


def test_the_lm_source_with_several_hooks_is_one_forward_in_lockstep(tiny):
    """`lm.hook=a,b` runs the LM once per chunk for both hooks: each batch holds the same
    tokens at both (block 0's output is block 1's input: equal entries), and each entry is the
    batch the single-hook source gives for that hook."""
    from saejax import data  # pylint: disable=import-outside-toplevel
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre")
    mesh = jax.make_mesh((8, 1), ("data", "model"))
    common = {"data.source": "lm", "lm.batch_sequences": 8,
              "evals.loss_recovered_sequences": HOLDOUT}
    both = _tiny_config(tiny, **common, **{"lm.hook": ",".join(hooks), "sae.shape": "transcoder",
                                           "sae.input_hook": hooks[0],
                                           "sae.target_hook": hooks[1]})
    assert data.batch_hooks(both) == hooks
    source = data.make_source(both, mesh=mesh, rules=both.sharding_rules)
    alone = data.make_source(_tiny_config(tiny, **common, **{"lm.hook": hooks[1]}), mesh=mesh,
                             rules=both.sharding_rules)
    assert source.widths == {hooks[0]: 64, hooks[1]: 64}
    for _ in range(2):
        batch, single = source.next_batch(), alone.next_batch()
        assert list(batch) == list(hooks)
        np.testing.assert_allclose(np.asarray(batch[hooks[0]]), np.asarray(batch[hooks[1]]),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(batch[hooks[1]]), np.asarray(single[hooks[1]]),
                                   rtol=1e-5, atol=1e-5)
    source.close()
    alone.close()


def test_a_clt_run_reports_its_replacement_models_loss_recovered(tiny, tmp_path):
    """A CLT over both layers of the tiny model, trained from the `lm` source with the four
    hooks: summary.json holds its replacement model's loss recovered and KL (both MLP outputs
    replaced at once, against zero-ablating both), and they are what
    `downstream.evaluate_replacement` gives for the saved params."""
    from saejax.evals import downstream  # pylint: disable=import-outside-toplevel
    from saejax.sae import clt  # pylint: disable=import-outside-toplevel
    hooks = [f"blocks.{l}.{h}" for l in (0, 1) for h in ("ln2.hook_normalized", "hook_mlp_out")]
    config = _tiny_config(tiny, **{
        "data.source": "lm", "lm.hook": ",".join(hooks), "lm.batch_sequences": 8,
        "sae.shape": "clt", "sae.layers": "0,1", "sae.expansion_factor": 1, "sae.k": 4,
        "sae.k_aux": 8, "train.batch_size": 128, "train.steps": 20, "train.log_every": 10,
        "train.checkpoint_every": 20, "evals.loss_recovered_sequences": HOLDOUT})
    summary = train.train_and_evaluate(config, str(tmp_path / "clt"))
    assert summary["shape"] == "clt"
    assert summary["ce_clean"] < summary["ce_zero_ablation"]
    assert np.isfinite(summary["loss_recovered"]) and summary["kl_sae"] >= 0

    saved = train.load_params(str(tmp_path / "clt"))
    architecture = __import__("saejax").sae.from_config(config.sae)
    scale = saved.pop("input_scale")
    model = lm.from_checkpoint(config.lm.checkpoint, hooks[-1])
    tokens = lm.split(config.lm, model, HOLDOUT)[1]
    again, = downstream.evaluate_replacement(
        model, tokens, batch_sequences=8, mesh=jax.make_mesh((8, 1), ("data", "model")),
        input_hooks=hooks[::2], output_hooks=hooks[1::2],
        encode=lambda p, l, x: clt.encode_layer(architecture, p, x * scale, l, config.sae),
        decode=lambda p, f, m: architecture.shape.decode_layer(
            p, jax.numpy.stack(f, -2), m) / scale,
        clt_params=[saved], keep=lm.keep_mask(tokens, *lm.exclusion(config.lm, model)))
    for key in ("loss_recovered", "kl_sae", "ce_sae", "ce_zero_ablation"):
        assert summary[key] == pytest.approx(again[key], rel=1e-4, abs=1e-6), key
