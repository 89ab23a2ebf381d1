"""What each kind of dictionary reads and writes, as the analysis tools see it (`Kind`), and
the pieces every tool shares: encoding raw activations of the hooks it reads into one flat
latent index, naming a latent, and the directions a latent writes.

- an SAE reads and writes its one hook;
- a transcoder reads its input hook (`sae.input_hook`) and writes its target
  (`sae.target_hook`);
- a crosscoder reads every hook of `sae.hooks` into one code and writes each of them: its
  decoder row `W_dec[i] [L * d]` is the per-hook decoders side by side;
- a cross-layer transcoder reads each layer's input hook into latents [layer, n]; the tools
  index them flat, latent (l, i) as `l * n + i`, and latent (l, i) writes the MLP outputs of
  layers l .. L-1 (`W_dec[l, m, i]`, m >= l).

Raw units: a hook's raw activation is multiplied by `loaded.scale_of(hook)` before encoding,
and what the decoder writes at a hook is divided by it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Kind(NamedTuple):
    """The hooks a dictionary reads (in the order its encoder stacks them) and writes, and its
    latent layout: `n_layers` x `per_layer` latents (1 x n_latents unless a CLT), each read
    hook `width` wide."""

    name: str                    # "sae", "transcoder", "crosscoder" or "clt"
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    n_layers: int
    per_layer: int
    width: int
    layers: tuple[int, ...] = ()  # a CLT's model layers

    @property
    def n_latents(self) -> int:
        """Latents in the flat index every tool uses."""
        return self.n_layers * self.per_layer

    @property
    def acausal(self) -> bool:
        """Whether a latent is read at hooks after some it writes (a crosscoder's code spans
        layers), so steering must read it from a clean pass."""
        return self.name == "crosscoder"


def shape_of(architecture):
    """The dictionary's shape, Matryoshka's prefixes unwrapped (they do not change what it
    reads or writes)."""
    shape = architecture.shape
    while getattr(shape, "inner", None) is not None:
        shape = shape.inner
    return shape


def kind_of(loaded, hook: str | None = None) -> Kind:
    """The `Kind` of a `LoadedSAE`; an SAE's hook is `hook`, else the one it was trained at."""
    shape = shape_of(loaded.architecture)
    W_enc = loaded.params["W_enc"]
    if hasattr(shape, "layers") and hasattr(shape, "input_hooks"):
        n_layers, d, n = W_enc.shape
        return Kind("clt", tuple(shape.input_hooks), tuple(shape.target_hooks), int(n_layers),
                    int(n), int(d), tuple(shape.layers))
    d, n = W_enc.shape[-2:]
    if hasattr(shape, "hooks"):
        hooks = tuple(shape.hooks)
        return Kind("crosscoder", hooks, hooks, 1, int(n), int(d) // len(hooks))
    if hasattr(shape, "input_hook"):
        return Kind("transcoder", (shape.input_hook,), (shape.target_hook,), 1, int(n), int(d))
    hook = hook or loaded.hook or "the SAE's hook"
    return Kind("sae", (hook,), (hook,), 1, int(n), int(d))


def read_scales(loaded, kind: Kind) -> np.ndarray:
    """float32 [len(kind.reads)]: each read hook's input scale."""
    return np.asarray([loaded.scale_of(h) for h in kind.reads], np.float32)


def shape_input(kind: Kind, x):
    """The encoder's input from the read hooks' scaled activations stacked `[rows, H, d]`: one
    hook's `[rows, d]`, a crosscoder's side by side `[rows, H * d]`, a CLT's `[rows, L, d]`."""
    if kind.name == "crosscoder":
        return x.reshape(x.shape[0], -1)
    if kind.name == "clt":
        return x
    return x[:, 0]


def encode_scaled(kind: Kind, architecture, params, x, sae_config):
    """Flat latents `[rows, n_latents]` of scaled activations `[rows, H, d]` (jit-able)."""
    latents = architecture.encode(params, shape_input(kind, x), sae_config)
    return latents.reshape(latents.shape[0], -1)


def encode(loaded, activations) -> jnp.ndarray:
    """Flat latents `[..., n_latents]` of raw activations: `{hook: [..., d]}` of every read
    hook, or one array `[..., H, d]` stacked in `kind.reads` order."""
    kind = kind_of(loaded)
    if isinstance(activations, dict):
        activations = jnp.stack([jnp.asarray(activations[h], jnp.float32)
                                 for h in kind.reads], axis=-2)
    x = jnp.asarray(activations, jnp.float32)
    lead = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:]) * read_scales(loaded, kind)[:, None]
    latents = encode_scaled(kind, loaded.architecture, loaded.params, flat, loaded.sae_config)
    return latents.reshape(*lead, latents.shape[-1])


def split(kind: Kind, latent: int) -> tuple[int, int]:
    """(layer index into the kind's layers, index within that layer) of a flat latent."""
    return divmod(int(latent), kind.per_layer)


def describe_latent(kind: Kind, latent: int) -> str:
    """Where a latent sits and reads: a CLT's layer and index within it; '' for one code."""
    if kind.name != "clt":
        return ""
    layer, index = split(kind, latent)
    return (f"layer {kind.layers[layer]}'s latent {index} (flat index {layer} * "
            f"{kind.per_layer} + {index}), read at {kind.reads[layer]}")


def write_directions(loaded, latent: int, kind: Kind | None = None) -> dict[str, np.ndarray]:
    """{hook: what one unit of `latent` adds there, raw units [d_out]}: an SAE's or a
    transcoder's `W_dec[i]` at its hook, a crosscoder's decoder slice at each of its hooks, a
    CLT latent (l, i)'s `W_dec[l, m, i]` at each MLP output m >= l."""
    kind = kind or kind_of(loaded)
    W_dec = np.asarray(loaded.params["W_dec"], np.float32)
    if kind.name == "clt":
        layer, index = split(kind, latent)
        return {kind.writes[m]: W_dec[layer, m, index] / np.float32(loaded.scale_of(
            kind.writes[m])) for m in range(layer, kind.n_layers)}
    if kind.name == "crosscoder":
        rows = W_dec[latent].reshape(len(kind.writes), -1)
        return {h: rows[j] / np.float32(loaded.scale_of(h)) for j, h in enumerate(kind.writes)}
    (hook,) = kind.writes
    return {hook: W_dec[latent] / np.float32(loaded.scale_of(hook))}


def logit_directions(loaded, latents) -> np.ndarray:
    """[len(latents), d]: the direction each latent's logit view reads (raw units). An SAE's
    or transcoder's decoder row; a crosscoder's slice at its last hook (the latest layer,
    nearest the unembedding); a CLT latent's writes summed over the MLP outputs m >= l: each
    lands in the residual stream, which carries their sum to the unembedding, so the sum is
    its direct effect on the logits (its own layer's decoder alone would miss what it writes
    later)."""
    kind = kind_of(loaded)
    if kind.name == "sae":
        W_dec = np.asarray(loaded.params["W_dec"], np.float32)
        return W_dec[np.asarray(latents, np.int64)] / np.float32(loaded.scale_of(kind.writes[0]))
    rows = []
    for i in latents:
        written = write_directions(loaded, int(i), kind)
        rows.append(written[kind.writes[-1]] if kind.name == "crosscoder"
                    else np.sum(list(written.values()), axis=0))
    width = int(np.shape(loaded.params["W_dec"])[-1]) // (
        len(kind.writes) if kind.name == "crosscoder" else 1)
    return np.asarray(rows, np.float32).reshape(len(rows), width)


def logit_note(kind: Kind) -> str:
    """What the logit view of this kind reads, for the page."""
    return {
        "sae": "W_dec[i] at the hook",
        "transcoder": f"W_dec[i], what the latent writes into {kind.writes[0]}",
        "crosscoder": f"the latent's decoder slice at its last hook, {kind.writes[-1]}",
        "clt": ("the latent's decoders summed over the MLP outputs it writes (its own layer's "
                "and every later one's: the residual stream carries their sum to the "
                "unembedding)"),
    }[kind.name]
