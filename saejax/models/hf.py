"""Hugging Face checkpoint directories: config.json checked field by field, and the weights of
model.safetensors or a sharded model.safetensors.index.json, read lazily (`lazy.py`: a param, or one
shard of it, at a time) from local files only (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from saejax.models import lazy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# Fields of every transformers config that do not change the forward pass of a causal LM
# (bookkeeping, generation, training-only settings, special token ids).
COMMON_IGNORED = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "model_type",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "task_specific_params", "id2label",
    "label2id", "_name_or_path", "name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "problem_type", "tokenizer_class", "prefix",
    "finetuning_task", "chunk_size_feed_forward", "is_decoder", "is_encoder_decoder",
    "cross_attention_hidden_size", "tie_encoder_decoder", "add_cross_attention", "pruned_heads",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k",
    "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "num_return_sequences", "bad_words_ids", "classifier_dropout", "attention_probs_dropout_prob",
    "hidden_dropout_prob", "_attn_implementation_autoset", "use_bfloat16", "tf_legacy_loss",
    "output_scores", "return_dict_in_generate", "pretraining_tp", "unsloth_fixed",
    "unsloth_version", "auto_map", "_from_model_config",
})


def check_fields(d: Mapping[str, Any], *, family: str, reads: Iterable[str],
                 ignores: Iterable[str] = (), assumes: Mapping[str, Any] | None = None) -> None:
    """Every field of config.json is read, known to be irrelevant, or at the one value this
    implementation assumes (`assumes`: field -> value, also its HF default). Anything else set to
    a value other than null/false is an error naming it: a setting saejax would silently ignore
    would give a different model."""
    known = set(reads) | set(ignores) | COMMON_IGNORED
    for field, value in d.items():
        if assumes and field in assumes:
            if value != assumes[field] and value is not None:
                raise ValueError(f"config.json sets {field}={value!r}; saejax's {family} "
                                 f"implementation supports only {field}={assumes[field]!r}.")
        elif field not in known and value not in (None, False):
            raise ValueError(f"config.json sets {field}={value!r}, which saejax's {family} "
                             f"implementation does not read; remove it if it does not change the "
                             f"model, else this checkpoint needs support for it.")


def read_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r} (checkpoints are read from "
                                f"local directories only; download one with "
                                f"`huggingface-cli download <model> --local-dir DIR`).")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} is missing: a checkpoint directory needs "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}).")
    with open(config_file) as f:
        return json.load(f)


class Tensors:
    """The tensors of a checkpoint directory by name, as `lazy.Lazy` float32 tensors: `take`
    checks a tensor's shape from the file's header and reads nothing; the loader's transposes
    and reshapes are recorded, and the bytes are read when the param (or one shard of it) is.
    `strip` removes a model-class prefix (`model.`, `transformer.`) from names."""

    def __init__(self, path: str | os.PathLike, *, strip: Iterable[str] = ()):
        self.path = os.fspath(path)
        index_file = os.path.join(self.path, WEIGHTS_INDEX_FILE)
        if os.path.isfile(os.path.join(self.path, WEIGHTS_FILE)):
            files = [WEIGHTS_FILE]
        elif os.path.isfile(index_file):
            with open(index_file) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            found = sorted(os.listdir(self.path))
            raise FileNotFoundError(
                f"{os.path.join(self.path, WEIGHTS_FILE)} is missing (found {found}). Only "
                f"safetensors weights are read; convert a pytorch_model.bin by loading it in "
                f"transformers and calling save_pretrained(dir, safe_serialization=True).")
        self._where: dict[str, lazy.Source] = {}
        for file in files:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{full}, named by {WEIGHTS_INDEX_FILE}, is missing.")
            entries, data_offset = lazy.header(full)
            for name, entry in entries.items():
                if name == "__metadata__":
                    continue
                short = name
                for prefix in strip:
                    if short.startswith(prefix):
                        short = short[len(prefix):]
                        break
                self._where[short] = lazy.Source(full, entry, data_offset)
        self._taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def take(self, name: str, shape: tuple[int, ...], what: str = "") -> lazy.Lazy:
        """Tensor `name`, checked to have `shape` (the one config.json implies); not read yet."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.path}"
                           f"{' (' + what + ')' if what else ''}.")
        value = self._where[name]
        if value.shape != tuple(shape):
            raise ValueError(f"tensor {name!r} in {self.path} has shape {value.shape}, but "
                             f"config.json implies {tuple(shape)}.")
        self._taken.add(name)
        return value

    def maybe(self, name: str, shape: tuple[int, ...]) -> lazy.Lazy | None:
        return self.take(name, shape) if name in self._where else None

    def check_all_read(self, ignored=lambda name: False) -> None:
        """Every tensor was used: one left over means config.json describes another model."""
        left = sorted(n for n in self._where if n not in self._taken and not ignored(n))
        if left:
            raise ValueError(f"the checkpoint in {self.path} holds tensors this model (per its "
                             f"config.json) does not have: {left[:10]}"
                             f"{' ...' if len(left) > 10 else ''}")


def stack_layers(n_layers: int, layer_fn) -> dict:
    """{name: [n_layers, ...]} from `layer_fn(i) -> {name: tensor}` (a nested dict), each a
    `lazy.Stacked`: reading a block of it reads that block of each layer into one array."""
    import jax  # pylint: disable=import-outside-toplevel
    layers = [layer_fn(i) for i in range(n_layers)]
    return jax.tree.map(lambda *parts: lazy.Stacked([lazy.as_lazy(p) for p in parts]), *layers,
                        is_leaf=lambda x: isinstance(x, lazy.Lazy))
