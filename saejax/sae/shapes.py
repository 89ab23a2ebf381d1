"""The dictionary's shape: what it reads from a batch, what it reconstructs, and the layout of
the params that connect the two (encoder, decoder, their biases).

A shape is one half of an architecture; the other is the sparsity mechanism (ReLU + L1, TopK,
JumpReLU, ...; `base.Mechanism`). `saejax.sae.compose(mechanism, shape)` makes the pair an
`Architecture`, so a transcoder with JumpReLU is a combination, not a file. A mechanism reads
the dictionary only through its shape: `input` / `target` of the batch, `pre_activations`
(and `raw`, without the encoder bias, for gated), `decode`, `decoder_norms`.

Shapes here:
- `SingleHook`: encodes a batch's one entry and reconstructs it (an SAE).
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
