"""The Llama family: Llama 2 and 3.x (rope scaling "llama3"), Mistral (sliding window), Qwen2 /
Qwen2.5 (q/k/v biases), Qwen3 (q/k RMSNorm), SmolLM2 (a Llama): pre-RMSNorm blocks, rotary
embeddings, grouped-query attention, SwiGLU, tied or untied embeddings."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from saejax.models import base, hf, layers

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class LlamaConfig(base.LMConfig):
    """The architecture, with Hugging Face's field names where one field maps to one of ours."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # biases on q, k, v and o (Llama, Qwen3)
    qkv_bias: bool = False            # biases on q, k, v only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False             # RMSNorm of each query and key head (Qwen3)
    rope: layers.Rope = layers.Rope()
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = global
    bos_token_id: int | None = None
    final_logit_softcapping: float | None = None
    block_hooks = layers.SEQUENTIAL_HOOKS

    def __post_init__(self):
        layers.check_activation(self.hidden_act, "hidden_act")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}.")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_hidden_layers)
        if len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for "
                             f"{self.num_hidden_layers} layers.")

    n_layers = property(lambda self: self.num_hidden_layers)
    layer_kind = lambda self, layer: self.layer_windows[layer]
    d_model = property(lambda self: self.hidden_size)
    max_positions = property(lambda self: self.max_position_embeddings)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not a Llama-family model "
                             f"({list(MODEL_TYPES)}).")
        qwen = model_type in ("qwen2", "qwen3")
        reads = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                 "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor"}
        reads |= {"sliding_window"} if model_type == "mistral" else set()
        reads |= {"attention_bias"} if model_type in ("llama", "qwen3") else set()
        reads |= {"mlp_bias"} if model_type == "llama" else set()
        if qwen:
            reads |= {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
        # SmolLM2's configs mark themselves with is_llama_config.
        hf.check_fields(d, family=model_type, reads=reads,
                        ignores={"original_max_position_embeddings", "is_llama_config"},
                        assumes={"rope_interleaved": False})
        defaults = {"qwen3": 128}
        n_layers, n_heads = d.get("num_hidden_layers", 32), d.get("num_attention_heads", 32)
        hidden = d.get("hidden_size", 4096)
        head_dim = d.get("head_dim") or defaults.get(model_type) or hidden // n_heads
        max_positions = d.get("max_position_embeddings", 2048)
        rope_dict = d.get("rope_parameters") or d.get("rope_scaling")
        rope = layers.read_rope(rope_dict, default_theta=d.get("rope_theta", 10000.0),
                                partial_rotary_factor=d.get("partial_rotary_factor", 1.0),
                                max_position_embeddings=d.get("original_max_position_embeddings",
                                                              max_positions))
        return cls(
            model_type=model_type, vocab_size=d.get("vocab_size", 32000), hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", 11008), num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            hidden_act=d.get("hidden_act", "silu"), max_position_embeddings=max_positions,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), qkv_bias=model_type == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=model_type == "qwen3", rope=rope,
            layer_windows=_windows(d, model_type, n_layers), bos_token_id=d.get("bos_token_id"))


def _windows(d: Mapping[str, Any], model_type: str, n_layers: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window or None, as transformers decides it per model type."""
    if model_type == "mistral":
        return (d.get("sliding_window"),) * n_layers
    if model_type not in ("qwen2", "qwen3"):
        return (None,) * n_layers
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    types = d.get("layer_types") or [
        SLIDING if window is not None and i >= d.get("max_window_layers", 28) else FULL
        for i in range(n_layers)]
    return tuple(window if t == SLIDING else None for t in types)


def param_specs(c: LlamaConfig) -> dict:
    d, h, kv, e, f = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                      c.intermediate_size)
    normal = 0.02
    attn = {"q": base.Spec((d, h, e), ("embed", "heads", "head_dim"), normal),
            "k": base.Spec((d, kv, e), ("embed", "kv_heads", "head_dim"), normal),
            "v": base.Spec((d, kv, e), ("embed", "kv_heads", "head_dim"), normal),
            "o": base.Spec((h, e, d), ("heads", "head_dim", "embed"), normal)}
    if c.attention_bias or c.qkv_bias:
        attn |= {"q_bias": base.Spec((h, e), ("heads", "head_dim")),
                 "k_bias": base.Spec((kv, e), ("kv_heads", "head_dim")),
                 "v_bias": base.Spec((kv, e), ("kv_heads", "head_dim"))}
    if c.attention_bias:
        attn["o_bias"] = base.Spec((d,), ("embed",))
    if c.qk_norm:
        attn |= {"q_norm": base.Spec((e,), ("head_dim",), value=1.0),
                 "k_norm": base.Spec((e,), ("head_dim",), value=1.0)}
    mlp = {"gate": base.Spec((d, f), ("embed", "mlp"), normal),
           "up": base.Spec((d, f), ("embed", "mlp"), normal),
           "down": base.Spec((f, d), ("mlp", "embed"), normal)}
    if c.mlp_bias:
        mlp |= {"gate_bias": base.Spec((f,), ("mlp",)), "up_bias": base.Spec((f,), ("mlp",)),
                "down_bias": base.Spec((d,), ("embed",))}
    block = {"ln1": base.Spec((d,), ("embed",), value=1.0), "attn": attn,
             "ln2": base.Spec((d,), ("embed",), value=1.0), "mlp": mlp}
    specs = {"embed": base.Spec((c.vocab_size, d), ("vocab", "embed"), normal),
             "blocks": base.layered(c.num_hidden_layers, block),
             "final_norm": base.Spec((d,), ("embed",), value=1.0)}
    if not c.tie_word_embeddings:
        specs["unembed"] = base.Spec((d, c.vocab_size), ("embed", "vocab"), normal)
    return specs


def read_attention(t: hf.Tensors, prefix: str, d: int, h: int, kv: int, e: int, *,
                   q_bias: bool, o_bias: bool) -> dict:
    """q/k/v/o_proj (HF Linear, [out, in]) as [d, heads, head_dim] and [heads, head_dim, d]."""
    out = {"q": t.take(f"{prefix}.q_proj.weight", (h * e, d)).T.reshape(d, h, e),
           "k": t.take(f"{prefix}.k_proj.weight", (kv * e, d)).T.reshape(d, kv, e),
           "v": t.take(f"{prefix}.v_proj.weight", (kv * e, d)).T.reshape(d, kv, e),
           "o": t.take(f"{prefix}.o_proj.weight", (d, h * e)).T.reshape(h, e, d)}
    if q_bias:
        out["q_bias"] = t.take(f"{prefix}.q_proj.bias", (h * e,)).reshape(h, e)
        out["k_bias"] = t.take(f"{prefix}.k_proj.bias", (kv * e,)).reshape(kv, e)
        out["v_bias"] = t.take(f"{prefix}.v_proj.bias", (kv * e,)).reshape(kv, e)
    if o_bias:
        out["o_bias"] = t.take(f"{prefix}.o_proj.bias", (d,))
    return out


def read_gated_mlp(t: hf.Tensors, prefix: str, d: int, f: int, *, bias: bool) -> dict:
    out = {"gate": t.take(f"{prefix}.gate_proj.weight", (f, d)).T,
           "up": t.take(f"{prefix}.up_proj.weight", (f, d)).T,
           "down": t.take(f"{prefix}.down_proj.weight", (d, f)).T}
    if bias:
        out |= {"gate_bias": t.take(f"{prefix}.gate_proj.bias", (f,)),
                "up_bias": t.take(f"{prefix}.up_proj.bias", (f,)),
                "down_bias": t.take(f"{prefix}.down_proj.bias", (d,))}
    return out


def read_embeddings(t: hf.Tensors, c, params: dict) -> dict:
    """embed_tokens, norm and (untied) lm_head; a tied checkpoint may still store lm_head."""
    params["embed"] = t.take("embed_tokens.weight", (c.vocab_size, c.hidden_size))
    params["final_norm"] = t.take("norm.weight", (c.hidden_size,))
    if c.tie_word_embeddings:
        t.maybe("lm_head.weight", (c.vocab_size, c.hidden_size))
    else:
        params["unembed"] = t.take("lm_head.weight", (c.vocab_size, c.hidden_size),
                                   "tie_word_embeddings is false").T
    return params


def load_params(path: str, c: LlamaConfig) -> dict:
    t = hf.Tensors(path, strip=("model.",))
    d, h, kv, e = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def layer(i):
        p = f"layers.{i}"
        attn = read_attention(t, f"{p}.self_attn", d, h, kv, e,
                              q_bias=c.attention_bias or c.qkv_bias, o_bias=c.attention_bias)
        if c.qk_norm:
            attn["q_norm"] = t.take(f"{p}.self_attn.q_norm.weight", (e,))
            attn["k_norm"] = t.take(f"{p}.self_attn.k_norm.weight", (e,))
        return {"ln1": t.take(f"{p}.input_layernorm.weight", (d,)), "attn": attn,
                "ln2": t.take(f"{p}.post_attention_layernorm.weight", (d,)),
                "mlp": read_gated_mlp(t, f"{p}.mlp", d, c.intermediate_size, bias=c.mlp_bias)}

    params = read_embeddings(t, c, {"blocks": hf.stack_layers(c.num_hidden_layers, layer)})
    t.check_all_read(lambda n: n.endswith("rotary_emb.inv_freq"))
    return params


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def embed(params: dict, tokens: jax.Array, c: LlamaConfig, dtype) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


def context(c: LlamaConfig, seq: int) -> tuple[jax.Array, jax.Array]:
    return layers.rotary_tables(c.rope, c.head_dim, seq)


def attention_branch(p: dict, x: jax.Array, *, rope: tuple, eps: float, scale: float,
                     window: int | None, qk_norm: bool, plus_one: bool = False,
                     softcap: float | None = None) -> jax.Array:
    """The attention of a Llama or Gemma block from its normalised input."""
    q, k, v = layers.project_qkv(x, p)
    if qk_norm:
        q = layers.rms_norm(q, p["q_norm"], eps, plus_one=plus_one)
        k = layers.rms_norm(k, p["k_norm"], eps, plus_one=plus_one)
    q, k = layers.apply_rotary(q, *rope), layers.apply_rotary(k, *rope)
    out = layers.attention(q, k, v, scale=scale, window=window, softcap=softcap)
    return layers.out_project(out, p)


def block(p: dict, x: jax.Array, c: LlamaConfig, layer: int, hook, rope) -> jax.Array:
    eps = c.rms_norm_eps
    attn = lambda h: attention_branch(
        p["attn"], layers.rms_norm(h, p["ln1"], eps), rope=rope, eps=eps,
        scale=c.head_dim ** -0.5, window=c.layer_windows[layer], qk_norm=c.qk_norm)
    return layers.sequential_block(
        x, hook, attn=attn, norm2=lambda h: layers.rms_norm(h, p["ln2"], eps),
        mlp_fn=lambda h: layers.gated_mlp(h, p["mlp"], c.hidden_act))


def final_norm(params: dict, x: jax.Array, c: LlamaConfig) -> jax.Array:
    return layers.rms_norm(x, params["final_norm"], c.rms_norm_eps)


def unembedding(params: dict, c: LlamaConfig) -> jax.Array:
    """W_U [d_model, vocab]."""
    return params["embed"].T if c.tie_word_embeddings else params["unembed"]
