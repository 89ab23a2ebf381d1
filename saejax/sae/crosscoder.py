"""The crosscoder shape (Lindsey et al. 2024, "Sparse crosscoders for cross-layer features and
model diffing"): several hooks (layers of one model, or one hook of two models) read into one
shared code, each reconstructed. A shape like those of `shapes.py`, composed with any dense
mechanism (`sae.shape=crosscoder`, `sae.hooks=a,b,c`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from saejax.errors import ConfigError
from saejax.sae import shapes
from saejax.sae.shapes import RESAMPLE, TRANSCODER_AXES, Entry, _no_metrics, add_bias


class Crosscoder(NamedTuple):
    """Reads every hook of `hooks` into one shared code and reconstructs each of them.

    With `x = [x_1 | ... | x_L]` (the hooks' activations side by side, each `d` wide):
    `pre = x @ W_enc + b_enc` (the sum of a per-hook encoder's terms, no bias subtracted first,
    as Lindsey et al. write it), `x_hat = f @ W_dec + b_dec`, `W_dec [n, L d]` being each
    latent's per-hook decoders side by side. The hooks must have one width. The decoder norms
    are free: `decoder_norms` is the sum over hooks of each per-hook decoder's norm, what an L1
    penalty weights by, so the penalty is the crosscoder's and the scale of the decoders is
    learnt. Resampling points a dead latent at a badly reconstructed token of every hook."""

    hooks: tuple[str, ...]
    name: str = "crosscoder"
    param_axes: dict = TRANSCODER_AXES
    resample: dict = RESAMPLE
    unit_norm_params: tuple[str, ...] = ()

    def entries(self, widths: dict[str, int]) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
        missing = [hook for hook in self.hooks if hook not in widths]
        if missing:
            raise ConfigError(f"sae.hooks names {missing}, not entries of the data's batches "
                              f"({sorted(widths)}); name hooks among them.")
        if len({int(widths[hook]) for hook in self.hooks}) != 1:
            raise ConfigError(f"a crosscoder reads hooks of one width; sae.hooks have "
                              f"{ {hook: int(widths[hook]) for hook in self.hooks} }.")
        read = tuple(Entry(hook, int(widths[hook]), ("batch", "embed_in")) for hook in self.hooks)
        return read, tuple(e._replace(axes=("batch", "embed_out")) for e in read)

    def width(self, d) -> int:
        """The width of one hook: `d`, or the hooks' one value of {hook: width}."""
        if isinstance(d, dict):
            return int(d[self.hooks[0]])
        return int(d)

    def input(self, batch: dict) -> jax.Array:
        return jnp.concatenate([batch[hook] for hook in self.hooks], axis=-1)

    # Each hook is normalised on its own (Lindsey et al.): residual norms grow with depth, and
    # one scale of the hooks side by side would leave the deep ones dominating the loss.
    @property
    def input_scale_shape(self) -> tuple[int]:
        return (len(self.hooks),)

    def scale_batch(self, batch: dict, scale) -> dict:
        """`{hook: x * scale[hooks.index(hook)]}` of any of its hooks."""
        unknown = [hook for hook in batch if hook not in self.hooks]
        if unknown:
            raise ValueError(f"the crosscoder's input scales are of its hooks {self.hooks}; "
                             f"{unknown} is none of them.")
        return {hook: x * scale[..., self.hooks.index(hook)] for hook, x in batch.items()}

    def input_scale_of(self, batch: dict) -> jax.Array:
        """[n_hooks]: each hook's rsqrt(mean squared norm)."""
        return jnp.stack([jax.lax.rsqrt(jnp.mean(jnp.sum(jnp.square(batch[hook]), axis=-1)))
                          for hook in self.hooks])

    def column_scales(self, scale, width: int):
        """[width]: each hook's scale over its columns of the hooks side by side."""
        return jnp.repeat(scale, width // len(self.hooks), axis=-1,
                          total_repeat_length=width)

    def target(self, batch: dict) -> jax.Array:
        return self.input(batch)

    def init_layout(self, key: jax.Array, d, n_latents: int, dtype=jnp.float32) -> dict:
        """Each latent's per-hook decoders random with norm 1 / L (their sum of norms is 1),
        the encoder their transpose."""
        width, n_hooks = self.width(d), len(self.hooks)
        W_dec = jax.random.normal(key, (n_latents, n_hooks, width), dtype)
        W_dec = W_dec / (n_hooks * jnp.linalg.norm(W_dec, axis=-1, keepdims=True))
        W_dec = W_dec.reshape(n_latents, n_hooks * width)
        return {"W_enc": W_dec.T, "b_enc": jnp.zeros((n_latents,), dtype), "W_dec": W_dec,
                "b_dec": jnp.zeros((n_hooks * width,), dtype)}

    def raw(self, params: dict, x: jax.Array) -> jax.Array:
        return x @ params["W_enc"]

    def pre_activations(self, params: dict, x: jax.Array) -> jax.Array:
        return add_bias(x @ params["W_enc"], params["b_enc"])

    def decode(self, params: dict, latents: jax.Array, x: jax.Array | None = None):
        del x
        return latents @ params["W_dec"] + params["b_dec"]

    def decode_latents(self, params: dict, latents: jax.Array) -> jax.Array:
        return latents @ params["W_dec"]

    def decoder_norms(self, params: dict) -> jax.Array:
        W_dec = params["W_dec"]
        per_hook = W_dec.reshape(*W_dec.shape[:-1], len(self.hooks), -1)
        return jnp.sum(jnp.linalg.norm(per_hook, axis=-1), axis=-1)

    def split_target(self, target: jax.Array) -> dict[str, jax.Array]:
        return dict(zip(self.hooks, jnp.split(target, len(self.hooks), axis=-1)))

    eval_metrics = _no_metrics  # the per-hook FVU is every multi-hook target's (saejax.step)

    @property
    def replaced_hooks(self) -> tuple[str, ...]:
        """The hooks its loss recovered replaces by their parts of the one decode, all at once
        and each alone (saejax.evals.downstream.evaluate_hooks)."""
        return self.hooks

    def spliced_hooks(self, lm_hook: str) -> tuple[str, str]:
        del lm_hook
        raise ConfigError("a crosscoder is not spliced at one hook: its loss recovered "
                          "replaces every hook it reads (`replaced_hooks`; "
                          "saejax.evals.downstream.evaluate_hooks, which a run uses for it).")

    def flops_per_token(self, d, n_latents: int) -> int:
        """The dense count takes one hook's width; the other hooks' encoder and decoder
        columns add as much again each."""
        return 10 * (len(self.hooks) - 1) * self.width(d) * n_latents

    def to_saelens(self, form: str, tensors: dict, params: dict):
        del tensors, params
        raise ConfigError(f"SAELens has no crosscoder (its {form!r} SAE reads one hook); a "
                          f"crosscoder of {len(self.hooks)} hooks cannot be exported to it.")

    def config_fields(self) -> dict:
        return {"shape": self.name, "hooks": ",".join(self.hooks)}


def from_config(sae_config) -> Crosscoder:
    """`sae.shape=crosscoder` with its `sae.hooks` (comma-separated)."""
    hooks = tuple(h.strip() for h in str(sae_config.get("hooks", "")).split(",") if h.strip())
    if len(hooks) < 2 or len(set(hooks)) != len(hooks):
        raise ConfigError(f"sae.shape='crosscoder' needs sae.hooks: two or more distinct "
                          f"hooks it reads and reconstructs, comma-separated (got "
                          f"{sae_config.get('hooks', '')!r}).")
    return Crosscoder(hooks)


shapes.register("crosscoder", from_config)
