"""Matryoshka SAEs (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders"; Nabeshima 2024): nested prefixes of the dictionary each reconstruct the target.

`sae.matryoshka_widths` lists the prefix sizes m_1 < m_2 < ..., as latent counts or as fractions
of n_latents; the whole dictionary is always the last prefix (added when it is not listed, as
SAELens does). Prefix m decodes latents [0, m) plus b_dec (and a transcoder's skip). The loss is
the mechanism's own (its reconstruction by the whole dictionary, its penalty or AuxK) plus the
reconstruction MSE of every smaller prefix, summed, as SAELens' MatryoshkaBatchTopKTrainingSAE
sums them (dictionary_learning's trainer takes their mean: the same losses with the
reconstruction weighted 1 / levels against AuxK). The first latents must reconstruct without
the later ones, so they keep the general features (a parent) instead of letting the later,
specific ones (its children) absorb them.

A piece that wraps a shape (`Matryoshka(inner, widths)`) and combines with every mechanism
whose loss forms the dense latents (relu, topk, batchtopk, jumprelu, gated). Matryoshka
BatchTopK is then one BatchTopK selection over the whole dictionary, its AuxK on the whole
reconstruction's residual and its learned inference threshold (batchtopk.py, unchanged), plus
the prefix losses. Encoding, inference and the SAELens export are the mechanism's: SAELens too
saves a trained Matryoshka BatchTopK SAE as a JumpReLU SAE. `sae.from_config` applies it.

A prefix is decoded by masking the later latents, not by slicing them off: the latent axis may
be split over the mesh's model axis, and a slice at an arbitrary width would move decoder rows
between devices. So each prefix below the whole dictionary costs a full decoder matmul: 2 d n
FLOPs per token forward and 4 d n backward.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from saejax.errors import ConfigError
from saejax.sae import base, ops, topk_family

FIELD = "matryoshka_widths"
WEIGHTS = "matryoshka_weights"
AUXK = "matryoshka_auxk"
WEIGHTS_FROM = "matryoshka_weights_from_step"


def _is_whole(value) -> bool:
    return float(value) == int(float(value))


def _numbers(listed) -> list[float]:
    try:
        values = [float(v) for v in listed]
    except (TypeError, ValueError):
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"sae.{FIELD}={tuple(listed)!r} must be numbers: latent counts or "
                          f"fractions of n_latents.")
    return values


def resolve_widths(listed, n_latents: int) -> tuple[int, ...]:
    """`sae.matryoshka_widths` as latent counts, in order (the whole dictionary not added).

    Whole numbers are latent counts; a list with any other value is fractions of n_latents, each
    in (0, 1], rounded to the nearest count. ConfigError naming the field when a width is not
    positive, above n_latents, or not above the one before it."""
    listed = tuple(listed)
    if not listed:
        raise ConfigError(f"sae.{FIELD} is empty; list the prefix sizes, e.g. (0.0625, 0.25) "
                          f"or (64, 256).")
    values = _numbers(listed)
    if any(not _is_whole(v) for v in values):
        if not all(0 < v <= 1 for v in values):
            raise ConfigError(f"sae.{FIELD}={listed!r} mixes fractions and counts, or has a "
                              f"fraction above 1: give every width as a fraction of n_latents "
                              f"in (0, 1], or every width as a whole latent count.")
        widths = tuple(int(round(v * n_latents)) for v in values)
    else:
        widths = tuple(int(v) for v in values)
    what = f"latent counts {widths} of n_latents={n_latents}"
    if widths[0] < 1:
        raise ConfigError(f"sae.{FIELD}={listed!r}: the first prefix has no latent ({what}); "
                          f"make it larger.")
    if widths[-1] > n_latents:
        raise ConfigError(f"sae.{FIELD}={listed!r} goes beyond n_latents={n_latents} "
                          f"(sae.expansion_factor x data.d); the widths are prefixes of the "
                          f"dictionary.")
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise ConfigError(f"sae.{FIELD}={listed!r} must be strictly increasing ({what}): each "
                          f"prefix holds the one before it.")
    return widths


def resolve_weights(listed, widths: tuple[int, ...], n_latents: int) -> tuple[float, ...]:
    """`sae.matryoshka_weights`: the factor on each prefix loss below the whole dictionary
    (empty: 1 each; one number: that for each). ConfigError naming the field when the count
    does not match the prefixes or a weight is negative."""
    inner = sum(w < n_latents for w in widths)
    listed = tuple(listed)
    values = tuple(float(v) for v in listed) if listed else (1.0,)
    if len(values) == 1:
        values = values * inner
    if len(values) != inner or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ConfigError(f"sae.{WEIGHTS}={listed!r} must be one non-negative number, or one "
                          f"per prefix below the whole dictionary ({inner} for "
                          f"sae.{FIELD}={widths}).")
    return values


def label(value) -> str:
    """A listed width as it names its metrics: `mse_prefix_64`, `fvu_prefix_0.25`."""
    return str(int(float(value))) if _is_whole(value) else f"{float(value):g}"


def metric_names(listed) -> tuple[str, ...]:
    """Per listed width, its reconstruction's MSE and FVU on the training batch."""
    return tuple(f"{metric}_prefix_{label(w)}" for w in _numbers(listed)
                 for metric in ("mse", "fvu"))


class Matryoshka(NamedTuple):
    """The shape `inner` (what the dictionary reads and reconstructs, its layout) with nested
    prefixes `widths` (as `sae.matryoshka_widths` lists them). Everything but the prefixes is
    the inner shape's."""

    inner: Any
    widths: tuple = ()
    name: str = "matryoshka"
    weights: tuple = ()   # sae.matryoshka_weights: each smaller prefix's loss factor

    @property
    def param_axes(self) -> dict:
        return self.inner.param_axes

    @property
    def resample(self) -> dict:
        return self.inner.resample

    def entries(self, widths):
        return self.inner.entries(widths)

    def input(self, batch):
        return self.inner.input(batch)

    def target(self, batch):
        return self.inner.target(batch)

    def init_layout(self, key, d, n_latents: int, dtype=jnp.float32) -> dict:
        return self.inner.init_layout(key, d, n_latents, dtype=dtype)

    def raw(self, params, x):
        return self.inner.raw(params, x)

    def pre_activations(self, params, x):
        return self.inner.pre_activations(params, x)

    def decode(self, params, latents, x=None):
        return self.inner.decode(params, latents, x)

    def decode_latents(self, params, latents):
        return self.inner.decode_latents(params, latents)

    def decoder_norms(self, params):
        return self.inner.decoder_norms(params)

    @property
    def unit_norm_params(self) -> tuple[str, ...]:
        return self.inner.unit_norm_params

    def split_target(self, target):
        return self.inner.split_target(target)

    def spliced_hooks(self, lm_hook: str) -> tuple[str, str]:
        return self.inner.spliced_hooks(lm_hook)

    # The inner shape's input scales and loss-recovered hooks (a crosscoder's per hook), where
    # it has its own: `sae.base` falls back to one scale when these are empty or None.
    @property
    def input_scale_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.inner, "input_scale_shape", ()))

    @property
    def scale_batch(self):
        return getattr(self.inner, "scale_batch", None)

    @property
    def input_scale_of(self):
        return getattr(self.inner, "input_scale_of", None)

    @property
    def column_scales(self):
        return getattr(self.inner, "column_scales", None)

    @property
    def replaced_hooks(self) -> tuple[str, ...]:
        return tuple(getattr(self.inner, "replaced_hooks", ()))

    # SAELens reads a Matryoshka SAE for inference as the inner shape's SAE: the prefixes only
    # shape its training.
    def to_saelens(self, form: str, tensors: dict, params: dict):
        return self.inner.to_saelens(form, tensors, params)

    def saelens_required(self, d_in: int, d_sae: int, cfg: dict) -> dict:
        return self.inner.saelens_required(d_in, d_sae, cfg)

    def from_saelens(self, params: dict, tensors: dict, cfg: dict, conversion):
        return self.inner.from_saelens(params, tensors, cfg, conversion)

    def config_fields(self) -> dict:
        return self.inner.config_fields()

    def decode_prefix(self, params, latents, width: int, x=None):
        """The reconstruction by latents [0, width) alone (and the biases)."""
        keep = (jnp.arange(latents.shape[-1]) < width).astype(latents.dtype)
        return self.inner.decode(params, latents * keep, x)

    def eval_metrics(self, params, latents, x, target, x_hat) -> dict:
        """Each listed prefix's `mse_prefix_*` and `fvu_prefix_*` on a held-out batch."""
        return prefix_metrics(self, params, latents, x, target, x_hat)[1]

    def prefixes(self, n_latents: int) -> tuple[int, ...]:
        """The listed widths as latent counts."""
        return resolve_widths(self.widths, n_latents)

    def prefix_weights(self, n_latents: int) -> tuple[float, ...]:
        """The factor on each prefix loss below the whole dictionary."""
        return resolve_weights(self.weights, self.prefixes(n_latents), n_latents)

    def flops_per_token(self, d, n_latents: int) -> int:
        """The inner layout's, plus a decoder matmul forward (2 d n) and backward (4 d n) per
        prefix below the whole dictionary (a skip connection is shared by every prefix)."""
        inner_prefixes = sum(w < n_latents for w in self.prefixes(n_latents))
        return (self.inner.flops_per_token(d, n_latents)
                + inner_prefixes * 6 * base._width(d) * n_latents)


def prefix_metrics(shape: "Matryoshka", params, latents, x, target, x_hat,
                   mse=None, auxk=None, weighted=True) -> tuple[Any, dict]:
    """The MSE of the prefixes below the whole dictionary, summed with their weights, and
    every listed prefix's `mse_prefix_*` and `fvu_prefix_*`; `x_hat` (and its `mse`) are the
    whole dictionary's. With `auxk(prefix_x_hat, start, width)` (the prefix AuxK below), its
    value for each of those prefixes is added to the sum and reported as
    `auxk_loss_prefix_*`. `weighted` (a traced bool) False: every prefix at weight 1."""
    n_latents = latents.shape[-1]
    total, metrics, start = 0.0, {}, 0
    weights = iter(jnp.where(weighted, w, 1.0) for w in shape.prefix_weights(n_latents))
    for listed, width in zip(shape.widths, shape.prefixes(n_latents)):
        if width == n_latents:
            prefix_x_hat = x_hat
            prefix_mse = ops.mse(target, x_hat) if mse is None else mse
        else:
            prefix_x_hat = shape.decode_prefix(params, latents, width, x)
            prefix_mse = ops.mse(target, prefix_x_hat)
            total = total + next(weights) * prefix_mse
            if auxk is not None:
                metrics[f"auxk_loss_prefix_{label(listed)}"] = auxk(prefix_x_hat, start, width)
                total = total + metrics[f"auxk_loss_prefix_{label(listed)}"]
            start = width
        metrics[f"mse_prefix_{label(listed)}"] = prefix_mse
        metrics[f"fvu_prefix_{label(listed)}"] = ops.fvu(target, prefix_x_hat)
    return total, metrics


def prefix_auxk(shape: "Matryoshka", params, x, target, dead, sae_config):
    """`sae.matryoshka_auxk`: AuxK per prefix (SAELens' `use_matryoshka_aux_loss`; Chanin et
    al.'s Matryoshka SAEs): the dead latents of the latents a prefix adds to the one before it,
    [start, width), reconstruct that prefix's residual, weighted by `sae.auxk_coefficient`.
    The mechanism's own AuxK (the whole dictionary's residual) stays. A dead latent among the
    first ones is then pulled to what the first prefix misses (a parent no first latent
    holds), which the whole dictionary's residual no longer shows."""
    pre = shape.pre_activations(params, x)
    index = jnp.arange(pre.shape[-1])

    def auxk(prefix_x_hat, start, width):
        in_prefix = dead & (index >= start) & (index < width)
        return float(sae_config.auxk_coefficient) * topk_family.auxk_loss(
            params, x, target, prefix_x_hat, pre, in_prefix, sae_config.k_aux)
    return auxk


def compose(mechanism: base.Mechanism, shape: Matryoshka) -> base.Architecture:
    """`mechanism` x `shape.inner` with the prefix losses added to the mechanism's loss."""
    architecture = base.compose(mechanism, shape)
    mechanism_loss, mechanism_validate = architecture.loss, architecture.validate
    mechanism_temporaries = architecture.temporaries

    def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None):
        total, aux = mechanism_loss(params, batch, sae_config, sparsity_coefficient, dead,
                                    step=step)
        if "latents" not in aux:
            raise ValueError("Matryoshka prefixes decode the dense latents; this mechanism's "
                             "loss does not form them (a sparse TopK decoder: set "
                             "sae.topk_decoder='dense').")
        x, target = shape.input(batch), shape.target(batch)
        auxk = (prefix_auxk(shape, params, x, target, dead, sae_config)
                if sae_config.get(AUXK, False) else None)
        # The listed weights from sae.matryoshka_weights_from_step on, 1 before: the first
        # prefix places the parents at full weight, then the lower weight takes the children's
        # mean back out of them (benchmarks/RESULTS.md, "Matryoshka BatchTopK on a hierarchy").
        weighted = True if step is None else step >= int(sae_config.get(WEIGHTS_FROM, 0))
        prefix_loss, metrics = prefix_metrics(shape, params, aux["latents"], x, target,
                                              aux["x_hat"], aux["mse"], auxk=auxk,
                                              weighted=weighted)
        return total + prefix_loss, {**aux, **metrics}

    def validate(config, n_latents):
        shape.prefix_weights(n_latents)
        start = config.sae.get(WEIGHTS_FROM, 0)
        if not (int(start) == start and start >= 0):
            raise ConfigError(f"sae.{WEIGHTS_FROM}={start!r} must be a step, an integer >= 0 "
                              f"(0: sae.{WEIGHTS} from the start).")
        if config.sae.get(AUXK, False) and "k_aux" not in mechanism.config_fields:
            raise ConfigError(f"sae.{AUXK}=True needs a mechanism with AuxK (topk, batchtopk); "
                              f"sae.architecture={mechanism.name!r} has none: set it False.")
        mechanism_validate(config, n_latents)

    def temporaries(sae_config, n_latents):
        """The mechanism's, plus per prefix below the whole its masked latents, kept for the
        decoder's gradient (their gradient adds into the latents' as it is formed)."""
        counts = mechanism_temporaries(sae_config, n_latents)
        inner_prefixes = sum(w < n_latents for w in shape.prefixes(n_latents))
        # The prefix AuxK's masked dead latents, one more array per prefix (not yet checked
        # against XLA's buffer assignment as the prefixes are).
        per_prefix = 2 if sae_config.get(AUXK, False) else 1
        return counts._replace(latent_arrays=counts.latent_arrays + per_prefix * inner_prefixes)

    single_hook = shape.inner.name == base.SINGLE_HOOK.name
    return architecture._replace(
        loss=loss, validate=validate, temporaries=temporaries,
        metrics=architecture.metrics + metric_names(shape.widths),
        saelens=mechanism.saelens if single_hook else None)
