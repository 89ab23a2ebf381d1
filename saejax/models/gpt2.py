"""GPT-2 family language models (GPT-2, distilgpt2) in Flax, with named hook points.

The model owns the activations an SAE is trained on: every block exposes
`blocks.{i}.hook_resid_pre`, `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out` and
`hook_resid_post`, named as in TransformerLens/SAELens so that SAEs and configs carry over.
`forward` is a pure function of a plain dict of params; it can read any hook (the cache) and
replace any hook's activation (interventions: splicing an SAE in, ablation, steering).
Checkpoints are read and written in the Hugging Face layout from a local directory only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
# HF's names for the two gelus; "gelu" is the exact (erf) one, the others the tanh approximation.
ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The architecture; field names and defaults are Hugging Face's (GPT-2 small)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    n_inner: int | None = None  # MLP width; None means 4 * n_embd.

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not supported; "
                             f"choose one of {sorted(ACTIVATIONS)}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}.")

    @property
    def d_mlp(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> GPT2Config:
        """Reads a Hugging Face config.json dict; a setting this model does not implement is an
        error naming the field, never silently ignored. Missing fields take HF's defaults."""
        unsupported = {
            # field: (the value this implementation assumes, HF's default when absent)
            "model_type": ("gpt2", "gpt2"),
            "scale_attn_weights": (True, True),
            "scale_attn_by_inverse_layer_idx": (False, False),
            "add_cross_attention": (False, False),
            "tie_word_embeddings": (True, True),
        }
        for field, (supported, default) in unsupported.items():
            if d.get(field, default) != supported:
                raise ValueError(f"config.json sets {field}={d[field]!r}; this GPT-2 implementation "
                                 f"supports only {field}={supported!r}.")
        activation = d.get("activation_function", cls.activation_function)
        if activation not in ACTIVATIONS:
            raise ValueError(f"config.json sets activation_function={activation!r}; supported: "
                             f"{sorted(ACTIVATIONS)}.")
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        if "n_positions" not in kwargs and d.get("n_ctx") is not None:  # very old configs
            kwargs["n_positions"] = d["n_ctx"]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                **dataclasses.asdict(self),
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False, "tie_word_embeddings": True}


# ------------------------------------------------------------------------------------------------
# Hook names
# ------------------------------------------------------------------------------------------------

def hook_names(config: GPT2Config) -> list[str]:
    """Every valid hook name, in the order the forward pass reaches them."""
    return [f"blocks.{i}.{hook}" for i in range(config.n_layer) for hook in HOOKS]


def hook_layer(name: str) -> int:
    """The block index of a hook name: `hook_layer("blocks.6.hook_resid_post") == 6`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", name)
    if match is None or match.group(2) not in HOOKS:
        raise ValueError(f"{name!r} is not a hook name; hook names look like "
                         f"'blocks.<layer>.<hook>' with <hook> one of {list(HOOKS)}.")
    return int(match.group(1))


def _check_hooks(config: GPT2Config, hooks: Sequence[str], interventions: Mapping[str, Any],
                 stop_at_layer: int | None) -> None:
    valid = set(hook_names(config))
    for kind, names in (("hooks", hooks), ("interventions", interventions)):
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"unknown hook name(s) in {kind}: {unknown}. This {config.n_layer}-layer "
                             f"model has: {hook_names(config)}")
    if stop_at_layer is None:
        return
    if not 1 <= stop_at_layer <= config.n_layer:
        raise ValueError(f"stop_at_layer={stop_at_layer} must lie in [1, {config.n_layer}]: "
                         f"the forward pass runs blocks 0 .. stop_at_layer - 1.")
    late = [n for n in (*hooks, *interventions) if hook_layer(n) >= stop_at_layer]
    if late:
        raise ValueError(f"{late} lie at or after stop_at_layer={stop_at_layer} and would never be "
                         f"reached; raise stop_at_layer to {max(map(hook_layer, late)) + 1}.")


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

Hook = Callable[[str, jax.Array], jax.Array]


def _no_hook(name: str, x: jax.Array) -> jax.Array:
    del name
    return x


def _dense(features: int, name: str, std: float, dtype) -> nn.Dense:
    # Hugging Face's Conv1D stores its weight as [in, out], which is exactly Dense's kernel.
    return nn.Dense(features, name=name, dtype=dtype, kernel_init=nn.initializers.normal(std))


def _proj_std(config: GPT2Config) -> float:
    # GPT-2's scaled init: each residual write is shrunk so the stream's variance does not grow
    # with depth (Radford et al. 2019, as in HF's _init_weights).
    return 0.02 / math.sqrt(2 * config.n_layer)


class Attention(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, d = x.shape
        n_head = self.config.n_head
        qkv = _dense(3 * d, "c_attn", 0.02, self.dtype)(x)
        q, k, v = jnp.unstack(qkv.reshape(batch, seq, 3, n_head, d // n_head), axis=2)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        return _dense(d, "c_proj", _proj_std(self.config), self.dtype)(out.reshape(batch, seq, d))


class MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.config.d_mlp, "c_fc", 0.02, self.dtype)(x)
        h = jax.nn.gelu(h, approximate=ACTIVATIONS[self.config.activation_function])
        return _dense(x.shape[-1], "c_proj", _proj_std(self.config), self.dtype)(h)


class Block(nn.Module):
    """Pre-LayerNorm block; `hook(name, x)` sees (and may replace) each named activation."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, hook: Hook) -> jax.Array:
        eps = self.config.layer_norm_epsilon
        x = hook("hook_resid_pre", x)
        attn_out = Attention(self.config, self.dtype, name="attn")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x))
        x = hook("hook_resid_mid", x + hook("hook_attn_out", attn_out))
        mlp_out = MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x))
        return hook("hook_resid_post", x + hook("hook_mlp_out", mlp_out))


class GPT2(nn.Module):
    """Token ids [batch, seq] -> logits [batch, seq, vocab] (None when stopped early)."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, hook: Hook = _no_hook,
                 stop_at_layer: int | None = None) -> jax.Array | None:
        config = self.config
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(config.vocab_size, config.n_embd, dtype=self.dtype, embedding_init=init,
                       name="wte")
        wpe = nn.Embed(config.n_positions, config.n_embd, dtype=self.dtype, embedding_init=init,
                       name="wpe")
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[1]))
        for i in range(config.n_layer if stop_at_layer is None else stop_at_layer):
            layer_hook = lambda name, a, i=i: hook(f"blocks.{i}.{name}", a)
            x = Block(config, self.dtype, name=f"h_{i}")(x, layer_hook)
        if stop_at_layer is not None:
            return None
        x = nn.LayerNorm(config.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)
        return wte.attend(x).astype(jnp.float32)  # the unembedding is tied to wte


def init_params(key: jax.Array, config: GPT2Config) -> dict:
    """GPT-2's initialisation (normal, std 0.02; residual projections scaled by depth)."""
    model = GPT2(config)
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(key)


def forward(params: dict, tokens: jax.Array, config: GPT2Config, *, hooks: Sequence[str] = (),
            interventions: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None,
            stop_at_layer: int | None = None, dtype=jnp.float32,
            ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """Runs the model, reading and optionally replacing named activations.

    Args:
      params: the nested dict from `init_params` or `load_pretrained`.
      tokens: int token ids [batch, seq], seq <= config.n_positions.
      config: the architecture.
      hooks: names (see `hook_names`) whose activations [batch, seq, n_embd] go in the cache.
      interventions: hook name -> fn(activation) -> activation of the same shape, which replaces
        the activation from there on (SAE splicing, zero-ablation, steering). A cached hook
        holds the value after its intervention, i.e. what the rest of the model sees.
      stop_at_layer: run blocks 0 .. stop_at_layer - 1 only and return logits=None, so
        harvesting a middle layer does not pay for the rest of the model.
      dtype: the activation dtype (e.g. jnp.bfloat16); params stay as given, logits are float32.

    Returns:
      (logits [batch, seq, vocab] float32 or None, {hook name: activation}).

    To jit, keep `config`, `hooks`, `interventions`, `stop_at_layer` and `dtype` out of the
    traced arguments: use `make_forward`, or close over them in your own jitted function
    (which is how an intervention can use traced values, e.g. an SAE's params):

        @jax.jit
        def spliced_logits(params, sae_params, tokens):
            splice = {"blocks.6.hook_resid_post": lambda x: sae_reconstruct(sae_params, x)}
            return forward(params, tokens, config, interventions=splice)[0]
    """
    hooks, interventions = tuple(hooks), dict(interventions or {})
    _check_hooks(config, hooks, interventions, stop_at_layer)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids [batch, seq]; got {tokens.dtype} "
                         f"{tokens.shape}.")
    if tokens.shape[1] > config.n_positions:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's n_positions="
                         f"{config.n_positions}.")
    cache = {}

    def hook(name: str, x: jax.Array) -> jax.Array:
        if name in interventions:
            replaced = interventions[name](x)
            if replaced.shape != x.shape:
                raise ValueError(f"the intervention at {name} returned shape {replaced.shape}; "
                                 f"it must keep the activation's shape {x.shape}.")
            x = replaced.astype(x.dtype)
        if name in hooks:
            cache[name] = x
        return x

    logits = GPT2(config, dtype).apply({"params": params}, tokens, hook, stop_at_layer)
    return logits, cache


def make_forward(config: GPT2Config, *, hooks: Sequence[str] = (),
                 interventions: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None,
                 stop_at_layer: int | None = None, dtype=jnp.float32,
                 ) -> Callable[[dict, jax.Array], tuple[jax.Array | None, dict[str, jax.Array]]]:
    """`jax.jit`ted `forward(params, tokens)` with everything else fixed; bad hook names fail
    here rather than at the first call."""
    hooks, interventions = tuple(hooks), dict(interventions or {})
    _check_hooks(config, hooks, interventions, stop_at_layer)

    def run(params: dict, tokens: jax.Array):
        return forward(params, tokens, config, hooks=hooks, interventions=interventions,
                       stop_at_layer=stop_at_layer, dtype=dtype)

    return jax.jit(run)


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ------------------------------------------------------------------------------------------------

# Tensors a HF checkpoint may hold that carry nothing this model needs: the causal-mask buffers
# of older transformers versions (the tied lm_head is checked separately).
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def _hf_layout(config: GPT2Config) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(HF tensor name, path in params, shape) for every weight. No transposes are needed."""
    d, d_mlp = config.n_embd, config.d_mlp
    yield "wte.weight", ("wte", "embedding"), (config.vocab_size, d)
    yield "wpe.weight", ("wpe", "embedding"), (config.n_positions, d)
    for i in range(config.n_layer):
        block, h = f"h_{i}", f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            yield f"{h}.{ln}.weight", (block, ln, "scale"), (d,)
            yield f"{h}.{ln}.bias", (block, ln, "bias"), (d,)
        for module, layer, d_in, d_out in (("attn", "c_attn", d, 3 * d), ("attn", "c_proj", d, d),
                                           ("mlp", "c_fc", d, d_mlp), ("mlp", "c_proj", d_mlp, d)):
            yield f"{h}.{module}.{layer}.weight", (block, module, layer, "kernel"), (d_in, d_out)
            yield f"{h}.{module}.{layer}.bias", (block, module, layer, "bias"), (d_out,)
    yield "ln_f.weight", ("ln_f", "scale"), (d,)
    yield "ln_f.bias", ("ln_f", "bias"), (d,)


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    try:
        return st_numpy.load_file(file)
    except TypeError:
        # NumPy has no bfloat16, so safetensors.numpy cannot read a bf16 checkpoint; its JAX
        # reader can.
        from safetensors import flax as st_flax  # pylint: disable=import-outside-toplevel
        return {k: np.asarray(v.astype(jnp.float32)) for k, v in st_flax.load_file(file).items()}


def load_pretrained(path: str | os.PathLike) -> tuple[GPT2Config, dict]:
    """Reads a local Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors,
    or a sharded model.safetensors.index.json); never touches the hub.

    Returns (config, params) with params as float32 jax arrays on the default device.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r} (checkpoints are read from "
                                f"local directories only; download one with "
                                f"`huggingface-cli download gpt2 --local-dir DIR`).")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} is missing: a checkpoint directory needs "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
    with open(config_file) as f:
        config = GPT2Config.from_hf_dict(json.load(f))

    index_file = os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    elif os.path.isfile(index_file):
        with open(index_file) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        found = sorted(os.listdir(path))
        raise FileNotFoundError(f"{os.path.join(path, WEIGHTS_FILE)} is missing (found {found}). "
                                f"Only safetensors weights are read; convert a pytorch_model.bin "
                                f"by loading it in transformers and calling "
                                f"save_pretrained(dir, safe_serialization=True).")
    tensors = {}
    for file in files:
        for name, value in _read_safetensors(os.path.join(path, file)).items():
            # GPT2LMHeadModel prefixes its weights with `transformer.`; GPT2Model does not.
            tensors[name.removeprefix("transformer.")] = value

    params = {}
    for name, where, shape in _hf_layout(config):
        if name not in tensors:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {path} (for a "
                           f"{config.n_layer}-layer GPT-2 per its config.json).")
        value = tensors.pop(name)
        if value.shape != shape:
            raise ValueError(f"tensor {name!r} in {path} has shape {value.shape}, but config.json "
                             f"implies {shape}.")
        node = params
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = np.asarray(value, np.float32)

    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head, tensors.get("wte.weight", lm_head)):
        raise ValueError(f"lm_head.weight in {path} differs from wte.weight; this implementation "
                         f"ties the unembedding to the token embedding.")
    unexpected = sorted(n for n in tensors if not _IGNORED.fullmatch(n))
    if unexpected:
        raise ValueError(f"the checkpoint in {path} holds tensors a {config.n_layer}-layer GPT-2 "
                         f"does not have: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return config, jax.device_put(params)


def save_pretrained(path: str | os.PathLike, config: GPT2Config, params: dict) -> str:
    """Writes config.json and model.safetensors as Hugging Face's GPT2LMHeadModel does, so that
    `load_pretrained` and `transformers.GPT2LMHeadModel.from_pretrained` both read it."""
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, where, shape in _hf_layout(config):
        value = params
        for key in where:
            value = value[key]
        if value.shape != shape:
            raise ValueError(f"params{''.join(f'[{k!r}]' for k in where)} has shape {value.shape}, "
                             f"but the config implies {shape} (HF tensor {name!r}).")
        tensors[f"transformer.{name}"] = np.ascontiguousarray(np.asarray(value, np.float32))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    # transformers refuses safetensors files whose metadata does not name a known framework.
    st_numpy.save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    return path
