"""The replacement model of a cross-layer transcoder (`downstream.evaluate_replacement`) on the
real SmolLM2-135M, against transformers' own model with its MLPs hooked in torch: every MLP
output of layers 2 and 3 replaced at once, each encoder reading the replaced stream. And a
crosscoder's loss recovered (`downstream.evaluate_hooks`): the residual streams of layers 1-3
replaced at once, and each alone, by their parts of one code encoded from the clean pass,
against transformers with those layers' outputs hooked.

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
from saejax import configs, models, sae  # noqa: E402
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


class _HookedSmolLM2:
    """transformers' SmolLM2 over `tokens`, run with torch forward hooks; what a subclass's
    clean pass gives (`self.clean`, log-probabilities) is what KL is taken against."""

    def __init__(self, directory, tokens, keep):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32).eval()
        self.ids, self.keep = torch.from_numpy(tokens).long(), torch.from_numpy(keep)[..., None]
        self.clean = None

    def _log_probs(self, hooks: dict):
        """float64 log-probabilities with `hooks` ({module: fn(module, inputs, output)})
        registered as forward hooks for this pass only."""
        handles = [module.register_forward_hook(f) for module, f in hooks.items()]
        try:
            with torch.no_grad():
                return torch.log_softmax(self.model(self.ids).logits.double(), -1)
        finally:
            for handle in handles:
                handle.remove()

    def _ce_kl(self, log_p):
        """(mean next-token CE, mean KL against the clean pass) of `log_p`."""
        ce = -log_p[:, :-1].gather(-1, self.ids[:, 1:, None])[..., 0]
        kl = (self.clean.exp() * (self.clean - log_p)).sum(-1)[:, :-1]
        return float(ce.mean()), float(kl.mean())


class TorchReference(_HookedSmolLM2):
    """transformers' SmolLM2 with the MLPs of LAYERS replaced by the stand-in CLT in torch
    forward hooks; the clean pass (its logits and MLP inputs) runs once."""

    def __init__(self, directory, tokens, keep):
        super().__init__(directory, tokens, keep)
        self.clean_inputs = {}
        self.clean = self._run(lambda m, inputs, output, i: self.clean_inputs.__setitem__(
            i, inputs[0]))

    def _run(self, hook):
        """`hook(module, inputs, output, i)` at the MLP of LAYERS[i]."""
        return self._log_probs({self.model.model.layers[l].mlp:
                                lambda m, inputs, output, i=i: hook(m, inputs, output, i)
                                for i, l in enumerate(LAYERS)})

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

        return self._ce_kl(self._run(replace))


def _smollm2(hook):
    """(checkpoint directory, the model at `hook`, token ids [SEQUENCES, CONTEXT] of Hamlet,
    keep mask leaving positions 0 and 1 out)."""
    directory = os.path.dirname(asset("smollm2", "config.json", what="SmolLM2-135M"))
    model = lm.from_checkpoint(directory, hook)
    text = open(asset("shakespeare", "hamlet.txt", what="Shakespeare")).read()[:20_000]
    ids = models.load_tokenizer(directory).encode(text).ids
    tokens = np.asarray(ids[:SEQUENCES * CONTEXT], np.int32).reshape(SEQUENCES, CONTEXT)
    return directory, model, tokens, lm.keep_mask(tokens, (0, 1), ())


def test_replacement_model_on_smollm2_matches_transformers():
    directory, model, tokens, keep = _smollm2(OUTPUTS[-1])
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


CROSSCODER_LAYERS = (1, 2, 3)
CROSSCODER_HOOKS = tuple(f"blocks.{l}.hook_resid_post" for l in CROSSCODER_LAYERS)


def _crosscoder_params(d, shrink, seed=0):
    """A ReLU crosscoder's params over the three hooks whose reconstruction is `shrink` times
    its input plus a random b_dec: latents [x, -x] (relu(x) - relu(-x) = x) with a random
    latent bias, which only moves the code, decoded by `shrink` times [I; -I]."""
    width = len(CROSSCODER_HOOKS) * d
    rng = np.random.default_rng(seed)
    eye = np.eye(width, dtype=np.float32)
    return {"W_enc": np.concatenate([eye, -eye], 1),
            "b_enc": np.zeros(2 * width, np.float32),
            "W_dec": np.concatenate([eye, -eye], 0) * np.float32(shrink),
            "b_dec": rng.standard_normal(width, np.float32) * np.float32(0.05)}


class TorchCrosscoder(_HookedSmolLM2):
    """transformers' SmolLM2 with the outputs of CROSSCODER_LAYERS (their residual streams)
    replaced in torch forward hooks by a ReLU crosscoder's reconstruction of the clean ones."""

    def __init__(self, directory, tokens, keep):
        super().__init__(directory, tokens, keep)
        captured = {}
        self.clean = self._run({l: lambda output, l=l: captured.setdefault(l, output)
                                for l in CROSSCODER_LAYERS})
        self.captured = [captured[l] for l in CROSSCODER_LAYERS]

    def _run(self, replace):
        """`replace[l](output)` at the output of decoder layer l."""
        return self._log_probs({self.model.model.layers[l]:
                                lambda m, inputs, output, f=f: f(output)
                                for l, f in replace.items()})

    def reconstruction(self, params, scale):
        t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
        x = torch.cat([c * float(s) for c, s in zip(self.captured, scale)], -1)
        x_hat = torch.relu(x @ t(params["W_enc"]) + t(params["b_enc"])) @ t(params["W_dec"])
        parts = torch.chunk(x_hat + t(params["b_dec"]), len(CROSSCODER_LAYERS), -1)
        return [p / float(s) for p, s in zip(parts, scale)]

    def losses(self, parts, layers):
        """(mean CE, mean KL against the clean model) with the outputs of `layers` replaced
        by their `parts` (a list per CROSSCODER_LAYERS, None: zero-ablated)."""
        def replace(i):
            return lambda output: torch.where(
                self.keep, torch.zeros_like(output) if parts is None else parts[i], output)
        return self._ce_kl(self._run({l: replace(CROSSCODER_LAYERS.index(l)) for l in layers}))


def test_crosscoder_loss_recovered_on_smollm2_matches_transformers():
    directory, model, tokens, keep = _smollm2(CROSSCODER_HOOKS[-1])
    sae_config = configs.base_config().sae
    sae_config.update({"architecture": "relu", "shape": "crosscoder",
                       "hooks": ",".join(CROSSCODER_HOOKS)})
    architecture = sae.from_config(sae_config)
    d = model.config.d_model
    scale = np.asarray([0.1, 0.05, 0.02], np.float32)  # each hook's own input scale
    params = _crosscoder_params(d, shrink=0.8)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    (got,) = downstream.evaluate_hooks(
        model, tokens, hooks=CROSSCODER_HOOKS, batch_sequences=SEQUENCES, mesh=mesh, keep=keep,
        reconstruct=downstream.joint_reconstruct(architecture, sae_config),
        sae_params=[(params, scale)])
    per_hook = [f"/{h}" for h in CROSSCODER_HOOKS]
    assert f"ce_clean{per_hook[0]}" not in got
    for suffix in ("", *per_hook):
        assert 0.0 < got[f"loss_recovered{suffix}"] < 1.0, (suffix, got)

    ref = TorchCrosscoder(directory, tokens, keep)
    parts = ref.reconstruction(params, scale)
    for suffix, layers in (("", CROSSCODER_LAYERS),
                           *((f"/{h}", (l,)) for h, l in zip(CROSSCODER_HOOKS, CROSSCODER_LAYERS))):
        close = lambda value: pytest.approx(value, rel=1e-5, abs=2e-5)  # KL of ~9 nats: rel
        zero_ce, zero_kl = ref.losses(None, layers)
        ce, kl = ref.losses(parts, layers)
        assert got[f"ce_zero_ablation{suffix}"] == close(zero_ce), suffix
        assert got[f"kl_zero_ablation{suffix}"] == close(zero_kl), suffix
        assert got[f"ce_sae{suffix}"] == close(ce), suffix
        assert got[f"kl_sae{suffix}"] == close(kl), suffix
        assert kl > 1e-3, suffix
