"""The GPT-2 family (GPT-2, distilgpt2): learned positions, pre-LayerNorm blocks, a fused
Conv1D query/key/value projection, a gelu MLP, the unembedding tied to the token embedding.
Checkpoints are read and written in the Hugging Face layout from a local directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from saejax.models import base, hf, layers

MODEL_TYPES = ("gpt2",)
# HF's names for GPT-2's gelus; "gelu" is the exact (erf) one, the others the tanh approximation.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


@dataclasses.dataclass(frozen=True)
class GPT2Config(base.LMConfig):
    """The architecture; field names and defaults are Hugging Face's (GPT-2 small)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    n_inner: int | None = None  # MLP width; None means 4 * n_embd.
    model_type = "gpt2"
    block_hooks = layers.SEQUENTIAL_HOOKS
    bos_token_id = None  # documents are separated by the tokenizer's <|endoftext|>
    final_logit_softcapping = None

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not supported; "
                             f"choose one of {list(ACTIVATIONS)}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")

    n_layers = property(lambda self: self.n_layer)
    d_model = property(lambda self: self.n_embd)
    max_positions = property(lambda self: self.n_positions)

    @property
    def d_mlp(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> GPT2Config:
        """Reads a Hugging Face config.json dict; a setting this model does not implement is an
        error naming the field, never silently ignored. Missing fields take HF's defaults."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type={d['model_type']!r} is not GPT-2.")
        hf.check_fields(
            d, family="gpt2",
            reads={f.name for f in dataclasses.fields(cls)} | {"n_ctx"},
            assumes={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "add_cross_attention": False, "tie_word_embeddings": True,
                     "reorder_and_upcast_attn": False})
        activation = d.get("activation_function", cls.activation_function)
        if activation not in ACTIVATIONS:
            raise ValueError(f"config.json sets activation_function={activation!r}; supported: "
                             f"{list(ACTIVATIONS)}.")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        if "n_positions" not in kwargs and d.get("n_ctx") is not None:  # very old configs
            kwargs["n_positions"] = d["n_ctx"]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                **dataclasses.asdict(self),
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False, "tie_word_embeddings": True}


def param_specs(c: GPT2Config) -> dict:
    """GPT-2's initialisation: normal(0.02), the residual projections (attention out, MLP down)
    shrunk by 1/sqrt(2 n_layer) so the stream's variance does not grow with depth (Radford et
    al. 2019, as in HF's _init_weights); LayerNorms at (1, 0)."""
    d, h, f = c.n_embd, c.n_head, c.d_mlp
    e, std, proj = d // h, 0.02, 0.02 / math.sqrt(2 * c.n_layer)
    norm = {"scale": base.Spec((d,), ("embed",), value=1.0), "bias": base.Spec((d,), ("embed",))}
    attn = {n: base.Spec((d, h, e), ("embed", "heads", "head_dim"), std) for n in "qkv"}
    attn |= {f"{n}_bias": base.Spec((h, e), ("heads", "head_dim")) for n in "qkv"}
    attn |= {"o": base.Spec((h, e, d), ("heads", "head_dim", "embed"), proj),
             "o_bias": base.Spec((d,), ("embed",))}
    block = {"ln1": norm, "attn": attn, "ln2": norm,
             "mlp": {"up": base.Spec((d, f), ("embed", "mlp"), std),
                     "up_bias": base.Spec((f,), ("mlp",)),
                     "down": base.Spec((f, d), ("mlp", "embed"), proj),
                     "down_bias": base.Spec((d,), ("embed",))}}
    return {"embed": base.Spec((c.vocab_size, d), ("vocab", "embed"), std),
            "pos_embed": base.Spec((c.n_positions, d), ("positions", "embed"), std),
            "blocks": base.layered(c.n_layer, block), "final_norm": norm}


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

def embed(params: dict, tokens: jax.Array, c: GPT2Config, dtype) -> jax.Array:
    x = jnp.take(params["embed"], tokens, axis=0) + params["pos_embed"][:tokens.shape[1]]
    return x.astype(dtype)


def context(c: GPT2Config, seq: int) -> None:
    del c, seq


def block(p: dict, x: jax.Array, c: GPT2Config, layer: int, hook, ctx) -> jax.Array:
    del layer, ctx
    eps = c.layer_norm_epsilon
    norm = lambda h, n: layers.layer_norm(h, n["scale"], n["bias"], eps)

    def attn(h):
        h = norm(h, p["ln1"])
        q, k, v = layers.project_qkv(h, p["attn"])
        out = layers.attention(q, k, v, scale=(c.n_embd // c.n_head) ** -0.5)
        return layers.out_project(out, p["attn"])

    return layers.sequential_block(x, hook, attn=attn, norm2=lambda h: norm(h, p["ln2"]),
                                   mlp_fn=lambda h: layers.mlp(h, p["mlp"],
                                                               c.activation_function))


def final_norm(params: dict, x: jax.Array, c: GPT2Config) -> jax.Array:
    n = params["final_norm"]
    return layers.layer_norm(x, n["scale"], n["bias"], c.layer_norm_epsilon)


def unembedding(params: dict, c: GPT2Config) -> jax.Array:
    del c
    return params["embed"].T  # tied to the token embedding


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ------------------------------------------------------------------------------------------------

# Tensors a HF checkpoint may hold that carry nothing this model needs: the causal-mask buffers
# of older transformers versions.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def _hf_layer(c: GPT2Config) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF tensor name within block i, shape) for one block; Conv1D weights are [in, out]."""
    d, f = c.n_embd, c.d_mlp
    for ln in ("ln_1", "ln_2"):
        yield f"{ln}.weight", (d,)
        yield f"{ln}.bias", (d,)
    for name, d_in, d_out in (("attn.c_attn", d, 3 * d), ("attn.c_proj", d, d),
                              ("mlp.c_fc", d, f), ("mlp.c_proj", f, d)):
        yield f"{name}.weight", (d_in, d_out)
        yield f"{name}.bias", (d_out,)


def _from_hf_layer(w: Mapping[str, np.ndarray], c: GPT2Config) -> dict:
    d, h = c.n_embd, c.n_head
    e = d // h
    qkv = w["attn.c_attn.weight"].reshape(d, 3, h, e)
    qkv_bias = w["attn.c_attn.bias"].reshape(3, h, e)
    attn = {n: qkv[:, j] for j, n in enumerate("qkv")}
    attn |= {f"{n}_bias": qkv_bias[j] for j, n in enumerate("qkv")}
    attn |= {"o": w["attn.c_proj.weight"].reshape(h, e, d), "o_bias": w["attn.c_proj.bias"]}
    norm = lambda ln: {"scale": w[f"{ln}.weight"], "bias": w[f"{ln}.bias"]}
    return {"ln1": norm("ln_1"), "attn": attn, "ln2": norm("ln_2"),
            "mlp": {"up": w["mlp.c_fc.weight"], "up_bias": w["mlp.c_fc.bias"],
                    "down": w["mlp.c_proj.weight"], "down_bias": w["mlp.c_proj.bias"]}}


def _to_hf_layer(p: Mapping[str, Any], c: GPT2Config) -> dict[str, np.ndarray]:
    d = c.n_embd
    a, m = p["attn"], p["mlp"]
    return {"ln_1.weight": p["ln1"]["scale"], "ln_1.bias": p["ln1"]["bias"],
            "ln_2.weight": p["ln2"]["scale"], "ln_2.bias": p["ln2"]["bias"],
            "attn.c_attn.weight": np.stack([a["q"], a["k"], a["v"]], 1).reshape(d, 3 * d),
            "attn.c_attn.bias": np.stack([a["q_bias"], a["k_bias"], a["v_bias"]]).reshape(-1),
            "attn.c_proj.weight": np.asarray(a["o"]).reshape(d, d), "attn.c_proj.bias": a["o_bias"],
            "mlp.c_fc.weight": m["up"], "mlp.c_fc.bias": m["up_bias"],
            "mlp.c_proj.weight": m["down"], "mlp.c_proj.bias": m["down_bias"]}


def load_params(path: str, c: GPT2Config) -> dict:
    # GPT2LMHeadModel prefixes its weights with `transformer.`; GPT2Model does not.
    t = hf.Tensors(path, strip=("transformer.",))
    d = c.n_embd

    def layer(i):
        return _from_hf_layer({n: t.take(f"h.{i}.{n}", s) for n, s in _hf_layer(c)}, c)

    params = {"embed": t.take("wte.weight", (c.vocab_size, d)),
              "pos_embed": t.take("wpe.weight", (c.n_positions, d)),
              "blocks": hf.stack_layers(c.n_layer, layer),
              "final_norm": {"scale": t.take("ln_f.weight", (d,)),
                             "bias": t.take("ln_f.bias", (d,))}}
    lm_head = t.maybe("lm_head.weight", (c.vocab_size, d))
    if lm_head is not None and not np.array_equal(lm_head, params["embed"]):
        raise ValueError(f"lm_head.weight in {path} differs from wte.weight; this implementation "
                         f"ties the unembedding to the token embedding.")
    t.check_all_read(lambda n: _IGNORED.fullmatch(n) is not None)
    return params


def save_pretrained(path: str | os.PathLike, config: GPT2Config, params: dict) -> str:
    """Writes config.json and model.safetensors as Hugging Face's GPT2LMHeadModel does, so that
    saejax and `transformers.GPT2LMHeadModel.from_pretrained` both read it."""
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    expected = jax.tree.map(lambda s: s.shape, param_specs(config),
                            is_leaf=lambda x: isinstance(x, base.Spec))
    got = jax.tree.map(lambda x: x.shape, params)
    if got != expected:
        raise ValueError(f"params do not match the config: shapes {got} but the config implies "
                         f"{expected}.")
    tensors = {"wte.weight": params["embed"], "wpe.weight": params["pos_embed"],
               "ln_f.weight": params["final_norm"]["scale"],
               "ln_f.bias": params["final_norm"]["bias"]}
    for i in range(config.n_layer):
        layer = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
        tensors |= {f"h.{i}.{n}": v for n, v in _to_hf_layer(layer, config).items()}
    tensors = {f"transformer.{n}": np.ascontiguousarray(v, np.float32) for n, v in tensors.items()}
    with open(os.path.join(path, hf.CONFIG_FILE), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    # transformers refuses safetensors files whose metadata does not name a known framework.
    st_numpy.save_file(tensors, os.path.join(path, hf.WEIGHTS_FILE), metadata={"format": "pt"})
    return path
