"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Each token keeps its k largest pre-activations (then ReLU); sparsity is set by k, so the loss is
the reconstruction error plus the AuxK term that revives dead latents. The top-k is exact on a
dictionary split across devices (`sharding.top_k`).

With the sparse decoder (`sae.topk_decoder`) the training step never forms the
[batch, n_latents] latents: it selects each token's k latents from the pre-activations, reads
their values there and decodes them from k decoder rows (`sparse.py`), so only the selection
costs O(d n_latents) per token. The dense decoder is the reference (mask, then a full decoder
matmul); the two give the same losses, gradients and params within float32 rounding
(tests/test_sharding.py). Gathers and scatter-adds run far below a matmul's FLOP rate on a CPU,
so "auto" decodes a single hook sparsely only when the dictionary is at least SPARSE_RATIO times
the k + k_aux rows a token touches (benchmarks/RESULTS.md, "TopK: the sparse decoder against
the dense one", has the measurements behind the threshold), and a CLT densely (its sparse
decode ran slower on a CPU at every size measured, RESULTS' CLT train-step section).

A mechanism: any shape with the dense decoder; the sparse decoder reads the single-hook
layout (`x - b_dec` in `sparse.py`) or a CLT's (the same pieces a layer at a time,
its shape's `decode_selected`), so other shapes decode densely.
"""

import jax
import jax.numpy as jnp

from saejax import sharding
from saejax.sae import base, ops, sparse, topk_family
from saejax.sae.base import ConfigField

SPARSE_RATIO = 32
DECODERS = ("auto", "sparse", "dense")


def sparse_decode(sae_config, n_latents: int, shape=base.SINGLE_HOOK) -> bool:
    """Whether the step decodes only the selected rows (`sae.topk_decoder`; a single-hook SAE
    or a CLT can, `topk_family.sparse_ops`)."""
    if topk_family.sparse_ops(shape) is None:
        return False
    if sae_config.topk_decoder != "auto":
        return sae_config.topk_decoder == "sparse"
    if shape.name != base.SINGLE_HOOK.name:
        # A CLT's sparse decode scatters (k + k_aux) rows of every unmasked block a token; on a
        # CPU it ran slower than the dense decode even at n_latents = 128 (k + k_aux)
        # (benchmarks/RESULTS.md, the CLT's train step), so "auto" keeps it dense.
        return False
    selected = int(sae_config.k) + min(int(sae_config.k_aux), n_latents)
    return n_latents >= SPARSE_RATIO * selected


def _encode(params, x, k, kept=None, *, shape):
    pre = shape.pre_activations(params, x)
    return pre, jax.nn.relu(pre) * topk_family.top_k_mask(pre, k, kept, shape=shape)


def encode(params, x, sae_config, *, shape):
    return _encode(params, x, int(sae_config.k), shape=shape)[1]


def _dense_loss(params, x, k, kept, *, shape):
    pre, latents = _encode(params, x, k, kept, shape=shape)
    x_hat = shape.decode(params, latents, x)
    return pre, x_hat, {"latents": latents}


def _sparse_loss(params, x, k, kept, *, shape):
    ops = topk_family.sparse_ops(shape)
    # The selection needs every pre-activation but no gradient through them: the selected
    # latents' values are read from them, and their gradient reaches the encoder through k
    # columns per token (encode_selected's custom VJP).
    pre = jax.lax.stop_gradient(shape.pre_activations(params, x))
    _, indices = sharding.top_k(pre, k, topk_family.rows_axes(shape))
    values = jax.nn.relu(ops.encode_selected(params, x, pre, indices))
    if kept is not None:  # the selection is sorted: keep its first `kept`
        values = values * (jnp.arange(k) < kept).astype(values.dtype)
    x_hat = ops.decode_selected(params["W_dec"], indices, values) + params["b_dec"]
    return pre, x_hat, {"fire_counts": ops.fire_counts(indices, values, pre.shape[-1])}


def loss(params, batch, sae_config, sparsity_coefficient, dead, step=None, *, shape):
    x, target = shape.input(batch), shape.target(batch)
    del sparsity_coefficient
    use_sparse = sparse_decode(sae_config, params["W_dec"].shape[-2], shape)

    def loss_at_k(k, kept):
        pre, x_hat, aux = (_sparse_loss if use_sparse else _dense_loss)(params, x, k, kept,
                                                                        shape=shape)
        auxk = topk_family.auxk_loss(params, x, target, x_hat, pre, dead, sae_config.k_aux,
                                     sparse_decode=use_sparse, shape=shape)
        mse = ops.mse(target, x_hat)
        return mse + float(sae_config.auxk_coefficient) * auxk, {
            "mse": mse, "auxk_loss": auxk, "x_hat": x_hat, **aux}

    return topk_family.with_k_annealing(loss_at_k, sae_config, step)


def flops_per_token(d, n_latents, sae_config, *, shape):
    """Dense: `base.dense_flops_per_token`. Sparse: the selection's encoder matmul (2 d n),
    then per selected latent (k, and k_aux for AuxK) its encoder column and decoder row, each
    2 d forward and 4 d backward; a shape with its own sparse decode (a CLT) counts it
    (`sparse_flops_per_token`)."""
    if not sparse_decode(sae_config, n_latents, shape):
        return base.dense_flops(d, n_latents, shape=shape)
    selected = int(sae_config.k) + min(int(sae_config.k_aux), n_latents)
    own = getattr(shape, "sparse_flops_per_token", None)
    if own is not None:
        return own(d, n_latents, selected)
    return 2 * d * n_latents + 12 * d * selected


CONFIG_FIELDS = {
    **topk_family.K_FIELDS, **topk_family.AUXK_FIELDS,
    # "sparse" decodes only the k selected latents per token (k decoder rows gathered, their
    # gradients scattered: O(k d), not O(n_latents d)); "dense" multiplies the masked latents
    # by the whole decoder; "auto" is sparse when n_latents >= SPARSE_RATIO (k + k_aux).
    "topk_decoder": ConfigField("auto", "the step's decoder: auto, sparse or dense"),
}


def validate(config, n_latents, *, shape):
    topk_family.validate_auxk(config, n_latents)
    topk_family.validate_k(config, n_latents)
    base.require(config.sae.topk_decoder in DECODERS,
                 f"sae.topk_decoder={config.sae.topk_decoder!r} is not known; choose one of "
                 f"{', '.join(DECODERS)}.")
    base.require(config.sae.topk_decoder != "sparse"
                 or topk_family.sparse_ops(shape) is not None,
                 f"sae.topk_decoder='sparse' decodes a single-hook SAE only (or a CLT); the "
                 f"{shape.name} shape (sae.shape, sae.matryoshka_widths) decodes densely: set "
                 f"sae.topk_decoder to 'dense' or 'auto'.")


def temporaries(sae_config, n_latents, *, shape):
    """Dense decode: the activations, the top-k mask, the latents, AuxK's candidates and mask,
    and the gradient. Sparse decode: the pre-activations (which the top-k reads; no gradient
    flows through them) and AuxK's candidates, no dense latents, but per selected latent (k,
    and k_aux for AuxK) a gathered decoder row, its gradient, and the encoder column's gradient
    before the scatter-add: when (k + k_aux) d > n_latents these outweigh the dense latents.
    Each device handles every selection of its batch (zeros where another device holds the
    row), so these do not shrink with the model axis (XLA keeps about 3 such arrays on one
    device, 1 with the dictionary split: 2 is counted). Param-sized: the gradients and the
    encoder gradient's transpose."""
    if not sparse_decode(sae_config, n_latents, shape):
        return base.Temporaries(6)
    selected = int(sae_config.k) + min(int(sae_config.k_aux), n_latents)
    return base.Temporaries(2, selected_row_arrays=2, param_copies=2, selected_rows=selected)


def to_saelens(params, sae_config):
    tensors = {**base.dense_tensors(params), "b_enc": params["b_enc"]}
    return "topk", tensors, {"k": int(sae_config.k), "rescale_acts_by_decoder_norm": False}


def required(saelens_architecture, d_sae, tensors):
    del saelens_architecture, tensors
    return {"b_enc": (d_sae,)}


def from_saelens(saelens_architecture, tensors, cfg):
    k = topk_family.saelens_k(saelens_architecture, cfg)
    folded = []
    tensors = topk_family.fold_decoder_norms(tensors, cfg, folded)
    return "topk", {n: tensors[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}, {"k": k}, folded


MECHANISM = base.Mechanism(
    name="topk",
    encode=encode,
    loss=loss,
    flops_per_token=flops_per_token,
    sparsity_coefficient=None,
    config_fields=CONFIG_FIELDS,
    validate=validate,
    metrics=("auxk_loss",),
    temporaries=temporaries,
    level_field="k",
    saelens=base.SaeLens(to_saelens=to_saelens, imports=("topk",), required=required,
                         from_saelens=from_saelens),
)
