"""Convert a GGUF file into a Hugging Face directory that saejax and transformers read.

    python -m saejax.models.convert FILE.gguf OUT_DIR

writes OUT_DIR/config.json (transformers' fields for the model_type), model.safetensors (every
tensor dequantised to float32, in Hugging Face's names and layout), tokenizer.json (rebuilt from
the file's vocabulary) and tokenizer_config.json, then conversion.json last, which records the
source file and the converter. A directory whose conversion.json names the same file (path, size,
mtime) and the same converter code is left as it is, so running the command again is free.
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

from saejax.models import gguf as gguf_lib
from saejax.models import gguf_tokenizer
from saejax.models.gguf import GGUFError

MARKER = "conversion.json"


def _source(path: str) -> dict:
    """What a conversion depends on: the file, and the code that converts it (a changed
    converter redoes the conversion)."""
    st = os.stat(path)
    code = hashlib.sha256()
    for module in (gguf_lib, gguf_tokenizer, sys.modules[__name__]):
        with open(module.__file__, "rb") as f:
            code.update(f.read())
    return {"gguf": os.path.abspath(path), "bytes": st.st_size, "mtime": int(st.st_mtime),
            "converter": code.hexdigest()[:16]}


def is_converted(path: str, out_dir: str) -> bool:
    """Whether out_dir already holds the conversion of this very file."""
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    source = _source(path)
    return {k: done.get(k) for k in source} == source


def convert(path: str, out_dir: str, *, tokenizer: bool = True, log=print) -> str:
    """Writes the Hugging Face directory for GGUF file `path` into out_dir; returns out_dir."""
    if is_converted(path, out_dir):
        log(f"{out_dir}: already converted from {path}")
        return out_dir
    start = time.time()
    reader = gguf_lib.open_gguf(path)
    log(f"Converting {path}: {gguf_lib.describe(reader)}")
    config = gguf_lib.hf_config(reader)
    gguf_lib.check_quantisations(reader)
    tok = None
    if tokenizer:
        tok = gguf_tokenizer.tokenizer_json(reader)
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "add_bos_token": gguf_tokenizer.add_bos(reader),
                      "add_eos_token": bool(gguf_lib.field(
                          reader, "tokenizer.ggml.add_eos_token", False)),
                      **gguf_tokenizer.special_tokens(reader)}
    tensors = dict(gguf_lib.hf_tensors(reader, config))
    _check_shapes(config, tensors)

    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # a conversion of another file: rewritten below
    _write_json(os.path.join(out_dir, "config.json"), config)
    from safetensors.numpy import save_file
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    if tok is not None:
        _write_json(os.path.join(out_dir, "tokenizer.json"), tok, indent=None)
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_config)
    n_params = sum(int(np.prod(t.shape)) for t in tensors.values())
    _write_json(marker, {**_source(path), "model_type": config["model_type"],
                         "parameters": n_params, "tokenizer": tok is not None})
    log(f"Wrote {out_dir} ({config['model_type']}, {n_params / 1e6:.1f}M parameters, "
        f"{time.time() - start:.0f} s)")
    return out_dir


def _check_shapes(config: dict, tensors: dict) -> None:
    """The tensors' shapes against the config, so a mis-read file fails here, not in a model."""
    d, v = config["hidden_size"], config["vocab_size"]
    if config["model_type"] == "gpt_neox":
        expected = {"gpt_neox.embed_in.weight": (v, d)}
        expected.update({f"gpt_neox.layers.{i}.attention.query_key_value.weight": (3 * d, d)
                         for i in range(config["num_hidden_layers"])})
        return _compare_shapes(expected, tensors)
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    expected = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.down_proj.weight": (d, config["intermediate_size"])})
    _compare_shapes(expected, tensors)


def _compare_shapes(expected: dict, tensors: dict) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise GGUFError(f"the GGUF file has no tensor for {name}")
        if tuple(tensors[name].shape) != shape:
            raise GGUFError(f"{name} has shape {tuple(tensors[name].shape)} in the GGUF file, "
                            f"but its metadata implies {shape}; the file is inconsistent")


def _write_json(path: str, obj, indent=2) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # dumps, not dump: the C encoder, 10x faster
        f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m saejax.models.convert",
        description="Convert a GGUF file into a Hugging Face directory (config.json, "
                    "model.safetensors in float32, tokenizer.json).")
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("out_dir", help="the directory to write")
    parser.add_argument("--no_tokenizer", action="store_true",
                        help="write no tokenizer.json (bring the model's own)")
    args = parser.parse_args(argv)
    try:
        convert(args.gguf, args.out_dir, tokenizer=not args.no_tokenizer)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
