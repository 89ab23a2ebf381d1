"""The GPT-NeoX family (Pythia): LayerNorm with biases, a fused query/key/value projection laid
out head by head, rotary embeddings on the first rotary_pct of each head, attention and MLP in
parallel off the block's input (use_parallel_residual; sequential otherwise), an untied
unembedding."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from saejax.models import base, hf, layers

MODEL_TYPES = ("gpt_neox",)


@dataclasses.dataclass(frozen=True)
class NeoXConfig(base.LMConfig):
    model_type: str = "gpt_neox"
    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    use_parallel_residual: bool = True
    attention_bias: bool = True
    rope: layers.Rope = layers.Rope(partial_rotary_factor=0.25)
    bos_token_id: int | None = None
    final_logit_softcapping = None

    def __post_init__(self):
        layers.check_activation(self.hidden_act, "hidden_act")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")

    n_layers = property(lambda self: self.num_hidden_layers)
    d_model = property(lambda self: self.hidden_size)
    max_positions = property(lambda self: self.max_position_embeddings)
    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)

    @property
    def block_hooks(self) -> tuple[str, ...]:
        return layers.PARALLEL_HOOKS if self.use_parallel_residual else layers.SEQUENTIAL_HOOKS

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> NeoXConfig:
        hf.check_fields(
            d, family="gpt_neox",
            reads={"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "hidden_act", "max_position_embeddings",
                   "layer_norm_eps", "tie_word_embeddings", "use_parallel_residual",
                   "attention_bias", "rotary_pct", "rotary_emb_base", "rope_scaling",
                   "rope_parameters", "partial_rotary_factor", "rope_theta"},
            ignores={"hidden_dropout", "classifier_dropout", "rotary_emb_base"})
        rope = layers.read_rope(
            d.get("rope_parameters") or d.get("rope_scaling"),
            default_theta=d.get("rope_theta") or d.get("rotary_emb_base", 10000.0),
            partial_rotary_factor=d.get("partial_rotary_factor") or d.get("rotary_pct", 0.25),
            max_position_embeddings=d.get("max_position_embeddings", 2048))
        return cls(
            vocab_size=d.get("vocab_size", 50432), hidden_size=d.get("hidden_size", 6144),
            intermediate_size=d.get("intermediate_size", 24576),
            num_hidden_layers=d.get("num_hidden_layers", 44),
            num_attention_heads=d.get("num_attention_heads", 64),
            hidden_act=d.get("hidden_act", "gelu"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            use_parallel_residual=bool(d.get("use_parallel_residual", True)),
            attention_bias=bool(d.get("attention_bias", True)), rope=rope,
            bos_token_id=d.get("bos_token_id"))


def param_specs(c: NeoXConfig) -> dict:
    d, h, e, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    normal = 0.02
    attn = {"q": base.Spec((d, h, e), ("embed", "heads", "head_dim"), normal),
            "k": base.Spec((d, h, e), ("embed", "heads", "head_dim"), normal),
            "v": base.Spec((d, h, e), ("embed", "heads", "head_dim"), normal),
            "o": base.Spec((h, e, d), ("heads", "head_dim", "embed"), normal)}
    if c.attention_bias:
        attn |= {f"{n}_bias": base.Spec((h, e), ("heads", "head_dim")) for n in "qkv"}
        attn["o_bias"] = base.Spec((d,), ("embed",))
    norm = {"scale": base.Spec((d,), ("embed",), value=1.0), "bias": base.Spec((d,), ("embed",))}
    block = {"ln1": norm, "attn": attn, "ln2": norm,
             "mlp": {"up": base.Spec((d, f), ("embed", "mlp"), normal),
                     "up_bias": base.Spec((f,), ("mlp",)),
                     "down": base.Spec((f, d), ("mlp", "embed"), normal),
                     "down_bias": base.Spec((d,), ("embed",))}}
    specs = {"embed": base.Spec((c.vocab_size, d), ("vocab", "embed"), normal),
             "blocks": base.layered(c.num_hidden_layers, block), "final_norm": norm}
    if not c.tie_word_embeddings:
        specs["unembed"] = base.Spec((d, c.vocab_size), ("embed", "vocab"), normal)
    return specs


def load_params(path: str, c: NeoXConfig) -> dict:
    t = hf.Tensors(path, strip=("gpt_neox.",))
    d, h, e, f = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    norm = lambda name: {"scale": t.take(f"{name}.weight", (d,)), "bias": t.take(f"{name}.bias",
                                                                                   (d,))}

    def layer(i):
        p = f"layers.{i}"
        # query_key_value's outputs are grouped by head: [heads, (q, k, v), head_dim].
        qkv = t.take(f"{p}.attention.query_key_value.weight", (3 * d, d)).T.reshape(d, h, 3, e)
        attn = {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2],
                "o": t.take(f"{p}.attention.dense.weight", (d, d)).T.reshape(h, e, d)}
        if c.attention_bias:
            qkv_bias = t.take(f"{p}.attention.query_key_value.bias", (3 * d,)).reshape(h, 3, e)
            attn |= {"q_bias": qkv_bias[:, 0], "k_bias": qkv_bias[:, 1],
                     "v_bias": qkv_bias[:, 2],
                     "o_bias": t.take(f"{p}.attention.dense.bias", (d,))}
        return {"ln1": norm(f"{p}.input_layernorm"), "attn": attn,
                "ln2": norm(f"{p}.post_attention_layernorm"),
                "mlp": {"up": t.take(f"{p}.mlp.dense_h_to_4h.weight", (f, d)).T,
                        "up_bias": t.take(f"{p}.mlp.dense_h_to_4h.bias", (f,)),
                        "down": t.take(f"{p}.mlp.dense_4h_to_h.weight", (d, f)).T,
                        "down_bias": t.take(f"{p}.mlp.dense_4h_to_h.bias", (d,))}}

    params = {"embed": t.take("embed_in.weight", (c.vocab_size, d)),
              "blocks": hf.stack_layers(c.num_hidden_layers, layer),
              "final_norm": norm("final_layer_norm")}
    if c.tie_word_embeddings:
        t.maybe("embed_out.weight", (c.vocab_size, d))
    else:
        params["unembed"] = t.take("embed_out.weight", (c.vocab_size, d),
                                   "tie_word_embeddings is false").T
    # Older checkpoints store the causal mask and rotary frequencies as buffers.
    t.check_all_read(lambda n: n.endswith(("attention.bias", "attention.masked_bias",
                                           "rotary_emb.inv_freq")))
    return params


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def embed(params: dict, tokens: jax.Array, c: NeoXConfig, dtype) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


def context(c: NeoXConfig, seq: int):
    return layers.rotary_tables(c.rope, c.head_dim, seq)


def block(p: dict, x: jax.Array, c: NeoXConfig, layer: int, hook, rope) -> jax.Array:
    del layer
    eps = c.layer_norm_eps
    norm = lambda h, n: layers.layer_norm(h, n["scale"], n["bias"], eps)

    def attn(h):
        h = norm(h, p["ln1"])
        q, k, v = layers.project_qkv(h, p["attn"])
        q, k = layers.apply_rotary(q, *rope), layers.apply_rotary(k, *rope)
        out = layers.attention(q, k, v, scale=c.head_dim ** -0.5)
        return layers.out_project(out, p["attn"])

    wire = layers.parallel_block if c.use_parallel_residual else layers.sequential_block
    return wire(x, hook, attn=attn, norm2=lambda h: norm(h, p["ln2"]),
                mlp_fn=lambda h: layers.mlp(h, p["mlp"], c.hidden_act))


def final_norm(params: dict, x: jax.Array, c: NeoXConfig) -> jax.Array:
    n = params["final_norm"]
    return layers.layer_norm(x, n["scale"], n["bias"], c.layer_norm_eps)


def unembedding(params: dict, c: NeoXConfig) -> jax.Array:
    return params["embed"].T if c.tie_word_embeddings else params["unembed"]
