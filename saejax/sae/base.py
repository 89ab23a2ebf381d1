"""What every SAE architecture provides: an `Architecture` is a sparsity `Mechanism` (ReLU + L1,
TopK, JumpReLU, ...: the activation, its penalty, its extra per-latent params) composed with a
`shapes` shape (what the dictionary reads and reconstructs, and its layout) by `compose`.

A mechanism is one file of this package (or a test's); `saejax.sae` registers each built-in one
composed with `SingleHook` under its name, and `sae.shape` picks another shape at run time
(`sae.from_config`). An architecture carries everything the rest of saejax needs to know: its
config fields, their checks, its params' logical axes, init, encode / decode / loss, the
metrics its loss reports, FLOP and memory counts, what dead-latent resampling re-initialises,
whether its sparsity coefficient is a mean over latents, and its SAELens conversion. Nothing
outside `saejax/sae/` branches on an architecture's name. Every function here is pure and
jit-able.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from saejax.errors import ConfigError
from saejax.sae import ops  # noqa: F401  (the mechanisms' reductions)
from saejax.sae.shapes import (PARAM_AXES, RESAMPLE, SINGLE_HOOK, Entry,  # noqa: F401
                               SingleHook, add_bias, decode, init_params, pre_activations)

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
    does the file format, the input-scale fold and the checks every SAE shares; the shape
    turns the mechanism's SAE form into its own, `shapes.SingleHook.to_saelens`).

    to_saelens(params, sae_config) -> (SAELens architecture, tensors, cfg fields): `params`
        are float32 NumPy; `tensors` are every tensor of the SAELens file for inputs at
        saejax's scale (the caller folds the input scale into W_enc, W_dec and b_dec;
        thresholds and encoder biases compare with unscaled pre-activations, so they need no
        fold).
    imports: the SAELens architectures `from_saelens` reads, SAELens' name for this one first
        (the SAE benchmarks/peers.py times against it).
    required(saelens_architecture, d_sae, tensors) -> {tensor name: shape} it needs besides
        W_enc, W_dec, b_dec.
    from_saelens(saelens_architecture, tensors, cfg) -> (saejax architecture name, params,
        sae fields such as {"k": 32}, folds applied): `tensors` hold W_enc, W_dec, b_dec
        already in saejax's layout; `cfg` is cfg.json in one flat namespace.
    fold_input_shift(params, shift) -> params: SAELens' `apply_b_dec_to_input=false` encodes
        `x @ W_enc + b_enc`; a single-hook saejax SAE subtracts b_dec first, so
        `shift = b_dec @ W_enc` is added back to every encoder bias (default: `b_enc`).
    """

    to_saelens: Callable[..., tuple[str, dict, dict]] | None = None
    imports: tuple[str, ...] = ()
    required: Callable[..., dict] | None = None
    from_saelens: Callable[..., tuple[str, dict, dict, list]] | None = None
    fold_input_shift: Callable[[dict, Any], dict] | None = None


def dense_tensors(params: dict) -> dict:
    """The SAELens tensors every dense-layout SAE shares: W_enc, W_dec, b_dec."""
    return {k: params[k] for k in ("W_enc", "W_dec", "b_dec")}


def _no_checks(config, n_latents: int) -> None:
    del config, n_latents


def _dense_temporaries(sae_config, n_latents: int) -> Temporaries:
    """The pre-activations, the latents, and the gradient flowing back through them."""
    del sae_config, n_latents
    return Temporaries(3)


class Architecture(NamedTuple):
    """One kind of SAE.

    init(key, d, n_latents, sae_config) -> params (`d`: an int, or {hook: width})
    encode(params, x, sae_config) -> latents [batch, n_latents]
    decode(params, latents, x=None) -> x_hat [batch, d_target]; `x` is the encoder's input
        (a transcoder's skip connection reads it)
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
    shape: which batch entries it encodes and which it reconstructs (`shapes.SingleHook`).
    mechanism: the `Mechanism` it was composed from (None for one written whole), so that
        `sae.from_config` can compose it with another shape.
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
    shape: Any = SINGLE_HOOK
    mechanism: Any = None


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


def dense_flops_per_token(d: int, n_latents: int, sae_config=None) -> int:
    """Encoder and decoder matmuls: 4 d n forward, 6 d n backward (no gradient to the input)."""
    del sae_config
    return 10 * _width(d) * n_latents


def _width(d) -> int:
    return int(max(d.values())) if isinstance(d, dict) else int(d)


# ------------------------------------------------------------------------------------------
# Mechanisms, and their composition with a shape
# ------------------------------------------------------------------------------------------
def dense_init(key, d, n_latents, sae_config=None, *, shape):
    """The shape's layout alone (a mechanism without params of its own)."""
    del sae_config
    return shape.init_layout(key, d, n_latents)


def dense_flops(d, n_latents, sae_config=None, *, shape) -> int:
    """`dense_flops_per_token` plus what the shape's layout adds (a transcoder's skip)."""
    return dense_flops_per_token(d, n_latents, sae_config) + shape.flops_per_token(d, n_latents)


def _no_mechanism_checks(config, n_latents: int, *, shape) -> None:
    del config, n_latents, shape


def _mechanism_temporaries(sae_config, n_latents: int, *, shape) -> Temporaries:
    del sae_config, n_latents, shape
    return Temporaries(3)


class Mechanism(NamedTuple):
    """A sparsity mechanism: the activation, its penalty, the per-latent params it adds.

    Its functions are an `Architecture`'s, each with a keyword `shape` through which it reads
    the batch (`shape.input`, `shape.target`) and the dictionary (`shape.pre_activations`,
    `shape.raw`, `shape.decode`, `shape.decoder_norms`, `shape.init_layout`); `compose`
    binds the shape. `param_axes` and `resample` list only its own params (the shape adds
    the layout's); `shapes` names the shapes it supports (None: any), and `saelens` converts
    its own tensors, the shape adding its part (a transcoder's class, `d_out`, `W_skip`).
    """

    name: str
    encode: Callable[..., jax.Array]
    loss: Callable[..., tuple[jax.Array, dict[str, Any]]]
    sparsity_coefficient: str | None
    init: Callable[..., dict] = dense_init
    flops_per_token: Callable[..., int] = dense_flops
    param_axes: dict[str, tuple[str, ...]] = {}
    config_fields: dict[str, ConfigField] = {}
    validate: Callable[..., None] = _no_mechanism_checks
    metrics: tuple[str, ...] = ()
    temporaries: Callable[..., Temporaries] = _mechanism_temporaries
    resample: dict[str, str] = {}
    sparsity_mean_over_latents: bool = False
    level_field: str | None = None
    saelens: SaeLens | None = None
    shapes: tuple[str, ...] | None = None


def compose(mechanism: Mechanism, shape=SINGLE_HOOK) -> Architecture:
    """The architecture `mechanism` x `shape`, named as the mechanism (`sae.architecture`)."""
    if mechanism.shapes is not None and shape.name not in mechanism.shapes:
        raise ConfigError(f"sae.architecture={mechanism.name!r} supports sae.shape in "
                          f"{mechanism.shapes}, not {shape.name!r}; choose another "
                          "architecture or shape.")

    def bind(function):
        return functools.partial(function, shape=shape)

    # A mechanism's per-latent params ('latent',) take the shape's latent layout (a CLT's
    # [layer, latent]); the shape may check the config and add to the step's temporaries.
    per_latent = latent_axes(shape)
    shape_validate = getattr(shape, "validate", _no_checks)
    adjust = getattr(shape, "temporaries", lambda counts: counts)

    def validate(config, n_latents):
        shape_validate(config, n_latents)
        mechanism.validate(config, n_latents, shape=shape)

    def temporaries(sae_config, n_latents):
        return adjust(mechanism.temporaries(sae_config, n_latents, shape=shape))

    return Architecture(
        name=mechanism.name,
        init=bind(mechanism.init),
        encode=bind(mechanism.encode),
        decode=shape.decode,
        loss=bind(mechanism.loss),
        flops_per_token=bind(mechanism.flops_per_token),
        param_axes={**shape.param_axes,
                    **{name: per_latent if axes == ("latent",) else axes
                       for name, axes in mechanism.param_axes.items()}},
        sparsity_coefficient=mechanism.sparsity_coefficient,
        config_fields=mechanism.config_fields,
        validate=validate,
        metrics=mechanism.metrics,
        temporaries=temporaries,
        resample={**shape.resample, **mechanism.resample},
        sparsity_mean_over_latents=mechanism.sparsity_mean_over_latents,
        level_field=mechanism.level_field,
        saelens=mechanism.saelens,  # the shape adds its part (`shape.to_saelens`)
        shape=shape,
        mechanism=mechanism,
    )


def latent_axes(shape) -> tuple[str, ...]:
    """The logical axes of a shape's per-latent arrays (its latents are [batch, *these]):
    ('latent',), or a CLT's ('layer', 'latent')."""
    return tuple(getattr(shape, "latent_axes", ("latent",)))


def latent_shape(shape, n_latents: int) -> tuple[int, ...]:
    """The shape of a per-latent array: (n_latents,), or a CLT's (layers, n_latents)."""
    layout = getattr(shape, "latent_shape", None)
    return (int(n_latents),) if layout is None else tuple(layout(n_latents))


def decoder_rows(shape, params: dict) -> jax.Array:
    """The decoder as one row per latent `[latents, d_target]` (what MMCS compares with true
    directions): `W_dec`, or the shape's own (a CLT's per-layer decoders side by side)."""
    rows = getattr(shape, "decoder_rows", None)
    return params["W_dec"] if rows is None else rows(params)


def input_scale_shape(shape) -> tuple[int, ...]:
    """The shape of a dictionary's input scale (what raw activations are multiplied by before it
    reads them): () for one scale of every hook it reads, or the shape's own (a crosscoder's
    (n_hooks,): each hook normalised on its own)."""
    return tuple(getattr(shape, "input_scale_shape", ()))


def scale_batch(shape, batch: dict, scale) -> dict:
    """`{hook: x * that hook's input scale}` of a batch `{hook: [batch, d_hook]}` (any of the
    shape's hooks): one scale for all, or the shape's own per hook."""
    own = getattr(shape, "scale_batch", None)
    return own(batch, scale) if own is not None else {h: x * scale for h, x in batch.items()}


def input_scale_of(shape, batch: dict) -> jax.Array:
    """The input scale that gives the batch's input unit mean squared norm (rsqrt of its mean
    squared norm): of the shape's whole input, or the shape's own (per hook)."""
    own = getattr(shape, "input_scale_of", None)
    if own is not None:
        return own(batch)
    return jax.lax.rsqrt(jnp.mean(jnp.sum(jnp.square(shape.input(batch)), axis=-1)))


def column_scales(shape, scale, width: int):
    """What each of the `width` columns of the shape's input (or target) side by side is
    multiplied by: the one scale, or each hook's repeated over its columns (a crosscoder)."""
    own = getattr(shape, "column_scales", None)
    return own(scale, width) if own is not None else scale


def geometric_median(points: jax.Array, iterations: int = 100, eps: float = 1e-8) -> jax.Array:
    """The point minimising the summed Euclidean distance to `points [n, d]` (Weiszfeld).

    Towards Monosemanticity initialises the decoder bias here: a robust centre of the data.
    """

    def step(median, _):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - median, axis=-1), eps)
        return jnp.sum(points * weights[:, None], axis=0) / jnp.sum(weights), None

    median, _ = jax.lax.scan(step, jnp.mean(points, axis=0), None, length=iterations)
    return median
