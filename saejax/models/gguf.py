"""GGUF files (llama.cpp's and Ollama's format) read back into Hugging Face's layout.

`open_gguf` reads a file with the `gguf` package's reader; `hf_config` turns its metadata into a
transformers-compatible `config.json` dict; `hf_tensors` dequantises its tensors (the `gguf`
package's dequantiser) and yields them under Hugging Face's names and layout, undoing what
llama.cpp's converter did: the q/k row permutation of rotary Llama models, the +1 it folds into
Gemma's (1 + w) RMSNorm weights and the reordering of GPT-NeoX's fused qkv rows. Mistral files
are llama-architecture files in GGUF and convert to `llama` (the same network).
`saejax.models.convert` writes the directory.
"""

import json
import math
import os
from collections.abc import Iterator

import numpy as np

# llama.cpp's architecture name -> the transformers model_type and class it converts to.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "gptneox": ("gpt_neox", "GPTNeoXForCausalLM"),
}
_GEMMA = ("gemma2", "gemma3")

# Per-block tensor names: GGUF suffix -> Hugging Face module (under model.layers.N.).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma's four norms per block: ffn_norm is the one before the MLP there.
_GEMMA_BLOCK_NAMES = dict(_BLOCK_NAMES, ffn_norm="pre_feedforward_layernorm",
                          post_attention_norm="post_attention_layernorm",
                          post_ffw_norm="post_feedforward_layernorm")
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# GPT-NeoX (Pythia): its own names, one fused qkv projection, LayerNorms with biases.
_NEOX_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                     "attn_qkv": "attention.query_key_value", "attn_output": "attention.dense",
                     "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
_NEOX_GLOBAL_NAMES = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm",
                      "output": "embed_out"}


class GGUFError(ValueError):
    """A GGUF file saejax cannot convert; the message names the problem and the fix."""


def open_gguf(path: str):
    """The file's `gguf.GGUFReader`, or a GGUFError saying why it cannot be read."""
    try:
        import gguf
    except ImportError as e:  # a dependency of saejax, so only a broken install gets here
        raise GGUFError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = _reader_class(gguf)(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise GGUFError(
                f"{path}: a tensor has a quantisation type unknown to gguf {_version()} ({e}); "
                "upgrade it (pip install -U gguf) or re-quantise the file to a known type") from e
        raise _corrupt(path, e) from e
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e
    size = os.path.getsize(path)
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise _corrupt(path, f"its tensors need {end} bytes, the file has {size}")
    return reader


def _reader_class(gguf):
    class Reader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map: the same bytes, still
        mapped lazily, but slicing skips np.memmap's per-slice bookkeeping, which is most of the
        time reading a 262k-token vocabulary takes."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


def _corrupt(path, why) -> GGUFError:
    return GGUFError(f"{path} is truncated or corrupt ({why}); download or assemble it again")


def _version() -> str:
    from importlib.metadata import version
    return version("gguf")


def field(reader, key: str, default=KeyError):
    """A metadata value (a number, string, bool or list), or `default` when the file lacks it."""
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise GGUFError(f"the GGUF file has no metadata key {key!r}, which conversion needs")
        return default
    return f.contents()


def architecture(reader) -> str:
    """llama.cpp's architecture name, checked against those saejax converts."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not one saejax converts (it reads "
            f"{', '.join(sorted(ARCHITECTURES))}); convert that model to a Hugging Face "
            "directory with its own tools, or add the family to saejax/models/")
    return arch


def hf_config(reader) -> dict:
    """The transformers `config.json` for this file (the fields its model_type reads)."""
    arch = architecture(reader)
    model_type, hf_class = ARCHITECTURES[arch]

    def get(key, default=KeyError):
        return field(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if arch == "gptneox":
        return _gptneox_config(reader, get, names, hf_class)
    q_rows = int(_tensor(reader, "blk.0.attn_q.weight").shape[1])
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None)
    if head_dim is None or head_dim * heads != q_rows:
        head_dim = q_rows // heads
    n_vocab = get("vocab_size", None) or len(field(reader, "tokenizer.ggml.tokens"))
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": n_vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = field(reader, f"tokenizer.ggml.{key}", None)
        if value is not None:
            config[name] = value
    theta = float(get("rope.freq_base", 10000.0))
    if arch in _GEMMA:
        config.update(_gemma_config(reader, arch, get, config, theta))
    else:
        config["hidden_act"] = "silu"
        config["rope_parameters"] = _rope_parameters(reader, get, theta, head_dim)
        if arch == "llama":
            config["mlp_bias"] = False
    return config


def _gptneox_config(reader, get, names, hf_class) -> dict:
    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = hidden // heads
    config = {
        "architectures": [hf_class], "model_type": "gpt_neox",
        "vocab_size": get("vocab_size", None) or len(field(reader, "tokenizer.ggml.tokens")),
        "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "max_position_embeddings": get("context_length"), "hidden_act": "gelu",
        "layer_norm_eps": get("attention.layer_norm_epsilon"),
        "use_parallel_residual": bool(get("use_parallel_residual", True)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_qkv.bias" in names,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": float(get("rope.freq_base", 10000.0)),
                            "partial_rotary_factor": get("rope.dimension_count") / head_dim},
        "dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = field(reader, f"tokenizer.ggml.{key}", None)
        if value is not None:
            config[name] = value
    return config


def _gemma_config(reader, arch, get, config, theta) -> dict:
    layers = config["num_hidden_layers"]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (46 layers in
    # Gemma 2, 62 in Gemma 3) whose query_pre_attn_scalar is hidden_size / heads.
    big = layers == (46 if arch == "gemma2" else 62)
    scalar = (config["hidden_size"] // config["num_attention_heads"] if big
              else config["head_dim"])
    out = {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
           "sliding_window": get("attention.sliding_window", 4096)}
    if arch == "gemma2":
        out["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(layers)]
        out["attn_logit_softcapping"] = get("attn_logit_softcapping", 50.0)
        out["final_logit_softcapping"] = get("final_logit_softcapping", 30.0)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        return out
    # Gemma 3: five sliding-window layers then one global, each kind with its own rope base;
    # the scaling llama.cpp records applies to the global layers.
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    out["final_logit_softcapping"] = None
    out["attn_logit_softcapping"] = None
    full = {"rope_type": "default", "rope_theta": theta}
    scaling = get("rope.scaling.type", None)
    if scaling == "linear":
        full = {"rope_type": "linear", "rope_theta": theta,
                "factor": float(get("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise GGUFError(f"gemma3 rope scaling {scaling!r} is not one saejax converts (linear)")
    out["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": float(get("rope.freq_base_swa", 10000.0))},
        "full_attention": full}
    return out


def _rope_parameters(reader, get, theta, head_dim) -> dict:
    """transformers' rope_parameters: linear or YaRN scaling from the metadata; Llama 3's
    frequency-dependent scaling recovered from the rope_freqs tensor llama.cpp stores."""
    scaling = get("rope.scaling.type", None)
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        return _llama3_rope(_dequantize(_tensor(reader, "rope_freqs.weight")), theta, head_dim)
    if scaling in (None, "none"):
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta,
                "factor": float(get("rope.scaling.factor"))}
    if scaling == "yarn":
        return {"rope_type": "yarn", "rope_theta": theta,
                "factor": float(get("rope.scaling.factor")),
                "original_max_position_embeddings": get("rope.scaling.original_context_length")}
    raise GGUFError(f"rope scaling {scaling!r} is not one saejax converts (linear, yarn, llama3)")


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int,
                 original: int = 8192) -> dict:
    """Llama 3.x's rope scaling from llama.cpp's per-frequency divisors: 1 for short
    wavelengths, `factor` for long ones and 1 / ((1 - s) / factor + s) between, with s linear in
    1 / wavelength. The divisors fix `factor` and that line; Llama 3.x's original context of
    8192 then fixes low_freq_factor and high_freq_factor. Checked by recomputing the divisors."""
    factors = np.asarray(factors, np.float64)
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    mid = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if factor <= 1 or mid.sum() < 2:
        raise GGUFError("the rope_freqs tensor is not Llama 3's frequency scaling; saejax "
                        "cannot convert this rope")
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[mid] / (2 * math.pi), s, 1)  # s = A / wavelen - B
    low = float(-intercept * original / slope)
    high = float(low + original / slope)
    params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
              "low_freq_factor": round(low, 4), "high_freq_factor": round(high, 4),
              "original_max_position_embeddings": original}
    if not np.allclose(_llama3_divisors(params, inv_freq), factors, rtol=1e-4, atol=1e-4):
        raise GGUFError("the rope_freqs tensor does not match Llama 3's rope scaling with an "
                        "original context of 8192; saejax cannot convert this rope")
    return params


def _llama3_divisors(p: dict, inv_freq: np.ndarray) -> np.ndarray:
    wavelen = 2 * math.pi / inv_freq
    old = p["original_max_position_embeddings"]
    smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
    mid = 1 / ((1 - smooth) / p["factor"] + smooth)
    return np.where(wavelen < old / p["high_freq_factor"], 1.0,
                    np.where(wavelen > old / p["low_freq_factor"], p["factor"], mid))


def _tensor(reader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise GGUFError(f"the GGUF file has no tensor {name!r}, which conversion needs")


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize
    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError as e:
        raise GGUFError(
            f"tensor {tensor.name} is quantised as {tensor.tensor_type.name}, which gguf "
            f"{_version()} cannot dequantise; upgrade gguf (pip install -U gguf) or re-quantise "
            "the file to a supported type (Q4_0 ... Q8_0, the K-quants, F16, BF16)") from e


def check_quantisations(reader) -> None:
    """Fails before any work if a tensor's type cannot be dequantised (one row of each type)."""
    seen = set()
    for t in reader.tensors:
        if t.tensor_type not in seen:
            seen.add(t.tensor_type)
            _dequantize(t._replace(data=t.data[:1] if t.data.ndim > 1 else t.data))


def hf_name(arch: str, gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor; None for those conversion consumes."""
    if gguf_name == "rope_freqs.weight":
        return None  # folded into rope_parameters
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    neox = arch == "gptneox"
    globals_ = _NEOX_GLOBAL_NAMES if neox else _GLOBAL_NAMES
    if len(parts) == 1 and parts[0] in globals_:
        return f"{globals_[parts[0]]}.{suffix}"
    table = _NEOX_BLOCK_NAMES if neox else _GEMMA_BLOCK_NAMES if arch in _GEMMA else _BLOCK_NAMES
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        prefix = "gpt_neox.layers" if neox else "model.layers"
        return f"{prefix}.{parts[1]}.{table[parts[2]]}.{suffix}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no place in saejax's {arch} layout "
                    "(a variant of the architecture saejax does not convert)")


def hf_tensors(reader, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array in Hugging Face's [out, in] layout) for every tensor."""
    arch = architecture(reader)
    check_quantisations(reader)
    for t in reader.tensors:
        name = hf_name(arch, t.name)
        if name is None:
            continue
        w = _dequantize(t)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads" if ".attn_q." in t.name
                           else "num_key_value_heads"]
            w = _unpermute(w, heads)
        if arch in _GEMMA and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights as 1 + w
        if arch == "gptneox" and ".attn_qkv." in t.name:
            w = _unfuse_order(w, config["num_attention_heads"])
        yield name, np.ascontiguousarray(w)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation, which interleaves each head's two rotary halves
    (its rope pairs dimension i with i + 1, Hugging Face's with i + head_dim / 2)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unfuse_order(w: np.ndarray, heads: int) -> np.ndarray:
    """NeoX's fused qkv rows back to per head (q, k, v): llama.cpp stores all q, then all k,
    then all v (GPT-2's order)."""
    return w.reshape(3, heads, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def describe(reader) -> str:
    """One line naming the model, for progress messages."""
    name = field(reader, "general.name", "?")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return f"{name} ({field(reader, 'general.architecture')}, {', '.join(types)})"


def dump_config(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
