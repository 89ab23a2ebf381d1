"""Hook groups (`group.hooks`): SAEs at several hooks, and several sparsity coefficients per hook,
trained in one run from one stream holding every hook's rows of the same tokens (stores of one
harvest read in lockstep, or one LM forward per chunk). Each member equals the single-hook run
it stands for, its folder is laid out like that run's workdir, and the group resumes."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import toy_config
from benchmarks import common as bench
from saejax import groups, sharding, train
from saejax.data import store
from saejax.errors import ConfigError

D = 16
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
# A small run on a 4 x 2 mesh with a mid-run checkpoint to resume from; normalize_inputs gives
# each hook its own input scale (the stores differ in scale).
COMMON = {"data.source": "store", "data.d": D, "train.steps": 12, "train.batch_size": 64,
          "train.log_every": 4, "train.checkpoint_every": 6, "data.normalize_inputs": True,
          "evals.eval_batches": 2, "mesh.model": 2}


def _relative_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


def _assert_same_params(member_dir, solo_dir, tol=1e-5):
    member, alone = train.load_params(str(member_dir)), train.load_params(str(solo_dir))
    assert set(member) == set(alone)
    for key in alone:
        assert _relative_error(member[key], alone[key]) < tol, (key, member_dir)


def _assert_same_summary(member, solo, rtol=1e-4):
    assert {k for k in member if k != "train_seconds"} == {k for k in solo if k != "train_seconds"}
    for key, value in solo.items():
        if isinstance(value, float) and key != "train_seconds":
            np.testing.assert_allclose(member[key], value, rtol=rtol, atol=1e-6, err_msg=key)
        elif key != "train_seconds":
            assert member[key] == value, key


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of one 'harvest' (the same tokens), hooks of different scales."""
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    n = 4096
    tokens = rng.integers(0, 100, n).astype(np.int32)
    out = []
    for i, hook in enumerate(HOOKS):
        writer = store.ActivationStoreWriter.create_or_open(
            str(root / hook), d=D, dtype="float32", context_length=16, n_tokens=n,
            chunk_rows=256, metadata={"hook": hook})
        scale = (1 + 3 * i) * rng.random((1, D)).astype(np.float32)
        writer.write(0, rng.standard_normal((n, D)).astype(np.float32) * scale, tokens)
        out.append(str(root / hook))
    return out


def test_a_hook_group_from_stores_equals_single_hook_runs_and_resumes(stores, tmp_path):
    """2 hooks x 2 coefficients from `data.path=A,B`: a member's params, metrics and summary
    are the single-store run's; its folder holds that run's config; killed after the step-6
    checkpoint and run again, the group finishes with the same members."""
    config = toy_config(**COMMON, **{"data.path": ",".join(stores), "group.hooks": ",".join(HOOKS),
                                     "group.sparsity_coefficients": (0.3, 1.2)})
    workdir = tmp_path / "group"
    summary = train.train_and_evaluate(config, str(workdir))
    names = [f"{hook}_l1-{c}" for hook in HOOKS for c in ("0.3", "1.2")]
    assert list(summary["members"]) == names
    assert sorted(os.listdir(workdir / "members")) == names
    # The member at the second hook, first coefficient, against the run that trains it alone.
    name = names[2]
    member_dir = workdir / "members" / name
    solo = train.train_and_evaluate(
        toy_config(**COMMON, **{"data.path": stores[1], "sae.l1_coefficient": 0.3}),
        str(tmp_path / "solo"))
    assert solo["hook"] == HOOKS[1] == summary["members"][name]["hook"]
    _assert_same_params(member_dir, tmp_path / "solo")
    _assert_same_summary(summary["members"][name], solo)
    assert json.loads((member_dir / "summary.json").read_text()) == summary["members"][name]
    member_config = json.loads((member_dir / "config.json").read_text())
    assert member_config["data"]["path"] == stores[1] and member_config["group"]["hooks"] == ""
    assert member_config["sae"]["l1_coefficient"] == 0.3
    for member_line, solo_line in zip(*(
            [json.loads(line) for line in open(d / "metrics.jsonl")]
            for d in (member_dir, tmp_path / "solo"))):
        for key in ("step", "loss", "mse", "l0", "fvu"):
            np.testing.assert_allclose(member_line[key], solo_line[key], rtol=1e-4, atol=1e-7)
    # Each hook's SAE normalises its own inputs.
    scales = [float(train.load_params(str(workdir / "members" / n))["input_scale"])
              for n in names]
    assert scales[0] == scales[1] != scales[2] == scales[3]

    # A kill after the step-6 checkpoint: the newer one is lost; the same command resumes.
    finished = {n: train.load_params(str(workdir / "members" / n)) for n in names}
    shutil.rmtree(workdir / "checkpoints" / "12")
    resumed = train.train_and_evaluate(config, str(workdir))
    for n in names:
        params = train.load_params(str(workdir / "members" / n))
        for key, value in finished[n].items():
            np.testing.assert_allclose(params[key], value, rtol=1e-6, atol=1e-7)
        steps = [json.loads(line)["step"] for line in open(workdir / "members" / n /
                                                            "metrics.jsonl")]
        assert steps == [4, 8, 12], steps
    _assert_same_summary(resumed["members"][name], solo)


def test_a_hook_group_from_one_lm_forward_equals_single_hook_runs(tmp_path):
    """`lm.hook=a,b` with `group.hooks=a,b`: one forward per chunk feeds both SAEs; each equals
    the run with `lm.hook` its hook alone, loss recovered (spliced in at its own hook)
    included."""
    checkpoint, _ = bench.write_random_gpt2(str(tmp_path), vocab_size=64, n_embd=D, n_layer=2,
                                            n_head=2, n_positions=64, used_layers=2)
    tokens = bench.write_random_tokens(str(tmp_path / "tokens.npy"), sequences=96,
                                       context_length=16, vocab_size=64)
    lm_common = {**COMMON, "data.source": "lm", "lm.checkpoint": checkpoint, "lm.tokens": tokens,
                 "lm.context_length": 16, "lm.batch_sequences": 8, "train.steps": 8,
                 "train.checkpoint_every": 8, "train.log_every": 8, "evals.eval_batches": 1,
                 "data.normalize_inputs": False, "evals.loss_recovered_sequences": 8}
    group = train.train_and_evaluate(
        toy_config(**lm_common, **{"lm.hook": ",".join(HOOKS), "group.hooks": ",".join(HOOKS)}),
        str(tmp_path / "group"))
    assert list(group["members"]) == list(HOOKS)
    solo = train.train_and_evaluate(toy_config(**lm_common, **{"lm.hook": HOOKS[0]}),
                                    str(tmp_path / "solo"))
    # The forward that stops after block 0 and the one that runs block 1 too agree to float
    # rounding; so do the SAEs trained on them.
    _assert_same_params(tmp_path / "group" / "members" / HOOKS[0], tmp_path / "solo", tol=1e-4)
    _assert_same_summary(group["members"][HOOKS[0]], solo, rtol=1e-3)
    assert group["members"][HOOKS[0]]["ce_sae"] != group["members"][HOOKS[1]]["ce_sae"]
    member_config = json.loads((tmp_path / "group" / "members" / HOOKS[1] /
                                "config.json").read_text())
    assert member_config["lm"]["hook"] == HOOKS[1]


def _run_steps(config, mesh, batches):
    with sharding.activate(mesh, config.sharding_rules):
        batch_sharding = jax.sharding.NamedSharding(
            mesh, sharding.logical_to_spec(("batch", "embed"), config.sharding_rules))
        trainer = train.make_trainer(config, mesh, d=D, batch_sharding=batch_sharding)
        state = trainer.init(jax.random.PRNGKey(0))
        for batch in batches:
            state, metrics = trainer.train_step(
                state, {h: jax.device_put(x, batch_sharding) for h, x in batch.items()})
        return jax.device_get(state), jax.device_get(metrics)


def test_a_sharded_vmapped_hook_group_equals_single_device_single_hook_steps(stores):
    """The group's step vmapped over hooks and coefficients on a 2 x 4 mesh (the dictionary
    split over `model`) against each member's own step on one device: the same params and
    metrics."""
    config = toy_config(**{**COMMON, "data.path": ",".join(stores), "group.hooks": ",".join(HOOKS),
                           "group.sparsity_coefficients": (0.3, 1.2), "group.vectorize": "vmap",
                           "mesh.model": 4})
    rng = np.random.default_rng(1)
    batches = [{h: rng.standard_normal((64, D)).astype(np.float32) * (i + 1)
                for i, h in enumerate(HOOKS)} for _ in range(3)]
    state, metrics = _run_steps(config, sharding.make_mesh(config.mesh), batches)
    members = groups.members(config)
    assert members.size == 4 and state["params"]["W_enc"].shape == (2, 2, D, 4 * D)
    for i in (1, 2):  # (hook 0, coefficient 1.2) and (hook 1, coefficient 0.3)
        hook, coefficient = members.hook(i), members.coefficient(i)
        solo_config = toy_config(**{**COMMON, "data.path": stores[HOOKS.index(hook)],
                                    "sae.l1_coefficient": coefficient, "mesh.data": 1,
                                    "mesh.model": 1})
        solo_state, solo_metrics = _run_steps(
            solo_config, sharding.make_mesh(solo_config.mesh, jax.devices()[:1]),
            [{hook: b[hook]} for b in batches])
        member = members.state(state, i)
        for key in solo_state["params"]:
            assert _relative_error(member["params"][key], solo_state["params"][key]) < 1e-5, key
        for key in ("loss", "mse", "fvu", "l0"):
            np.testing.assert_allclose(members.pick(metrics[key], i), solo_metrics[key],
                                       rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, match", [
    ({"group.hooks": "blocks.0.hook_resid_post,blocks.7.hook_mlp_out"},
     r"\['blocks.7.hook_mlp_out'\] are not hooks of the batches .* name every hook in data.path"),
    ({"group.hooks": "blocks.0.hook_resid_post,blocks.0.hook_resid_post"}, "names a hook twice"),
    ({"sae.shape": "transcoder", "sae.input_hook": HOOKS[0], "sae.target_hook": HOOKS[1]},
     r"sae.shape='transcoder' reads several hooks at once"),
    ({"group.member_workdirs": ("/a", "/b")}, r"2 folders for 4 members \(2 group.hooks x 2"),
])
def test_hook_group_configs_that_cannot_work_are_refused(stores, overrides, match):
    from saejax import validation  # pylint: disable=import-outside-toplevel
    config = toy_config(**COMMON, **{"data.path": ",".join(stores), "group.hooks": ",".join(HOOKS),
                                     "group.sparsity_coefficients": (0.3, 1.2), **overrides})
    with pytest.raises(ConfigError, match=match):
        validation.validate(config, 8)


def test_a_hook_group_needs_an_lm_or_stores():
    from saejax import validation  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match=r"data.source='synthetic' is neither"):
        validation.validate(toy_config(**{"group.hooks": "activations"}), 8)
