"""A config that cannot work fails at start, naming the field and the fix."""

import json
import re

import pytest

from conftest import toy_config
from saejax import sae, train
from saejax.sharding import ConfigError

CASES = [
    ({"mesh.model": 8, "data.d": 6, "sae.expansion_factor": 1},
     r"n_latents=6 .*not divisible by mesh.model=8.*Choose mesh.model among the divisors"),
    ({"mesh.data": 8, "mesh.model": 1, "train.batch_size": 12},
     r"train.batch_size=12 is not divisible by mesh.data=8"),
    ({"sae.l1_coefficient": -1.0}, r"sae.l1_coefficient=-1.0 is negative"),
    ({"optim.warmup_steps": -5}, r"optim.warmup_steps=-5 is negative"),
    ({"optim.learning_rate": -1e-3}, r"optim.learning_rate=-0.001 must be > 0"),
    ({"sae.architecture": "topk", "sae.k": 5000},
     r"sae.k=5000 must be between 1 and n_latents=1024.*lower sae.k"),
    ({"sae.architecture": "topk", "sae.k": 8, "sae.k_anneal_steps": 100,
      "sae.k_anneal_start": 8}, r"sae.k_anneal_start=8 must be above sae.k=8"),
    ({"sae.k_anneal_steps": 100}, r"sae.architecture='relu' has none: set it to 0"),
    ({"sae.architecture": "transcoder"},
     r"sae.architecture='transcoder' is not known; choose one of "
     + re.escape(str(sorted(sae.ARCHITECTURES)))),
    ({"sae.architecture": "jumprelu", "sae.jumprelu_bandwidth": 0.0},
     r"sae.jumprelu_bandwidth=0.0 must be > 0"),
    ({"mesh.data": 3, "mesh.model": 2}, r"mesh.data=3 x mesh.model=2 needs 6 devices but 8"),
    ({"mesh.data": -1, "mesh.model": 3}, r"mesh.model=3 does not divide the 8 available"),
    ({"data.source": "hub"}, r"data.source='hub' is not known"),
    ({"optim.decay": "exp"}, r"optim.decay='exp' is not known"),
    ({"train.batch_size": 0}, r"train.batch_size=0 must be a positive integer"),
    ({"evals.dead_window_tokens": 0}, r"evals.dead_window_tokens=0 must be a positive integer"),
    ({"resample.every_steps": 100}, r"resample.every_steps=100 with resample.until_step=0 never"),
    ({"sae.architecture": "topk", "group.sparsity_coefficients": (0.1, 0.2)},
     r"group.sparsity_coefficients=\(0.1, 0.2\) needs an architecture with a sparsity "),
    ({"group.sparsity_coefficients": (0.1, 0.1)}, r"must be >= 0 and distinct"),
    ({"sharding_rules": (("batch", "data"), ("latent", "tensor"))},
     r"`latent` to `model` \(or None\)"),
]


@pytest.mark.parametrize("overrides,message", CASES)
def test_bad_config_fails_at_start_with_its_field(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(toy_config(**overrides), str(workdir))
    assert not (workdir / "checkpoints").exists()


def test_resuming_with_another_config_is_refused_and_keeps_the_run(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(toy_config(**{"train.steps": 2, "train.log_every": 1}), workdir)
    before = open(f"{workdir}/config.json").read()
    with pytest.raises(ConfigError, match=r"sae.l1_coefficient=0.6 there, 0.5 now"):
        train.train_and_evaluate(toy_config(**{"train.steps": 2, "sae.l1_coefficient": 0.5}),
                                 workdir)
    assert open(f"{workdir}/config.json").read() == before


def test_l1_warmup_steps_is_an_alias_and_an_old_workdir_with_it_resumes(tmp_path):
    config = toy_config(**{"optim.l1_warmup_steps": 2})
    assert config.optim.sparsity_warmup_steps == 2
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(toy_config(**{"train.steps": 2, "optim.l1_warmup_steps": 2}),
                             workdir)
    # A config.json written before the rename has only the old name.
    path = f"{workdir}/config.json"
    old = json.load(open(path))
    del old["optim"]["sparsity_warmup_steps"]
    json.dump(old, open(path, "w"))
    summary = train.train_and_evaluate(
        toy_config(**{"train.steps": 3, "optim.sparsity_warmup_steps": 2}), workdir)
    assert summary["step"] == 3
    with pytest.raises(ConfigError, match=r"optim.sparsity_warmup_steps=2 there, 3 now"):
        train.train_and_evaluate(toy_config(**{"train.steps": 3,
                                               "optim.l1_warmup_steps": 3}), workdir)
