"""Synthetic activations with known ground-truth features (a toy model of superposition).

The recipe of Sharkey et al. 2022, "Taking features out of superposition with sparse
autoencoders" (replicated by Cunningham et al. 2023): G unit feature directions in d dimensions;
feature probabilities correlated through a random correlation matrix and decaying with the
feature index; each active feature gets a U[0, 1) coefficient; x = codes @ features, no noise.

The ground truth is fixed by `data.seed` (built on the host with NumPy, so it is the same on
any mesh); batch i is a pure function of (seed, i), generated on the devices already sharded, so
the data position is just the batch index.

`SyntheticTranscoderSource` (`data.source="synthetic_transcoder"`) is the same sparse code
written twice, through the features into hook `activations_in` and through a second set of
unit directions into hook `activations_out`: a transcoder's ground truth is the second set (its
decoder's rows), reached from the first.

`SyntheticCrosscoderSource` (`data.source="synthetic_crosscoder"`) writes the same sparse code
through one set of unit directions per layer into hooks `layer_0`, `layer_1`, ...
(`data.n_layers` of them): a crosscoder's ground truth is each feature's directions at every
layer together, one row of the concatenated decoder.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from saejax import sharding


class GroundTruth(NamedTuple):
    features: np.ndarray               # [n_features, d], unit rows
    correlation_cholesky: np.ndarray   # [n_features, n_features], lower triangular
    frequency_decay: np.ndarray        # [n_features], decay ** i


def random_correlation_matrix(rng: np.random.Generator, n: int) -> np.ndarray:
    """U[0, 1] entries, symmetrised, shifted to be positive definite, scaled to unit diagonal."""
    m = rng.uniform(0.0, 1.0, size=(n, n))
    m = (m + m.T) / 2
    min_eig = np.linalg.eigvalsh(m)[0]
    m = m + (max(0.0, -min_eig) + 1e-3) * np.eye(n)
    scale = 1.0 / np.sqrt(np.diag(m))
    return m * scale[:, None] * scale[None, :]


def make_ground_truth(*, seed: int, d: int, n_features: int, correlated: bool,
                      frequency_decay: float) -> GroundTruth:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_features, d))
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    if correlated:
        chol = np.linalg.cholesky(random_correlation_matrix(rng, n_features))
    else:
        chol = np.eye(n_features)
    decay = float(frequency_decay) ** np.arange(n_features)
    return GroundTruth(features.astype(np.float32), chol.astype(np.float32),
                       decay.astype(np.float32))


def sample(ground_truth: GroundTruth, key: jax.Array, batch_size: int,
           features_per_sample: float) -> tuple[jax.Array, jax.Array]:
    """One batch: activations `[batch, d]` and their true sparse codes `[batch, n_features]`."""
    features, chol, decay = (jnp.asarray(a) for a in ground_truth)
    n_features = features.shape[0]
    k_z, k_active, k_magnitude, k_fallback = jax.random.split(key, 4)
    z = jax.random.normal(k_z, (batch_size, n_features)) @ chol.T
    p = jax.scipy.stats.norm.cdf(z) * decay
    p = jnp.clip(p * (features_per_sample / n_features) / jnp.mean(p), 0.0, 1.0)
    active = jax.random.uniform(k_active, p.shape) < p
    codes = jnp.where(active, jax.random.uniform(k_magnitude, p.shape), 0.0)
    # A sample with no active feature gets one, chosen uniformly, at 1.0.
    fallback = jax.nn.one_hot(jax.random.randint(k_fallback, (batch_size,), 0, n_features),
                              n_features)
    codes = jnp.where(jnp.any(active, axis=-1, keepdims=True), codes, fallback)
    return codes @ features, codes


class SyntheticSource:
    """Batches of synthetic activations, sharded over the mesh; position = batches consumed."""

    def __init__(self, data_config, *, batch_size: int, mesh, rules):
        self.config = data_config
        self.d = int(data_config.d)
        self.batch_size = int(batch_size)
        self.ground_truth = self._make_ground_truth(data_config)
        self.true_features = self.ground_truth.features
        self.sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "embed"), rules))
        train_key, self._eval_key = jax.random.split(jax.random.PRNGKey(int(data_config.seed)))
        self._train_key = train_key
        self.position = 0

        self._ground_truth = jax.device_put(tuple(self.ground_truth),
                                            sharding.replicated(mesh))

        def generate(ground_truth, key, index):
            x, codes = self._sample(ground_truth, jax.random.fold_in(key, index))
            return self._entries(x, codes)

        self._generate = jax.jit(generate, out_shardings=self.sharding)
        self._codes = jax.jit(
            lambda ground_truth, key, index: self._sample(ground_truth,
                                                          jax.random.fold_in(key, index))[1])

    def _make_ground_truth(self, data_config) -> tuple:
        """The fixed ground truth (a subclass draws another kind)."""
        return make_ground_truth(
            seed=int(data_config.seed), d=self.d, n_features=int(data_config.n_features),
            correlated=bool(data_config.correlated),
            frequency_decay=float(data_config.frequency_decay))

    def _sample(self, ground_truth: tuple, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One batch's activations and true codes from `key`."""
        return sample(GroundTruth(*ground_truth), key, self.batch_size,
                      float(self.config.features_per_sample))

    def _entries(self, x, codes):
        """What a batch holds: the activations (a subclass adds entries made from `codes`)."""
        del codes
        return x

    def next_batch(self) -> jax.Array:
        batch = self._generate(self._ground_truth, self._train_key, self.position)
        self.position += 1
        return batch

    def eval_batch(self, index: int) -> jax.Array:
        """Held-out batch `index`, drawn from a key the training stream never uses."""
        return self._generate(self._ground_truth, self._eval_key, index)

    def eval_codes(self, index: int) -> jax.Array:
        """The true sparse codes `[batch, n_features]` behind `eval_batch(index)`."""
        return self._codes(self._ground_truth, self._eval_key, index)

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])


# The hooks of a synthetic transcoder batch: what it reads, what it reconstructs.
TRANSCODER_HOOKS = ("activations_in", "activations_out")


class SyntheticTranscoderSource(SyntheticSource):
    """Batches `{activations_in: codes @ features, activations_out: codes @ output_features}`:
    one sparse code through two sets of directions (the second drawn from `data.seed + 1`),
    both `data.d` wide. `true_features` are the output directions, which a transcoder's
    decoder recovers."""

    def __init__(self, data_config, *, batch_size: int, mesh, rules):
        output = make_ground_truth(
            seed=int(data_config.seed) + 1, d=int(data_config.d),
            n_features=int(data_config.n_features), correlated=False, frequency_decay=1.0)
        self.input_features = None
        self._output_features = jax.device_put(output.features, sharding.replicated(mesh))
        super().__init__(data_config, batch_size=batch_size, mesh=mesh, rules=rules)
        self.input_features = self.ground_truth.features
        self.true_features = output.features
        self.hooks = TRANSCODER_HOOKS

    @property
    def widths(self) -> dict[str, int]:
        return {hook: self.d for hook in TRANSCODER_HOOKS}

    def _entries(self, x, codes):
        return {TRANSCODER_HOOKS[0]: x, TRANSCODER_HOOKS[1]: codes @ self._output_features}


def crosscoder_hooks(n_layers: int) -> tuple[str, ...]:
    """The hooks of a synthetic crosscoder batch: one per layer."""
    return tuple(f"layer_{i}" for i in range(int(n_layers)))


class SyntheticCrosscoderSource(SyntheticSource):
    """Batches `{layer_l: codes @ features_l}` for l < `data.n_layers`: one sparse code through
    a set of unit directions per layer (layer 0's are the SAE recipe's; layer l's are drawn from
    `data.seed + l`), each `data.d` wide. `true_features` [n_features, n_layers * d] are each
    feature's directions at every layer, concatenated and scaled to unit norm: what a
    crosscoder's decoder rows (its per-layer decoders side by side) recover."""

    def __init__(self, data_config, *, batch_size: int, mesh, rules):
        self.hooks = crosscoder_hooks(data_config.n_layers)
        later = [make_ground_truth(seed=int(data_config.seed) + layer, d=int(data_config.d),
                                   n_features=int(data_config.n_features), correlated=False,
                                   frequency_decay=1.0).features
                 for layer in range(1, len(self.hooks))]
        self._later_features = jax.device_put(tuple(later), sharding.replicated(mesh))
        super().__init__(data_config, batch_size=batch_size, mesh=mesh, rules=rules)
        every = np.concatenate([self.ground_truth.features, *later], axis=-1)
        self.true_features = every / np.sqrt(len(self.hooks))

    @property
    def widths(self) -> dict[str, int]:
        return {hook: self.d for hook in self.hooks}

    def _entries(self, x, codes):
        return {self.hooks[0]: x, **{hook: codes @ features for hook, features
                                     in zip(self.hooks[1:], self._later_features)}}


# The hooks of a synthetic CLT batch at layer l, named as an LM's (the CLT's defaults).
CLT_INPUT_HOOK, CLT_TARGET_HOOK = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"


def clt_hooks(n_layers: int) -> tuple[str, ...]:
    """The hooks of a synthetic CLT batch: every layer's input, then every layer's target."""
    return tuple(template.format(layer=layer) for template in (CLT_INPUT_HOOK, CLT_TARGET_HOOK)
                 for layer in range(int(n_layers)))


class CLTGroundTruth(NamedTuple):
    inputs: np.ndarray                 # [L, n_features, d]: layer l's features in its input
    outputs: np.ndarray                # [L, L, n_features, d]: into layer m's output (m >= l)
    correlation_cholesky: np.ndarray   # [n_features, n_features]
    frequency_decay: np.ndarray        # [n_features]

    @property
    def features(self) -> np.ndarray:
        """Layer 0's input directions (the source's `true_features` are the outputs')."""
        return self.inputs[0]


class SyntheticCLTSource(SyntheticSource):
    """Batches of a cross-layer transcoder's ground truth over `data.n_layers` layers: layer
    l has a sparse code c_l of its own (the SAE recipe's, drawn per layer), read through unit
    directions E_l into its input hook `blocks.{l}.ln2.hook_normalized`; feature f of layer l
    writes a unit direction D[l, m, f] into the MLP output `blocks.{m}.hook_mlp_out` of layer l
    and of every later layer m, so y_m = sum_{l <= m} c_l @ D[l, m]. `true_features`
    [L * n_features, L * d] are each feature's output directions at every layer side by side
    (zero before its own layer), unit norm: what a CLT's decoder rows (`decoder_rows`)
    recover."""

    def __init__(self, data_config, *, batch_size: int, mesh, rules):
        self.n_layers = int(data_config.n_layers)
        self.hooks = clt_hooks(self.n_layers)
        super().__init__(data_config, batch_size=batch_size, mesh=mesh, rules=rules)
        outputs = self.ground_truth.outputs                       # [L, L, F, d]
        rows = np.swapaxes(outputs, 1, 2).reshape(self.n_layers * outputs.shape[2], -1)
        self.true_features = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
        self.input_features = self.ground_truth.inputs

    @property
    def widths(self) -> dict[str, int]:
        return {hook: self.d for hook in self.hooks}

    def _make_ground_truth(self, data_config) -> CLTGroundTruth:
        seed, n_layers, n_features = (int(data_config.seed), int(data_config.n_layers),
                                      int(data_config.n_features))
        first = make_ground_truth(seed=seed, d=self.d, n_features=n_features,
                                  correlated=bool(data_config.correlated),
                                  frequency_decay=float(data_config.frequency_decay))
        directions = [make_ground_truth(seed=seed + i, d=self.d, n_features=n_features,
                                        correlated=False, frequency_decay=1.0).features
                      for i in range(1, n_layers * (n_layers + 1) + 1)]
        inputs = np.stack([first.features, *directions[:n_layers - 1]])
        outputs = np.stack(directions[n_layers - 1:][:n_layers * n_layers]).reshape(
            n_layers, n_layers, n_features, self.d)
        causal = np.arange(n_layers)[None, :] >= np.arange(n_layers)[:, None]
        outputs = outputs * causal[:, :, None, None]
        return CLTGroundTruth(inputs.astype(np.float32), outputs.astype(np.float32),
                              first.correlation_cholesky, first.frequency_decay)

    def _sample(self, ground_truth: tuple, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every layer's input [batch, L, d] and code [batch, L, n_features]."""
        inputs, _, chol, decay = ground_truth
        pairs = [sample(GroundTruth(inputs[layer], chol, decay), jax.random.fold_in(key, layer),
                        self.batch_size, float(self.config.features_per_sample))
                 for layer in range(self.n_layers)]
        return (jnp.stack([x for x, _ in pairs], axis=1),
                jnp.stack([codes for _, codes in pairs], axis=1))

    def _entries(self, x, codes):
        outputs = jnp.asarray(self.ground_truth.outputs)
        targets = jnp.einsum("blf,lmfd->bmd", codes, outputs)
        n_layers = self.n_layers
        return {**{hook: x[:, layer] for layer, hook in enumerate(self.hooks[:n_layers])},
                **{hook: targets[:, layer] for layer, hook in enumerate(self.hooks[n_layers:])}}
