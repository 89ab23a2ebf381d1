"""The single-hook shape (an SAE: encodes a batch's one entry and reconstructs it) and the
dense layout every shape builds on: each param's logical axes (`PARAM_AXES`), what resampling
does to a dead latent (`RESAMPLE`), a batch's `Entry`, the dense encoder and decoder
(`pre_activations`, `decode`, `add_bias` with its cheap bias gradient) and the methods other
shapes share (`_row_norms`, `_one_target`, `_no_metrics`). `shapes.py` re-exports every name,
where the mechanisms and the other shapes import them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax.errors import ConfigError
from saejax.sae import ops

PARAM_AXES = {
    "W_enc": ("embed", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed"),
    "b_dec": ("embed",),
}

# What resampling does to a dead latent's entries of each param (optim.resample_dead_latents):
# "decoder": its row becomes the drawn target's direction; "encoder": its column, the drawn
# input's direction scaled to `resample.encoder_scale` times the alive columns' mean norm;
# "zero": its entries are zeroed; "init": they return to their values in a fresh `init` (a
# learned threshold). Params not listed keep their values (their Adam moments along `latent`
# are reset all the same).
RESAMPLE = {"W_enc": "encoder", "W_dec": "decoder", "b_enc": "zero"}


class Entry(NamedTuple):
    """One entry of a batch a dictionary reads or writes: `[batch, width]` at a hook."""

    hook: str
    width: int
    axes: tuple[str, ...] = ("batch", "embed")


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


def pre_activations(params: dict, x: jax.Array) -> jax.Array:
    """Encoder pre-activations; the decoder bias is subtracted first (Towards Monosemanticity).

    The value is `(x - b_dec) @ W_enc + b_enc`. The decoder bias's gradient through this path is
    `-W_enc @ (sum over the batch of the pre-activations' gradient)`, a matrix-vector product;
    written naively, XLA computes it as a [batch, n_latents] x [n_latents, d] matmul and then
    sums, a sixth dictionary-sized matmul. So `x - b_dec` is formed with the bias held
    constant, and its gradient is carried by a term whose value is zero: the same forward
    numbers, the cheap gradient.
    """
    b_dec, W_enc = params["b_dec"], params["W_enc"]
    frozen = jax.lax.stop_gradient(b_dec)
    return add_bias((x - frozen) @ W_enc, params["b_enc"] - (b_dec - frozen) @ W_enc)


def decode(params: dict, latents: jax.Array, x: jax.Array | None = None) -> jax.Array:
    """The dense decoder; `x` (the encoder's input) is unused: every architecture's `decode`
    takes it, for the shapes whose reconstruction reads the input."""
    del x
    return latents @ params["W_dec"] + params["b_dec"]


def _row_norms(self, params: dict) -> jax.Array:
    """Each latent's decoder norm `[n_latents]` (what the L1 penalties weight by)."""
    del self
    return jnp.linalg.norm(params["W_dec"], axis=-1)


def _one_target(self, target: jax.Array) -> dict[str, jax.Array]:
    """The target per hook, for per-hook metrics: {} when it is one hook's."""
    del self, target
    return {}


def _no_metrics(self, params, latents, x, target, x_hat) -> dict:
    """Metrics of a held-out batch the shape adds to mse, fvu and l0 (Matryoshka's
    prefixes); none here."""
    del self, params, latents, x, target, x_hat
    return {}


def _one_width(d) -> int:
    """The width of a single-hook batch: `d`, or its one value of {hook: width}."""
    if isinstance(d, dict):
        (width,) = d.values()
        return int(width)
    return int(d)


class SingleHook(NamedTuple):
    """Encodes the batch's one entry and reconstructs that same entry. A batch is
    `{hook: [batch, d]}` (saejax.data); a bare array is taken as a batch of one entry, so that
    the losses can be called on an array."""

    name: str = "single_hook"

    # Each param's logical axes, and what resampling does to a dead latent's entries. The
    # decoder constraint (saejax.optim) keeps the rows of every shape's `W_dec` unit-norm.
    param_axes: dict = PARAM_AXES
    resample: dict = RESAMPLE
    unit_norm_params: tuple[str, ...] = ("W_dec",)   # rows kept unit-norm by saejax.optim

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

    def init_layout(self, key: jax.Array, d, n_latents: int, dtype=jnp.float32) -> dict:
        return init_params(key, _one_width(d), n_latents, dtype=dtype)

    def raw(self, params: dict, x: jax.Array) -> jax.Array:
        """The encoder's matmul without its bias: `(x - b_dec) @ W_enc`."""
        return (x - params["b_dec"]) @ params["W_enc"]

    def pre_activations(self, params: dict, x: jax.Array) -> jax.Array:
        return pre_activations(params, x)

    def decode(self, params: dict, latents: jax.Array, x: jax.Array | None = None):
        del x
        return decode(params, latents)

    def decode_latents(self, params: dict, latents: jax.Array) -> jax.Array:
        """The decoder's matmul without b_dec (AuxK's reconstruction of the residual)."""
        return latents @ params["W_dec"]

    decoder_norms = _row_norms
    split_target = _one_target

    def spliced_hooks(self, lm_hook: str) -> tuple[str, str]:
        """(the LM hook it reads, the LM hook its reconstruction replaces) for loss recovered:
        an SAE trained at `lm.hook` reads and replaces that hook."""
        return lm_hook, lm_hook

    eval_metrics = _no_metrics

    def flops_per_token(self, d, n_latents: int) -> int:
        """FLOPs the layout adds to the mechanism's count (none: it is the dense layout)."""
        del d, n_latents
        return 0

    # SAELens' form (saejax.analysis.saelens): the mechanism's own SAE, which subtracts b_dec
    # from its input as saejax does.
    def to_saelens(self, form: str, tensors: dict, params: dict):
        """(SAELens architecture, tensors, cfg fields, metadata) of a mechanism's SAELens form."""
        del params
        return form, tensors, {"apply_b_dec_to_input": True}, {}

    def saelens_required(self, d_in: int, d_sae: int, cfg: dict) -> dict:
        del cfg
        return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}

    def from_saelens(self, params: dict, tensors: dict, cfg: dict, conversion):
        """(params, folds) with what SAELens does outside the mechanism's tensors folded in:
        `apply_b_dec_to_input: false` encodes `x @ W_enc + b_enc`; saejax subtracts b_dec
        first, so `b_dec @ W_enc` is added back to the encoder biases."""
        del tensors
        if cfg.get("apply_b_dec_to_input") is not False:
            return params, []
        shift = params["b_dec"] @ params["W_enc"]
        params = (conversion.fold_input_shift(params, shift) if conversion.fold_input_shift
                  else {**params, "b_enc": params["b_enc"] + shift})
        return params, ["apply_b_dec_to_input=false into b_enc"]

    def config_fields(self) -> dict:
        """The `sae.<field>`s that choose this shape."""
        return {}


SINGLE_HOOK = SingleHook()
