"""The Gemma family: Gemma 2 and Gemma 3 (text). Against a Llama: RMSNorm multiplies by (1 + w),
norms before and after both attention and MLP, the embedding is scaled by sqrt(d_model), GeGLU
(tanh gelu), queries scaled by query_pre_attn_scalar^-1/2, and layers alternate sliding-window and
global attention. Gemma 2 soft-caps attention scores and final logits; Gemma 3 normalises each
query and key head and gives its local layers their own rope base (rope_local_base_freq)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from saejax.models import base, hf, layers, llama

MODEL_TYPES = ("gemma2", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class GemmaConfig(base.LMConfig):
    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = False
    # Per layer: the sliding window (None: global attention) and which rope it uses.
    layer_windows: tuple[int | None, ...] = ()
    rope_global: layers.Rope = layers.Rope()
    rope_local: layers.Rope = layers.Rope()
    bos_token_id: int | None = None
    block_hooks = layers.SEQUENTIAL_HOOKS

    def __post_init__(self):
        layers.check_activation(self.hidden_activation, "hidden_activation")
        if len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for "
                             f"{self.num_hidden_layers} layers.")

    n_layers = property(lambda self: self.num_hidden_layers)
    layer_kind = lambda self, layer: self.layer_windows[layer]
    d_model = property(lambda self: self.hidden_size)
    max_positions = property(lambda self: self.max_position_embeddings)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> GemmaConfig:
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            hint = (" (a multimodal Gemma 3 checkpoint: its text model is what saejax reads; "
                    "save model.language_model with its text_config)"
                    if model_type == "gemma3" else "")
            raise ValueError(f"model_type={model_type!r} is not one of {list(MODEL_TYPES)}{hint}.")
        gemma3 = model_type == "gemma3_text"
        hf.check_fields(
            d, family=model_type,
            reads={"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_activation",
                   "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                   "attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                   "final_logit_softcapping", "sliding_window", "layer_types",
                   "sliding_window_pattern", "rope_theta", "rope_local_base_freq", "rope_scaling",
                   "rope_parameters"},
            ignores={"cache_implementation", "use_bidirectional_attention",
                     "_sliding_window_pattern"},
            assumes={"use_bidirectional_attention": False})
        n = d.get("num_hidden_layers", 26)
        pattern = d.get("sliding_window_pattern", 6) if gemma3 else 2
        types = d.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        window = d.get("sliding_window", 4096)
        rope_global, rope_local = _ropes(d, gemma3)
        activation = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        return cls(
            model_type=model_type, vocab_size=d.get("vocab_size", 262208 if gemma3 else 256000),
            hidden_size=d.get("hidden_size", 2304), intermediate_size=d.get("intermediate_size",
                                                                            9216),
            num_hidden_layers=n, num_attention_heads=d.get("num_attention_heads", 8),
            num_key_value_heads=d.get("num_key_value_heads", 4), head_dim=d.get("head_dim", 256),
            hidden_activation=activation,
            max_position_embeddings=d.get("max_position_embeddings", 131072 if gemma3 else 8192),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=bool(d.get("attention_bias", False)),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=d.get("attn_logit_softcapping", None if gemma3 else 50.0),
            final_logit_softcapping=d.get("final_logit_softcapping", None if gemma3 else 30.0),
            qk_norm=gemma3, layer_windows=tuple(window if t == SLIDING else None for t in types),
            rope_global=rope_global, rope_local=rope_local, bos_token_id=d.get("bos_token_id"))


def _ropes(d: Mapping[str, Any], gemma3: bool) -> tuple[layers.Rope, layers.Rope]:
    """(global, local) rope. Gemma 3's config nests rope_parameters by layer type in
    transformers 5, and used rope_theta / rope_local_base_freq / rope_scaling (global only)
    before."""
    params = d.get("rope_parameters") or {}
    max_positions = d.get("max_position_embeddings", 131072)
    if not gemma3:
        rope = layers.read_rope(params or d.get("rope_scaling"),
                                default_theta=d.get("rope_theta", 10000.0),
                                max_position_embeddings=max_positions)
        return rope, rope
    if FULL in params or SLIDING in params:
        full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
    else:
        full, sliding = d.get("rope_scaling") or {}, {}
    global_ = layers.read_rope(full, default_theta=d.get("rope_theta", 1_000_000.0),
                               max_position_embeddings=max_positions,
                               where=f"rope_parameters.{FULL}")
    local = layers.read_rope(sliding, default_theta=d.get("rope_local_base_freq", 10_000.0),
                             max_position_embeddings=max_positions,
                             where=f"rope_parameters.{SLIDING}")
    return global_, local


def param_specs(c: GemmaConfig) -> dict:
    as_llama = llama.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias,
        qk_norm=c.qk_norm)
    specs = llama.param_specs(as_llama)
    # (1 + w) norms start at w = 0.
    zero = lambda s: dataclasses.replace(s, value=0.0)
    blocks = specs["blocks"]
    for name in ("ln1", "ln2"):
        blocks[name] = zero(blocks[name])
    blocks["post_attn_norm"] = blocks["ln1"]
    blocks["post_mlp_norm"] = blocks["ln1"]
    if c.qk_norm:
        blocks["attn"]["q_norm"] = zero(blocks["attn"]["q_norm"])
        blocks["attn"]["k_norm"] = zero(blocks["attn"]["k_norm"])
    specs["final_norm"] = zero(specs["final_norm"])
    return specs


def load_params(path: str, c: GemmaConfig) -> dict:
    t = hf.Tensors(path, strip=("model.",))
    d, h, kv, e = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def layer(i):
        p = f"layers.{i}"
        attn = llama.read_attention(t, f"{p}.self_attn", d, h, kv, e, q_bias=c.attention_bias,
                                    o_bias=c.attention_bias)
        if c.qk_norm:
            attn["q_norm"] = t.take(f"{p}.self_attn.q_norm.weight", (e,))
            attn["k_norm"] = t.take(f"{p}.self_attn.k_norm.weight", (e,))
        return {"ln1": t.take(f"{p}.input_layernorm.weight", (d,)), "attn": attn,
                "post_attn_norm": t.take(f"{p}.post_attention_layernorm.weight", (d,)),
                "ln2": t.take(f"{p}.pre_feedforward_layernorm.weight", (d,)),
                "post_mlp_norm": t.take(f"{p}.post_feedforward_layernorm.weight", (d,)),
                "mlp": llama.read_gated_mlp(t, f"{p}.mlp", d, c.intermediate_size, bias=False)}

    params = llama.read_embeddings(t, c, {"blocks": hf.stack_layers(c.num_hidden_layers, layer)})
    t.check_all_read()
    return params


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def embed(params: dict, tokens: jax.Array, c: GemmaConfig, dtype) -> jax.Array:
    # The scale is rounded to the activation dtype first, as transformers does.
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    return x * jnp.asarray(c.hidden_size ** 0.5, dtype)


def context(c: GemmaConfig, seq: int) -> dict:
    return {"global": layers.rotary_tables(c.rope_global, c.head_dim, seq),
            "local": layers.rotary_tables(c.rope_local, c.head_dim, seq)}


def block(p: dict, x: jax.Array, c: GemmaConfig, layer: int, hook, ropes) -> jax.Array:
    eps, window = c.rms_norm_eps, c.layer_windows[layer]
    norm = lambda h, w: layers.rms_norm(h, w, eps, plus_one=True)

    def attn(h):
        out = llama.attention_branch(
            p["attn"], norm(h, p["ln1"]), rope=ropes["global" if window is None else "local"],
            eps=eps, scale=c.query_pre_attn_scalar ** -0.5, window=window, qk_norm=c.qk_norm,
            plus_one=True, softcap=c.attn_logit_softcapping)
        return norm(out, p["post_attn_norm"])

    return layers.sequential_block(
        x, hook, attn=attn, norm2=lambda h: norm(h, p["ln2"]),
        mlp_fn=lambda h: norm(layers.gated_mlp(h, p["mlp"], c.hidden_activation),
                              p["post_mlp_norm"]))


def final_norm(params: dict, x: jax.Array, c: GemmaConfig) -> jax.Array:
    return layers.rms_norm(x, params["final_norm"], c.rms_norm_eps, plus_one=True)


unembedding = llama.unembedding
