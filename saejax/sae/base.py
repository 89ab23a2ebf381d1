"""What every SAE architecture provides, and the parameter layout most of them share.

An architecture is one `Architecture` value in one file of this package (or a test's), added to
the registry with `saejax.sae.register`. It carries everything the rest of saejax needs to know
about it: its config fields, their checks, its params' logical axes, init, encode / decode /
loss, the metrics its loss reports, FLOP and memory counts, what dead-latent resampling
re-initialises, whether its sparsity coefficient is a mean over latents, and its SAELens
conversion. Nothing outside `saejax/sae/` branches on an architecture's name.

The dense layout: params are a plain dict pytree, `W_enc [d, n_latents]`, `b_enc [n_latents]`,
`W_dec [n_latents, d]`, `b_dec [d]`. Every function here is pure and jit-able.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from saejax.sae import ops
from saejax.sharding import ConfigError

PARAM_AXES = {
    "W_enc": ("embed", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed"),
    "b_dec": ("embed",),
}


class ConfigField(NamedTuple):
    """One `config.sae.<name>` field an architecture reads: its default and a one-line doc.

    A field several architectures read (the TopK family's `k`) is declared once, in a shared
    piece, and listed by each. With `exclusive`, a value other than the default is refused
    when the chosen architecture does not read the field (it would be silently ignored).
    """

    default: Any
    doc: str
    exclusive: bool = False


class Temporaries(NamedTuple):
    """What one architecture's step keeps live at its peak, besides the state and the batch
    (`saejax.memory.memory_report`), counted from what the step computes and checked against
    XLA's buffer assignment (tests/test_memory.py)."""

    latent_arrays: int            # [batch, n_latents] arrays, split like the dictionary
    selected_row_arrays: int = 0  # [batch, selected_rows, d] arrays of gathered dictionary rows
    param_copies: int = 1         # param-sized arrays: the gradients, ...
    selected_rows: int = 0        # dictionary rows a token gathers (sparse TopK: k + k_aux)


class SaeLens(NamedTuple):
    """An architecture's conversion to and from SAELens' format (`saejax.analysis.saelens`
    does the file format, the input-scale fold and the checks every SAE shares).

    to_saelens(params, sae_config) -> (SAELens architecture, tensors, cfg fields): `params`
        are float32 NumPy; `tensors` are every tensor of the SAELens file for inputs at
        saejax's scale (the caller folds the input scale into W_enc, W_dec and b_dec;
        thresholds and encoder biases compare with unscaled pre-activations, so they need no
        fold).
    imports: the SAELens architectures `from_saelens` reads.
    required(saelens_architecture, d_sae, tensors) -> {tensor name: shape} it needs besides
        W_enc, W_dec, b_dec.
    from_saelens(saelens_architecture, tensors, cfg) -> (saejax architecture name, params,
        sae fields such as {"k": 32}, folds applied): `tensors` hold W_enc, W_dec, b_dec
        already in saejax's layout; `cfg` is cfg.json in one flat namespace.
    fold_input_shift(params, shift) -> params: SAELens' `apply_b_dec_to_input=false` encodes
        `x @ W_enc + b_enc`; saejax subtracts b_dec first, so `shift = b_dec @ W_enc` is added
        back to every encoder bias (default: `b_enc`).
    """

    to_saelens: Callable[..., tuple[str, dict, dict]] | None = None
    imports: tuple[str, ...] = ()
    required: Callable[..., dict] | None = None
    from_saelens: Callable[..., tuple[str, dict, dict, list]] | None = None
    fold_input_shift: Callable[[dict, Any], dict] | None = None


def dense_tensors(params: dict) -> dict:
    """The SAELens tensors every dense-layout SAE shares: W_enc, W_dec, b_dec."""
    return {k: params[k] for k in ("W_enc", "W_dec", "b_dec")}


class Entry(NamedTuple):
    """One entry of a batch a dictionary reads or writes: `[batch, width]` at a hook."""

    hook: str
    width: int
    axes: tuple[str, ...] = ("batch", "embed")


class SingleHook(NamedTuple):
    """The dictionary's shape for every architecture here: it encodes the batch's one entry
    and reconstructs that same entry. A batch is `{hook: [batch, d]}` (saejax.data); a bare
    array is taken as a batch of one entry, so that the losses can be called on an array.

    A shape says what a dictionary reads and what it writes. Another shape (a transcoder:
    hook A in, hook B out; a crosscoder: several hooks in and out) is another value with the
    same methods, not another architecture file.
    """

    name: str = "single_hook"

    def entries(self, widths: dict[str, int]) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
        """(what it encodes, what it reconstructs) given the batch's {hook: width}."""
        if len(widths) != 1:
            raise ConfigError(f"a single-hook SAE reads a batch of one hook; the data has "
                              f"{sorted(widths)}.")
        (entry,) = (Entry(hook, int(width)) for hook, width in widths.items())
        return (entry,), (entry,)

    def input(self, batch) -> jax.Array:
        """The `[batch, d]` activations the encoder reads."""
        if isinstance(batch, dict):
            (x,) = batch.values()
            return x
        return batch

    def target(self, batch) -> jax.Array:
        """The `[batch, d]` activations the decoder reconstructs (metrics compare with it)."""
        return self.input(batch)


SINGLE_HOOK = SingleHook()


def _no_checks(config, n_latents: int) -> None:
    del config, n_latents


def _dense_temporaries(sae_config, n_latents: int) -> Temporaries:
    """The pre-activations, the latents, and the gradient flowing back through them."""
    del sae_config, n_latents
    return Temporaries(3)


# What resampling does to a dead latent's entries of each param (optim.resample_dead_latents):
# "decoder": its row becomes the drawn input's direction; "encoder": its column, that direction
# scaled to `resample.encoder_scale` times the alive columns' mean norm; "zero": its entries are
# zeroed; "init": they return to their values in a fresh `init` (a learned threshold). Params
# not listed keep their values (their Adam moments along `latent` are reset all the same).
RESAMPLE = {"W_enc": "encoder", "W_dec": "decoder", "b_enc": "zero"}


class Architecture(NamedTuple):
    """One kind of SAE.

    init(key, d, n_latents, sae_config) -> params
    encode(params, x, sae_config) -> latents [batch, n_latents]
    decode(params, latents) -> x_hat [batch, d]
    loss(params, batch, sae_config, sparsity_coefficient, dead, step=None) -> (loss, aux) where
        `batch` is `{hook: [batch, width]}`, read through `shape` (its input and target),
        `dead` [n_latents] marks latents that have not fired within the dead window, `step` is
        the training step (schedules inside the loss: TopK's k annealing), and aux holds at
        least `mse`, `x_hat`, the `latents` [batch, n_latents] (or, for a step that never forms
        them, their `ops.fire_counts` as `fire_counts`), every name of `metrics`, and
        optionally `buffers`: non-gradient params to overwrite after the update.
    flops_per_token(d, n_latents, sae_config) -> training FLOPs (forward + backward) per token.
    param_axes: each param's logical axes.
    sparsity_coefficient: the `sae.<field>` that weights the sparsity term (warmed up by
        `optim.sparsity_warmup_steps`; a group's members differ in it), or None when sparsity
        is structural (TopK).
    config_fields: the `sae.<field>`s it reads, {name: ConfigField}; `configs.base_config()`
        declares every registered architecture's fields.
    validate(config, n_latents): raises ConfigError naming a field of its own that cannot work.
    metrics: the scalars of the loss's aux logged every step, in this order.
    temporaries(sae_config, n_latents) -> Temporaries, for the memory report.
    resample: {param: rule} for dead-latent resampling (see RESAMPLE).
    sparsity_mean_over_latents: whether the sparsity term is a mean over latents, so that the
        sweep's sparsity level (comparable across dictionary sizes) is the coefficient divided
        by the expansion factor.
    level_field: the `sae.<field>` that sets sparsity when there is no coefficient (TopK's k):
        recorded in summaries and sweep tables.
    saelens: its SAELens conversion, or None when SAELens has no counterpart.
    shape: which batch entries it encodes and which it reconstructs (`SingleHook`).
    """

    name: str
    init: Callable[..., dict]
    encode: Callable[..., jax.Array]
    decode: Callable[..., jax.Array]
    loss: Callable[..., tuple[jax.Array, dict[str, Any]]]
    flops_per_token: Callable[..., int]
    param_axes: dict[str, tuple[str, ...]]
    sparsity_coefficient: str | None
    config_fields: dict[str, ConfigField] = {}
    validate: Callable[[Any, int], None] = _no_checks
    metrics: tuple[str, ...] = ()
    temporaries: Callable[[Any, int], Temporaries] = _dense_temporaries
    resample: dict[str, str] = RESAMPLE
    sparsity_mean_over_latents: bool = False
    level_field: str | None = None
    saelens: SaeLens | None = None
    shape: SingleHook = SINGLE_HOOK


def require(condition: bool, message: str) -> None:
    """An architecture's `validate`: ConfigError(message) unless `condition`."""
    if not condition:
        raise ConfigError(message)


def require_non_negative(sae_config, *fields: str) -> None:
    for field in fields:
        require(sae_config[field] >= 0,
                f"sae.{field}={sae_config[field]!r} is negative; it must be >= 0.")


# The L1 penalty's weight, read by every architecture with an L1 term (relu, gated).
L1_FIELDS = {"l1_coefficient": ConfigField(0.6, "weight of the L1 penalty (relu, gated)")}


def init_params(key: jax.Array, d: int, n_latents: int, sae_config=None,
                dtype=jnp.float32) -> dict:
    """Unit-norm random decoder rows; the encoder starts as the decoder's transpose."""
    del sae_config
    W_dec = jax.random.normal(key, (n_latents, d), dtype)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    return {
        "W_enc": W_dec.T,
        "b_enc": jnp.zeros((n_latents,), dtype),
        "W_dec": W_dec,
        "b_dec": jnp.zeros((d,), dtype),
    }


def pre_activations(params: dict, x: jax.Array) -> jax.Array:
    """Encoder pre-activations; the decoder bias is subtracted first (Towards Monosemanticity).

    The value is `(x - b_dec) @ W_enc + b_enc`. The decoder bias's gradient through this path is
    `-W_enc @ (sum over the batch of the pre-activations' gradient)`, a matrix-vector product;
    written naively, XLA computes it as a [batch, n_latents] x [n_latents, d] matmul and then
    sums, a sixth dictionary-sized matmul (20% more FLOPs than the step's 10 d n per token).
    So `x - b_dec` is formed with the bias held constant, and its gradient is carried by a term
    whose value is zero: the same forward numbers, the cheap gradient.
    """
    b_dec, W_enc = params["b_dec"], params["W_enc"]
    frozen = jax.lax.stop_gradient(b_dec)
    return add_bias((x - frozen) @ W_enc, params["b_enc"] - (b_dec - frozen) @ W_enc)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y [tokens, n] + bias [n]`, whose bias gradient is `ops.batch_sum` of y's: the sum
    autodiff writes for a broadcast is the slow column reduction on XLA's CPU backend."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, grad):
    return grad, ops.batch_sum(grad).astype(grad.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def decode(params: dict, latents: jax.Array) -> jax.Array:
    return latents @ params["W_dec"] + params["b_dec"]


def dense_flops_per_token(d: int, n_latents: int, sae_config=None) -> int:
    """Encoder and decoder matmuls: 4 d n forward, 6 d n backward (no gradient to the input)."""
    del sae_config
    return 10 * d * n_latents


def geometric_median(points: jax.Array, iterations: int = 100, eps: float = 1e-8) -> jax.Array:
    """The point minimising the summed Euclidean distance to `points [n, d]` (Weiszfeld).

    Towards Monosemanticity initialises the decoder bias here: a robust centre of the data.
    """

    def step(median, _):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - median, axis=-1), eps)
        return jnp.sum(points * weights[:, None], axis=0) / jnp.sum(weights), None

    median, _ = jax.lax.scan(step, jnp.mean(points, axis=0), None, length=iterations)
    return median
