"""The cross-layer transcoder shape (Ameisen et al. 2025, "Circuit tracing: revealing
computational graphs in language models"): `sae.shape=clt`, composed with a dense mechanism
(relu, topk, batchtopk, jumprelu).

Over layers l = 0 .. L-1 of `sae.layers`, layer l's encoder reads its input hook
(`sae.input_hook` with `{layer}` filled in; the MLP's input `blocks.{layer}.ln2.hook_normalized`
by default) into n latents of its own, and those latents decode into the MLP output
(`sae.target_hook`, `blocks.{layer}.hook_mlp_out` by default) of layer l and of every later
layer: the reconstruction of layer m's MLP output is
    y_m = sum_{l <= m} f_l @ W_dec[l, m] + b_dec[m],    f_l = act(x_l @ W_enc[l] + b_enc[l]).
The loss is the mechanism's on the L targets side by side (the per-layer reconstruction MSEs
summed, as an element mean), its sparsity term as for any shape; the decoder norms are free,
and an L1 penalty weights latent (l, j) by the sum over targets m >= l of ||W_dec[l, m, j]||
(as a crosscoder's does). TopK keeps `sae.k` latents per layer per token; BatchTopK keeps
`sae.k` per layer per token on average over the batch; JumpReLU's L0 counts every layer's.
`n_latents` (`sae.expansion_factor` x `data.d`) is the count per layer.

Layout and logical axes (the rules table maps `layer` to a mesh axis as it maps `latent`):
  W_enc [L, d_in, n]        ('layer', 'embed_in', 'latent')
  b_enc [L, n]              ('layer', 'latent')   (and a mechanism's per-latent params)
  W_dec [L, L, n, d_out]    ('layer', 'layer_out', 'latent', 'embed_out'): source, target
  b_dec [L * d_out]         ('embed_out',): the targets side by side
The latents are `[batch, L, n]` ('batch', 'layer', 'latent'); the input `[batch, L, d_in]`;
the target `[batch, L * d_out]`. The decoder is stored whole, with the blocks m < l held at
zero by a constant mask applied in `decode`: a packed triangle would store L (L + 1) / 2 blocks
instead of L^2 and compute as many, but blocks of unequal size per source layer do not split
evenly over a `layer` mesh axis, while the full square does (every device holds the same number
of source layers and does the same work). The price is about 2x the decoder's memory and its
FLOPs (all L^2 blocks are multiplied), and a masked copy of W_dec during the step; the FLOP
count (`flops_per_token`) and the memory model count what is computed and stored.

For one layer of a replacement model (each encoder reading the replacement's own residual
stream, layer by layer), the pieces are:
  `encode_layer(architecture, params, x, layer, sae_config)` -> latents [batch, n] of layer
      `layer` (an index into `sae.layers`) from its input x [batch, d_in], through the
      mechanism's inference encoding;
  `CrossLayerTranscoder.decode_layer(params, latents, layer)` -> layer `layer`'s MLP output
      [batch, d_out] from the latents [batch, L', n] of layers 0 .. L'-1 (L' > layer; later
      ones are ignored), with its b_dec.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax.errors import ConfigError
from saejax.sae import shapes, sparse
from saejax.sae.shapes import Entry, _no_metrics, add_bias

DEFAULT_INPUT_HOOK = "blocks.{layer}.ln2.hook_normalized"
DEFAULT_TARGET_HOOK = "blocks.{layer}.hook_mlp_out"
# The mechanisms whose per-latent params follow the shape's latent layout.
MECHANISMS = ("relu", "topk", "batchtopk", "jumprelu")

PARAM_AXES = {
    "W_enc": ("layer", "embed_in", "latent"),
    "b_enc": ("layer", "latent"),
    "W_dec": ("layer", "layer_out", "latent", "embed_out"),
    "b_dec": ("embed_out",),
}


def causal_mask(n_layers: int, dtype=jnp.float32) -> jax.Array:
    """[L_src, L_tgt, 1, 1]: 1 where the target layer is at or after the source."""
    source, target = jnp.arange(n_layers)[:, None], jnp.arange(n_layers)[None, :]
    return (target >= source).astype(dtype)[:, :, None, None]


class CrossLayerTranscoder(NamedTuple):
    """Reads `input_hook` at every layer of `layers`, reconstructs `target_hook` at each
    (the templates' `{layer}` filled in); see the module docstring for the layout."""

    layers: tuple[int, ...]
    input_hook: str = DEFAULT_INPUT_HOOK
    target_hook: str = DEFAULT_TARGET_HOOK
    name: str = "clt"
    param_axes: dict = PARAM_AXES
    resample: dict = {}
    unit_norm_params: tuple[str, ...] = ()
    latent_axes: tuple[str, ...] = ("layer", "latent")

    @property
    def input_hooks(self) -> tuple[str, ...]:
        return tuple(self.input_hook.format(layer=layer) for layer in self.layers)

    @property
    def target_hooks(self) -> tuple[str, ...]:
        return tuple(self.target_hook.format(layer=layer) for layer in self.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def latent_shape(self, n_latents: int) -> tuple[int, int]:
        """Per-latent arrays (the firing clock, a threshold) are [L, n]."""
        return (self.n_layers, int(n_latents))

    def entries(self, widths: dict[str, int]) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
        sides = []
        for field, hooks, axes in (("sae.input_hook", self.input_hooks, ("batch", "embed_in")),
                                   ("sae.target_hook", self.target_hooks,
                                    ("batch", "embed_out"))):
            missing = [hook for hook in hooks if hook not in widths]
            if missing:
                raise ConfigError(f"{field} at sae.layers={','.join(map(str, self.layers))} "
                                  f"names {missing}, not entries of the data's batches "
                                  f"({sorted(widths)}); set {field} (a template with "
                                  "{layer}) and sae.layers to hooks the data holds.")
            if len({int(widths[hook]) for hook in hooks}) != 1:
                raise ConfigError(f"a CLT's {field} hooks have one width; they have "
                                  f"{ {hook: int(widths[hook]) for hook in hooks} }.")
            sides.append(tuple(Entry(hook, int(widths[hook]), axes) for hook in hooks))
        return sides[0], sides[1]

    def widths(self, d) -> tuple[int, int]:
        """(d_in, d_out) of `d`: an int for both, or {hook: width}."""
        if isinstance(d, dict):
            return int(d[self.input_hooks[0]]), int(d[self.target_hooks[0]])
        return int(d), int(d)

    def input(self, batch: dict) -> jax.Array:
        """[batch, L, d_in]: every layer's input."""
        return jnp.stack([batch[hook] for hook in self.input_hooks], axis=-2)

    def target(self, batch: dict) -> jax.Array:
        """[batch, L * d_out]: every layer's MLP output side by side."""
        return jnp.concatenate([batch[hook] for hook in self.target_hooks], axis=-1)

    def init_layout(self, key: jax.Array, d, n_latents: int, dtype=jnp.float32) -> dict:
        """Random unit encoder columns; each latent's decoders into its own and later layers
        random with norm 1 / (L - l) each (their sum of norms is 1), the rest zero."""
        d_in, d_out = self.widths(d)
        n_layers = self.n_layers
        enc_key, dec_key = jax.random.split(key)
        W_enc = jax.random.normal(enc_key, (n_layers, d_in, n_latents), dtype)
        W_enc = W_enc / jnp.linalg.norm(W_enc, axis=1, keepdims=True)
        W_dec = jax.random.normal(dec_key, (n_layers, n_layers, n_latents, d_out), dtype)
        targets = (n_layers - jnp.arange(n_layers, dtype=dtype))[:, None, None, None]
        W_dec = (W_dec / (targets * jnp.linalg.norm(W_dec, axis=-1, keepdims=True))
                 * causal_mask(n_layers, dtype))
        return {"W_enc": W_enc, "b_enc": jnp.zeros((n_layers, n_latents), dtype),
                "W_dec": W_dec, "b_dec": jnp.zeros((n_layers * d_out,), dtype)}

    def raw(self, params: dict, x: jax.Array) -> jax.Array:
        return jnp.einsum("...ld,ldn->...ln", x, params["W_enc"])

    def pre_activations(self, params: dict, x: jax.Array) -> jax.Array:
        return add_bias(self.raw(params, x), params["b_enc"])

    def masked_decoder(self, params: dict) -> jax.Array:
        W_dec = params["W_dec"]
        return W_dec * causal_mask(W_dec.shape[-4], W_dec.dtype)

    def decode_latents(self, params: dict, latents: jax.Array) -> jax.Array:
        """Every layer's reconstruction [batch, L * d_out] without b_dec."""
        y = jnp.einsum("...ln,lmnd->...md", latents, self.masked_decoder(params))
        return y.reshape(*y.shape[:-2], -1)

    def decode(self, params: dict, latents: jax.Array, x: jax.Array | None = None):
        del x
        return self.decode_latents(params, latents) + params["b_dec"]

    # The sparse decode (TopK's `sae.topk_decoder`): each layer's k selected latents, as
    # `sparse.py` decodes a single-hook SAE's, one source layer at a time.
    def encode_selected(self, params: dict, x: jax.Array, pre: jax.Array,
                        indices: jax.Array) -> jax.Array:
        """[batch, L, k]: `pre[b, l, indices[b, l, j]]`, the gradient reaching each layer's
        encoder through its k selected columns (`sparse.encode_selected` per layer; the CLT's
        encoder reads x itself, so its input offset is zero)."""
        offset = jnp.zeros(x.shape[-1:], x.dtype)
        return jnp.stack([sparse.encode_selected(
            {"W_enc": params["W_enc"][l], "b_enc": params["b_enc"][l], "b_dec": offset},
            x[..., l, :], pre[..., l, :], indices[..., l, :]) for l in range(self.n_layers)],
            axis=-2)

    def decode_selected(self, W_dec: jax.Array, indices: jax.Array,
                        values: jax.Array) -> jax.Array:
        """Every layer's reconstruction [batch, L * d_out] without b_dec from latents that are
        zero outside `indices` [batch, L, k]: source layer l's k rows of its decoders into
        layers l .. L-1 side by side (`sparse.decode_selected`), so only the L (L + 1) / 2
        unmasked blocks are read, k rows each."""
        n_layers, _, n_latents, d_out = W_dec.shape
        decoded = []                                                # [batch, (L - l) d_out]
        for l in range(n_layers):
            rows = jnp.swapaxes(W_dec[l, l:], 0, 1).reshape(n_latents, -1)
            decoded.append(sparse.decode_selected(rows, indices[..., l, :], values[..., l, :]))
        return jnp.concatenate([
            sum(decoded[l][..., (m - l) * d_out:(m - l + 1) * d_out] for l in range(m + 1))
            for m in range(n_layers)], axis=-1)

    def fire_counts(self, indices: jax.Array, values: jax.Array, n_latents: int) -> jax.Array:
        """[L, n]: `sparse.fire_counts` of each layer's selection."""
        return jnp.stack([sparse.fire_counts(indices[..., l, :], values[..., l, :], n_latents)
                          for l in range(self.n_layers)])

    def decode_layer(self, params: dict, latents: jax.Array, layer: int) -> jax.Array:
        """Layer `layer`'s MLP output [batch, d_out] from the latents [batch, L', n] of the
        first L' > layer layers (a replacement model has those when it reaches the MLP)."""
        sources = layer + 1
        if latents.shape[-2] < sources:
            raise ValueError(f"decode_layer(layer={layer}) needs the latents of layers 0..{layer}"
                             f"; got {latents.shape[-2]} layers.")
        W_dec = params["W_dec"][:sources, layer]                     # [l <= layer, n, d_out]
        d_out = W_dec.shape[-1]
        b_dec = params["b_dec"][layer * d_out:(layer + 1) * d_out]
        return jnp.einsum("...ln,lnd->...d", latents[..., :sources, :], W_dec) + b_dec

    def decoder_norms(self, params: dict) -> jax.Array:
        """[L, n]: each latent's decoder norms summed over the layers it writes to. The
        masked blocks are left out before the norm: its gradient at zero is 0 / 0."""
        W_dec = params["W_dec"]
        written = causal_mask(W_dec.shape[-4], bool)
        norms = jnp.linalg.norm(jnp.where(written, W_dec, 1.0), axis=-1)
        return jnp.sum(jnp.where(written[..., 0], norms, 0.0), axis=-2)

    def decoder_rows(self, params: dict) -> jax.Array:
        """[L * n, L * d_out]: latent (l, j)'s decoders into every layer side by side (zero
        before l), what the ground truth's feature directions are compared with."""
        W_dec = self.masked_decoder(params)
        n_layers, _, n_latents, d_out = W_dec.shape[-4:]
        rows = jnp.swapaxes(W_dec, -3, -2)                          # [L_src, n, L_tgt, d]
        return rows.reshape(*W_dec.shape[:-4], n_layers * n_latents, n_layers * d_out)

    def split_target(self, target: jax.Array) -> dict[str, jax.Array]:
        return dict(zip(self.target_hooks, jnp.split(target, self.n_layers, axis=-1)))

    eval_metrics = _no_metrics  # fvu/<target hook> is every multi-hook target's (saejax.step)

    def spliced_hooks(self, lm_hook: str) -> tuple[str, str]:
        del lm_hook
        raise ConfigError("a CLT is not spliced at one hook: it replaces every MLP output at "
                          "once, and its loss recovered is its replacement model's "
                          "(saejax.evals.downstream.evaluate_replacement, which a run uses "
                          "for it).")

    def flops_per_token(self, d, n_latents: int) -> int:
        """Encoder 2 L d_in n forward and 2 L d_in n for its weight's gradient (none to the
        input); the masked decoder, all L^2 blocks, 2 L^2 n d_out forward and 4 backward. The
        dense count (10 d n, `base.dense_flops_per_token`) is subtracted: the mechanism adds
        it."""
        d_in, d_out = self.widths(d)
        n_layers, n = self.n_layers, int(n_latents)
        dense = 10 * (max(d.values()) if isinstance(d, dict) else int(d)) * n
        return 4 * n_layers * d_in * n + 6 * n_layers ** 2 * n * d_out - dense

    def sparse_flops_per_token(self, d, n_latents: int, selected: int) -> int:
        """The sparse decode's: the selection's encoders (2 L d_in n), then per layer and
        selected latent (`selected` a layer: k, and k_aux for AuxK) its encoder column (2 d_in
        forward, 4 backward) and its decoder rows into its own and later layers ((L - l) of
        them, 2 d_out forward and 4 backward each), as TopK counts a single hook's."""
        d_in, d_out = self.widths(d)
        n_layers = self.n_layers
        blocks = n_layers * (n_layers + 1) // 2
        return 2 * n_layers * d_in * int(n_latents) + 6 * selected * (
            n_layers * d_in + blocks * d_out)

    def temporaries(self, counts):
        """Dense decode: the mechanism's counts plus the masked decoder and its gradient
        (param-sized). Sparse (`counts.selected_rows` a layer): a token gathers its selected
        latents' rows of every unmasked block, L (L + 1) / 2 of them, and the decoder's copy
        with its latents ahead of its targets (`decode_selected`) is about param-sized."""
        if counts.selected_rows:
            blocks = self.n_layers * (self.n_layers + 1) // 2
            return counts._replace(selected_rows=counts.selected_rows * blocks,
                                   param_copies=counts.param_copies + 1)
        return counts._replace(param_copies=counts.param_copies + 1)

    def validate(self, config, n_latents: int) -> None:
        del n_latents
        if config.sae.architecture not in MECHANISMS:
            raise ConfigError(f"sae.shape='clt' composes with sae.architecture in {MECHANISMS}, "
                              f"not {config.sae.architecture!r}.")
        if int(config.resample.every_steps):
            raise ConfigError("a CLT's dead latents are not resampled (its encoder and "
                              "decoder are per layer): set resample.every_steps=0 (TopK and "
                              "BatchTopK revive dead latents with AuxK).")

    def to_saelens(self, form: str, tensors: dict, params: dict):
        del tensors, params
        raise ConfigError(f"SAELens has no cross-layer transcoder it can load from disk (it "
                          f"reads a CLT only from Hugging Face, one layer at a time, as a "
                          f"transcoder for feature activations); a {form!r} CLT of "
                          f"{self.n_layers} layers cannot be exported to it.")

    def config_fields(self) -> dict:
        return {"shape": self.name, "layers": ",".join(map(str, self.layers)),
                "input_hook": self.input_hook, "target_hook": self.target_hook}


def encode_layer(architecture, params: dict, x: jax.Array, layer: int,
                 sae_config) -> jax.Array:
    """Latents [batch, n] of layer `layer` (an index into the CLT's layers) from its input
    x [batch, d_in], by the mechanism's inference encoding (every mechanism of `MECHANISMS`
    encodes each layer on its own: TopK's k is per layer)."""
    shape = architecture.shape
    one_layer = shape._replace(layers=(shape.layers[layer],))
    sliced = {name: value[layer:layer + 1] if architecture.param_axes[name][:1] == ("layer",)
              else value for name, value in params.items()}
    latents = architecture.mechanism.encode(sliced, x[..., None, :], sae_config,
                                            shape=one_layer)
    return latents[..., 0, :]


def parse_layers(layers) -> tuple[int, ...]:
    """`sae.layers`: comma-separated layer numbers, or ranges `a-b` (inclusive)."""
    text = str(layers).replace(" ", "")
    try:
        numbers: list[int] = []
        for part in filter(None, text.split(",")):
            start, _, stop = part.partition("-")
            numbers.extend(range(int(start), int(stop or start) + 1))
    except ValueError:
        numbers = []
    if not numbers or len(set(numbers)) != len(numbers) or numbers != sorted(numbers) or (
            numbers[0] < 0):
        raise ConfigError(f"sae.layers={layers!r}: a CLT needs its layers as increasing, "
                          "distinct layer numbers, comma-separated or as a range, e.g. "
                          "'0,1,2,3' or '0-3'.")
    return tuple(numbers)


def from_config(sae_config) -> CrossLayerTranscoder:
    """`sae.shape=clt` with `sae.layers` and the hook templates `sae.input_hook` and
    `sae.target_hook` (their `{layer}` is each layer's number; empty: the MLP's input and
    output)."""
    layers = parse_layers(sae_config.get("layers", ""))
    hooks = {}
    for field, default in (("input_hook", DEFAULT_INPUT_HOOK),
                           ("target_hook", DEFAULT_TARGET_HOOK)):
        template = str(sae_config.get(field) or default)
        if "{layer}" not in template:
            raise ConfigError(f"sae.{field}={template!r} has no {{layer}}: a CLT reads one hook "
                              f"per layer; give a template such as {default!r}.")
        hooks[field] = template
    if hooks["input_hook"] == hooks["target_hook"]:
        raise ConfigError(f"sae.input_hook and sae.target_hook are both "
                          f"{hooks['input_hook']!r}; a CLT reads each layer's MLP input and "
                          "reconstructs its output.")
    if tuple(sae_config.get("matryoshka_widths", ()) or ()):
        raise ConfigError("sae.matryoshka_widths does not combine with sae.shape='clt'; set "
                          "it to ().")
    return CrossLayerTranscoder(layers, **hooks)


shapes.register("clt", from_config)
