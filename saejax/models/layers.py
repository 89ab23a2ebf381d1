"""The layers every LM family is built from, as pure functions of arrays: norms, rotary position
embeddings, attention (grouped-query, causal or sliding-window, soft-capped), MLPs, and the wiring
of a sequential or parallel block with its hook points. A family file picks among them; the
numerics follow Hugging Face transformers' modeling files (the reference of the parity tests).

Shapes: activations [batch, seq, d]; q [batch, seq, heads, head_dim]; k, v [batch, seq,
kv_heads, head_dim]. Norms and softmax run in float32 whatever the activation dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from saejax import sharding

Hook = Callable[[str, jax.Array], jax.Array]


# ------------------------------------------------------------------------------------------------
# Norms and activations
# ------------------------------------------------------------------------------------------------

def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, plus_one: bool = False) -> jax.Array:
    """x / rms(x) * w; Gemma stores w - 1 (`plus_one`: multiply by 1 + w, in float32)."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32)
    return (h * (1.0 + w if plus_one else w)).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + eps)
    return (h * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# Hugging Face's activation names; "gelu" is the exact (erf) one.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def check_activation(name: str, field: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json sets {field}={name!r}; supported: {sorted(ACTIVATIONS)}.")
    return name


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention and final logits); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rope:
    """One rotary embedding: its base, how much of each head it rotates, and its scaling
    (`rope_type` "default", "linear", or "llama3" with Llama 3.1's frequency bands)."""

    theta: float = 10000.0
    rope_type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        dim = int(head_dim * self.partial_rotary_factor)
        inv = 1.0 / (self.theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            return inv / np.float32(self.factor)
        if self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor
                                                               - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


ROPE_TYPES = ("default", "linear", "llama3")


def read_rope(params: Mapping[str, Any] | None, *, default_theta: float,
              partial_rotary_factor: float = 1.0, max_position_embeddings: int = 8192,
              where: str = "rope_parameters") -> Rope:
    """A `Rope` from transformers' `rope_parameters` dict (or an old `rope_scaling` dict with the
    base passed as `default_theta`); a scaling saejax does not implement is an error naming it."""
    p = dict(params or {})
    rope_type = p.pop("rope_type", p.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json sets {where}.rope_type={rope_type!r}; saejax implements "
                         f"{list(ROPE_TYPES)}.")
    rope = Rope(theta=float(p.pop("rope_theta", default_theta)), rope_type=rope_type,
                partial_rotary_factor=float(p.pop("partial_rotary_factor",
                                                  partial_rotary_factor)))
    if rope_type == "linear":
        rope = dataclasses.replace(rope, factor=float(p.pop("factor")))
    elif rope_type == "llama3":
        rope = dataclasses.replace(
            rope, factor=float(p.pop("factor")), low_freq_factor=float(p.pop("low_freq_factor")),
            high_freq_factor=float(p.pop("high_freq_factor")),
            original_max_position_embeddings=int(p.pop("original_max_position_embeddings",
                                                       max_position_embeddings)))
    unknown = {k: v for k, v in p.items() if v is not None}
    if unknown:
        raise ValueError(f"config.json sets {where} fields {unknown} that saejax does not read "
                         f"for rope_type={rope_type!r}.")
    return rope


def rotary_tables(rope: Rope, head_dim: int, seq: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [seq, rotary_dim] for positions 0 .. seq - 1 (HF's layout: the two halves)."""
    inv = jnp.asarray(rope.inv_freq(head_dim))
    freqs = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first cos.shape[-1] features of each head (HF's rotate_half convention); the
    rest pass through (partial rotary)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)  # [seq, 1, rot]
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

def attention_mask(seq: int, window: int | None) -> jax.Array:
    """[seq, seq] bool: causal, and with `window` each query sees only its last `window` keys
    (the query's own position included), as transformers' sliding_window_overlay."""
    q = jnp.arange(seq)[:, None]
    k = jnp.arange(seq)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              window: int | None = None, softcap: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, soft-capped, masked) v with grouped-query heads: query head h reads
    key/value head h // (heads / kv_heads). Returns [batch, seq, heads, head_dim]."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k).astype(jnp.float32) * scale
    scores = soft_cap(scores, softcap)
    scores = jnp.where(attention_mask(s, window), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


def project(x: jax.Array, p: Mapping[str, jax.Array], name: str) -> jax.Array:
    """x [..., d] @ p[name] [d, *out] (+ p[name + "_bias"] when the family has one)."""
    w = p[name].astype(x.dtype)
    out = jnp.tensordot(x, w, axes=1)
    bias = p.get(f"{name}_bias")
    return out if bias is None else out + bias.astype(x.dtype)


def project_qkv(x: jax.Array, p: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
    """q, k, v from one matmul: the three weights concatenated along the head axis (a copy of
    the weights, small beside the matmul once a batch holds more tokens than d_model). When the
    ambient rules split the heads over devices (tensor parallel), three matmuls instead: each
    device projects its own heads, where the concatenation would regather them."""
    if sharding.is_split("heads"):
        return tuple(project(x, p, name) for name in "qkv")
    h, kv = p["q"].shape[1], p["k"].shape[1]
    w = jnp.concatenate([p["q"], p["k"], p["v"]], axis=1).astype(x.dtype)
    out = jnp.tensordot(x, w, axes=1)
    if "q_bias" in p:
        out = out + jnp.concatenate([p["q_bias"], p["k_bias"], p["v_bias"]]).astype(x.dtype)
    return out[..., :h, :], out[..., h:h + kv, :], out[..., h + kv:, :]


def out_project(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """Heads [b, s, heads, head_dim] @ p["o"] [heads, head_dim, d] (+ o_bias)."""
    out = jnp.einsum("bshe,hed->bsd", x, p["o"].astype(x.dtype))
    bias = p.get("o_bias")
    return out if bias is None else out + bias.astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# MLPs
# ------------------------------------------------------------------------------------------------

def gated_mlp(x: jax.Array, p: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu."""
    h = ACTIVATIONS[activation](project(x, p, "gate")) * project(x, p, "up")
    return project(h, p, "down")


def mlp(x: jax.Array, p: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """down(act(up(x))): GPT-2's and GPT-NeoX's MLP."""
    return project(ACTIVATIONS[activation](project(x, p, "up")), p, "down")


# ------------------------------------------------------------------------------------------------
# Blocks, with their hook points (TransformerLens's names)
# ------------------------------------------------------------------------------------------------

SEQUENTIAL_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
                    "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")
# A parallel block's MLP reads the block's input: there is no resid_mid.
PARALLEL_HOOKS = tuple(h for h in SEQUENTIAL_HOOKS if h != "hook_resid_mid")


def sequential_block(x: jax.Array, hook: Hook, *, attn: Callable, norm2: Callable,
                     mlp_fn: Callable) -> jax.Array:
    """x + attn_out, then + mlp_out. `attn(x)` is the whole attention branch (its norms
    included); hook_mlp_in is what the MLP branch receives (an intervention there changes the
    MLP's input, not the residual), ln2.hook_normalized its normalised input."""
    x = hook("hook_resid_pre", x)
    mid = hook("hook_resid_mid", x + hook("hook_attn_out", attn(x)))
    normalized = hook("ln2.hook_normalized", norm2(hook("hook_mlp_in", mid)))
    return hook("hook_resid_post", mid + hook("hook_mlp_out", mlp_fn(normalized)))


def parallel_block(x: jax.Array, hook: Hook, *, attn: Callable, norm2: Callable,
                   mlp_fn: Callable) -> jax.Array:
    """x + attn_out + mlp_out, both branches reading x (GPT-NeoX's use_parallel_residual)."""
    x = hook("hook_resid_pre", x)
    attn_out = hook("hook_attn_out", attn(x))
    normalized = hook("ln2.hook_normalized", norm2(hook("hook_mlp_in", x)))
    return hook("hook_resid_post", x + attn_out + hook("hook_mlp_out", mlp_fn(normalized)))
