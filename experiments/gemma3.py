"""Gemma 3 270M, layer 9 (of 18) residual stream: the SmolLM2 recipe (experiments/smollm2.py:
TopK k = 32 and ReLU SAEs at expansion 8 and 32, here 5,120 and 20,480 latents on d = 640)
on the same Shakespeare plays, with loss recovered and KL measured by splicing the SAE back
into the real model (its 262,144-token vocabulary is reduced in chunks, saejax.models.vocab).

Fetch once (`python -m saejax.models.fetch --out=$ASSETS` converts the Q4_K_M GGUF into
$ASSETS/gemma3), then tokenise (each play one document after Gemma's BOS), harvest, train:

    python -c "from experiments import smollm2; smollm2.write_token_ids( \
        '$ASSETS/shakespeare', '$ASSETS/gemma3', '$RUN/tokens.npy', max_tokens=1_048_576)"
    python -m saejax.harvest --checkpoint=$ASSETS/gemma3 --tokens=$RUN/tokens.npy \
        --out=$RUN/stores --hooks=blocks.9.hook_resid_post --context_length=128 \
        --batch_sequences=8 --holdout_sequences=64
    python -m saejax.sweep --config=experiments/gemma3.py --workdir=$RUN/sweep \
        --config.data.path=$RUN/stores/blocks.9.hook_resid_post \
        --config.lm.checkpoint=$ASSETS/gemma3 --config.lm.tokens=$RUN/tokens.npy

Attention sinks: Gemma 3's first position carries a residual of about 14x the others' norm at
this layer (benchmarks/RESULTS.md, "Attention sinks"); the harvest leaves position 0 and the
special tokens out by default, as for SmolLM2. Hardware: a CPU does. The full sweep is not
yet measured on this machine (the SmolLM2 one is, benchmarks/RESULTS.md "SAEs on SmolLM2");
`get_config("tiny")` (a few sequences of 32 tokens, a few steps) runs in the tests.
"""

from __future__ import annotations

import ml_collections

from experiments import smollm2

HOOK = "blocks.9.hook_resid_post"
D = 640


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = smollm2.get_config(arg)
    config.data.d = D
    config.lm.hook = HOOK
    config.lm.exclude_positions = (0,)   # every window starts with <bos>, the one sink
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """TopK (k = 32) and ReLU at expansion 8 and 32, as for SmolLM2."""
    return smollm2.get_sweep(arg)
