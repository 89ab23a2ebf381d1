"""Language models whose activations SAEs are trained on, and the text that goes into them.

Families: GPT-2 (`gpt2.py`), Llama / Mistral / Qwen2 / Qwen3 / SmolLM2 (`llama.py`), Gemma 2 /
Gemma 3 (`gemma.py`), GPT-NeoX / Pythia (`neox.py`), over shared layers (`layers.py`), behind one
interface (`model.py`): `load(checkpoint_dir, mesh=)` (sharded by the rules table:
`param_shardings`), `forward(params, tokens, config, hooks=,
interventions=, stop_at_layer=)`, `hook_names(config)`.
"""

from saejax.models.gpt2 import GPT2Config, save_pretrained
from saejax.models.gemma import GemmaConfig
from saejax.models.hooks import check_hook, check_hooks, hook_error, hook_layer
from saejax.models.llama import LlamaConfig
from saejax.models.model import (LM, MODEL_TYPES, config_from_hf_dict, family, forward,
                                 hook_names, init_params, load, load_pretrained, make_forward,
                                 param_axes, param_shardings, param_specs, read_config,
                                 shard_params, splits, unembedding)
from saejax.models.neox import NeoXConfig
from saejax.models.tokenizer import (END_OF_TEXT, load_sequences, load_token_ids,
                                     load_tokenizer, tokenize_texts)
from saejax.models import vocab

__all__ = [
    "GPT2Config", "GemmaConfig", "LlamaConfig", "NeoXConfig", "LM", "MODEL_TYPES",
    "check_hook", "check_hooks", "config_from_hf_dict", "family", "forward", "hook_error",
    "hook_layer", "hook_names", "init_params", "load", "load_pretrained", "make_forward",
    "param_axes", "param_shardings", "param_specs", "read_config", "save_pretrained",
    "shard_params", "splits", "unembedding", "vocab",
    "END_OF_TEXT", "load_sequences", "load_token_ids", "load_tokenizer", "tokenize_texts",
]
