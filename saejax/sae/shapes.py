"""The dictionary's shape: what it reads from a batch, what it reconstructs, and the layout of
the params that connect the two (encoder, decoder, their biases).

A shape is one half of an architecture; the other is the sparsity mechanism (ReLU + L1, TopK,
JumpReLU, ...; `base.Mechanism`). `saejax.sae.compose(mechanism, shape)` makes the pair an
`Architecture`, so a transcoder with JumpReLU is a combination, not a file. A mechanism reads
the dictionary only through its shape: `input` / `target` of the batch, `pre_activations`
(and `raw`, without the encoder bias, for gated), `decode`, `decoder_norms`.

This module owns the transcoder, the registry of shapes (`SHAPES`, `register`, `from_config`)
and SAELens' names for them, and re-exports the dense layout's names (`single_hook.py`), so
every shape is reached as `shapes.<name>`. The shapes:
- `SingleHook` (single_hook.py): encodes a batch's one entry and reconstructs it (an SAE).
- `Transcoder(input_hook, target_hook)`: reads one hook and reconstructs another (Dunefsky et
  al. 2024), so nothing is subtracted from the input before the encoder (the encoder bias is
  the input-side bias); with `skip_connection`, a linear skip `x @ W_skip` is added to the
  reconstruction (Paulo et al. 2025, "Transcoders beat sparse autoencoders").
- `CrossLayerTranscoder(layers, ...)` (clt.py, which registers it here): layer l's latents,
  encoded from its MLP input, decode into the MLP outputs of layer l and every later layer
  (Ameisen et al. 2025); the latents are [batch, layer, latent].
- `Crosscoder(hooks)` (crosscoder.py, which registers it here): reads several hooks (layers of
  one model, or one hook of two models) into one shared code and reconstructs every one of
  them (Lindsey et al. 2024): the hooks' activations side by side are the input and the
  target, so an encoder per hook summed is one matmul, and a decoder row is the latent's
  decoders of every hook side by side. Its decoder norms are free (no unit-norm constraint);
  an L1 penalty weights each latent by the sum of its per-hook decoder norms.
Matryoshka prefixes wrap any of them (`matryoshka.Matryoshka`: nested prefixes of the latents,
each reconstructing the target).

Params are a plain dict pytree; every function is pure and jit-able. Widths: `d` is an int
(every entry that wide) or `{hook: width}`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax.errors import ConfigError
# The dense layout and the single-hook shape, named here as every importer names them.
from saejax.sae.single_hook import (  # noqa: F401
    PARAM_AXES, RESAMPLE, SINGLE_HOOK, Entry, SingleHook, _no_metrics, _one_target, _one_width,
    _row_norms, add_bias, decode, init_params, pre_activations)

TRANSCODER_AXES = {
    "W_enc": ("embed_in", "latent"),
    "b_enc": ("latent",),
    "W_dec": ("latent", "embed_out"),
    "b_dec": ("embed_out",),
}


class Transcoder(NamedTuple):
    """Reads `input_hook`, reconstructs `target_hook`: `pre = x_in @ W_enc + b_enc`,
    `x_hat = f @ W_dec + b_dec (+ x_in @ W_skip)`. `W_enc [d_in, n]`, `W_dec [n, d_out]`,
    `b_dec [d_out]` (initialised by `sae.b_dec_init` from the target), `W_skip [d_in, d_out]`
    starting at zero. Resampling points a dead latent's decoder row at a badly reconstructed
    token's target and its encoder column at that token's input."""

    input_hook: str
    target_hook: str
    skip_connection: bool = False
    name: str = "transcoder"
    resample: dict = RESAMPLE
    unit_norm_params: tuple[str, ...] = ("W_dec",)

    @property
    def param_axes(self) -> dict:
        skip = {"W_skip": ("embed_in", "embed_out")} if self.skip_connection else {}
        return {**TRANSCODER_AXES, **skip}

    def entries(self, widths: dict[str, int]) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
        for field, hook in (("sae.input_hook", self.input_hook),
                            ("sae.target_hook", self.target_hook)):
            if hook not in widths:
                raise ConfigError(f"{field}={hook!r} is not an entry of the data's batches "
                                  f"({sorted(widths)}); set it to one of them.")
        return ((Entry(self.input_hook, int(widths[self.input_hook]), ("batch", "embed_in")),),
                (Entry(self.target_hook, int(widths[self.target_hook]),
                       ("batch", "embed_out")),))

    def widths(self, d) -> tuple[int, int]:
        """(d_in, d_out) of `d`: an int for both, or {hook: width}."""
        if isinstance(d, dict):
            return int(d[self.input_hook]), int(d[self.target_hook])
        return int(d), int(d)

    def input(self, batch: dict) -> jax.Array:
        return batch[self.input_hook]

    def target(self, batch: dict) -> jax.Array:
        return batch[self.target_hook]

    def init_layout(self, key: jax.Array, d, n_latents: int, dtype=jnp.float32) -> dict:
        """Unit-norm random decoder rows; the encoder random too (the two sides differ)."""
        d_in, d_out = self.widths(d)
        dec_key, enc_key = jax.random.split(key)
        W_dec = jax.random.normal(dec_key, (n_latents, d_out), dtype)
        W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
        W_enc = jax.random.normal(enc_key, (d_in, n_latents), dtype)
        W_enc = W_enc / jnp.linalg.norm(W_enc, axis=0, keepdims=True)
        params = {"W_enc": W_enc, "b_enc": jnp.zeros((n_latents,), dtype), "W_dec": W_dec,
                  "b_dec": jnp.zeros((d_out,), dtype)}
        if self.skip_connection:
            params["W_skip"] = jnp.zeros((d_in, d_out), dtype)
        return params

    def raw(self, params: dict, x: jax.Array) -> jax.Array:
        return x @ params["W_enc"]

    def pre_activations(self, params: dict, x: jax.Array) -> jax.Array:
        return add_bias(x @ params["W_enc"], params["b_enc"])

    def decode(self, params: dict, latents: jax.Array, x: jax.Array | None = None):
        x_hat = latents @ params["W_dec"] + params["b_dec"]
        if self.skip_connection:
            if x is None:
                raise ValueError("a transcoder with a skip connection decodes with its input: "
                                 "pass decode(params, latents, x).")
            x_hat = x_hat + x @ params["W_skip"]
        return x_hat

    def decode_latents(self, params: dict, latents: jax.Array) -> jax.Array:
        return latents @ params["W_dec"]

    decoder_norms = _row_norms
    split_target = _one_target

    def spliced_hooks(self, lm_hook: str) -> tuple[str, str]:
        """The MLP's input (or whatever `input_hook` is) read clean, its output replaced."""
        del lm_hook
        return self.input_hook, self.target_hook

    eval_metrics = _no_metrics

    def flops_per_token(self, d, n_latents: int) -> int:
        """The skip's matmul, 2 d_in d_out forward and 4 backward (its weight and none to the
        input); the dense count takes d_in = d_out = d."""
        del n_latents
        d_in, d_out = self.widths(d)
        return 6 * d_in * d_out if self.skip_connection else 0

    # SAELens' form (saejax.analysis.saelens): sae_lens/saes/transcoder.py encodes the input
    # without subtracting b_dec (apply_b_dec_to_input must be false), decodes to `d_out`, and
    # keeps the skip as `W_skip [d_out, d_in]`.
    def to_saelens(self, form: str, tensors: dict, params: dict):
        name = SAELENS_TRANSCODERS.get((form, self.skip_connection))
        if name is None:
            with_skip = " with a skip connection" if self.skip_connection else ""
            raise ConfigError(
                f"SAELens has no transcoder{with_skip} for its {form!r} SAE; its transcoders are "
                + ", ".join(f"{n!r} (from {f!r}{', skip' if skip else ''})"
                            for (f, skip), n in SAELENS_TRANSCODERS.items()) + ".")
        tensors = dict(tensors)
        if self.skip_connection:
            tensors["W_skip"] = params["W_skip"].T
        return (name, tensors,
                {"d_out": int(params["W_dec"].shape[1]), "apply_b_dec_to_input": False},
                {"hook_name": self.input_hook, "hook_name_out": self.target_hook})

    def saelens_required(self, d_in: int, d_sae: int, cfg: dict) -> dict:
        d_out = int(cfg.get("d_out") or 0)
        required = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
        return {**required, "W_skip": (d_out, d_in)} if self.skip_connection else required

    def from_saelens(self, params: dict, tensors: dict, cfg: dict, conversion):
        del conversion
        if cfg.get("apply_b_dec_to_input"):
            raise ConfigError("apply_b_dec_to_input=true: a transcoder's b_dec is on the "
                              "output side (SAELens refuses it too); it must be false.")
        if self.skip_connection:
            params = {**params, "W_skip": tensors["W_skip"].T}
        return params, []

    def config_fields(self) -> dict:
        return {"shape": self.name, "input_hook": self.input_hook,
                "target_hook": self.target_hook, "skip_connection": self.skip_connection}


# The `config.sae` fields that choose and configure the shape (configs.py declares them).
SHAPE_FIELDS = {
    "shape": "single_hook",
    "input_hook": "",
    "target_hook": "",
    "skip_connection": False,
    "hooks": "",   # a crosscoder's hooks, comma-separated
    "layers": "",  # a CLT's layers: "0,1,2" or "0-2"
}


def _transcoder_from_config(sae_config) -> Transcoder:
    for field in ("input_hook", "target_hook"):
        if not sae_config.get(field):
            raise ConfigError(f"sae.shape='transcoder' needs sae.{field}: the hook it "
                              f"{'reads' if field == 'input_hook' else 'reconstructs'}.")
    if sae_config.input_hook == sae_config.target_hook:
        raise ConfigError(f"sae.input_hook and sae.target_hook are both "
                          f"{sae_config.input_hook!r}; a transcoder reconstructs another "
                          "hook (use sae.shape='single_hook' for an SAE).")
    return Transcoder(str(sae_config.input_hook), str(sae_config.target_hook),
                      bool(sae_config.get("skip_connection", False)))


# Each `sae.shape` name and what builds it from `config.sae`; a shape in a file of its own
# (crosscoder.py) adds itself with `register`.
SHAPES = {"single_hook": lambda sae_config: SINGLE_HOOK, "transcoder": _transcoder_from_config}


def register(name: str, build) -> None:
    """`sae.shape=name` builds `build(sae_config)`."""
    SHAPES[name] = build


def from_config(sae_config):
    """The shape `sae.shape` names, with its fields (`sae.input_hook`, ...)."""
    name = sae_config.get("shape", "single_hook")
    if name not in SHAPES:
        raise ConfigError(f"sae.shape={name!r} is not known; choose one of {tuple(SHAPES)}.")
    return SHAPES[name](sae_config)


# SAELens' transcoder classes (sae_lens/saes/transcoder.py) by the SAE form a mechanism exports
# to (`SaeLens.to_saelens`) and whether there is a skip connection. SAELens has none for TopK or
# gated dictionaries.
SAELENS_TRANSCODERS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}


def from_saelens(saelens_architecture: str, cfg: dict):
    """(shape, SAELens SAE form its mechanism reads) of a SAELens architecture: a transcoder
    class reads as the `Transcoder` shape from `hook_name` to `hook_name_out`, any other as
    the single-hook SAE it is."""
    for (form, skip), name in SAELENS_TRANSCODERS.items():
        if name == saelens_architecture:
            input_hook = cfg.get("hook_name") or "input"
            target_hook = cfg.get("hook_name_out") or "target"
            if target_hook == input_hook:
                target_hook = f"{input_hook}.out"
            return Transcoder(input_hook, target_hook, skip), form
    return SINGLE_HOOK, saelens_architecture
