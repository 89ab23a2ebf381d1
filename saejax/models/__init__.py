"""Language models whose activations SAEs are trained on, and the text that goes into them."""

from saejax.models.gpt2 import (GPT2, HOOKS, GPT2Config, forward, hook_layer, hook_names,
                                init_params, load_pretrained, make_forward, save_pretrained)
from saejax.models.tokenizer import (END_OF_TEXT, load_sequences, load_token_ids,
                                     load_tokenizer, tokenize_texts)

__all__ = [
    "GPT2", "HOOKS", "GPT2Config", "forward", "hook_layer", "hook_names", "init_params",
    "load_pretrained", "make_forward", "save_pretrained",
    "END_OF_TEXT", "load_sequences", "load_token_ids", "load_tokenizer", "tokenize_texts",
]
