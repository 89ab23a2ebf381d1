"""SmolLM2-135M-Instruct, layer 15 (of 30) residual stream: TopK (k = 32) and ReLU SAEs at
expansion 8 and 32 (4,608 and 18,432 latents on d = 576) on Shakespeare, with loss recovered
and KL measured by splicing the SAE back into the real model.

Fetch the model and the text once (nothing is downloaded at run time after this), tokenise the
plays (each one document, after SmolLM2's BOS), harvest, train:

    python -m saejax.models.fetch --out=$ASSETS
    python -c "from experiments import smollm2; smollm2.write_token_ids( \
        '$ASSETS/shakespeare', '$ASSETS/smollm2', '$RUN/tokens.npy', max_tokens=1_048_576)"
    python -m saejax.harvest --checkpoint=$ASSETS/smollm2 --tokens=$RUN/tokens.npy \
        --out=$RUN/stores --hooks=blocks.15.hook_resid_post --context_length=128 \
        --batch_sequences=8 --holdout_sequences=64 --exclude_positions=0,1
    python -m saejax.main --config=experiments/smollm2.py --workdir=$RUN/topk_x8 \
        --config.data.path=$RUN/stores/blocks.15.hook_resid_post \
        --config.lm.checkpoint=$ASSETS/smollm2 --config.lm.tokens=$RUN/tokens.npy
    python -m saejax.sweep --config=experiments/smollm2.py --workdir=$RUN/sweep \
        --config.data.path=... --config.lm.checkpoint=... --config.lm.tokens=...   # every point

The harvest resumes where it stopped when run again. Hardware: a CPU does; on 2 shared CPU
cores the harvest ran at 836 tokens/s end to end (20 min for the million tokens, 2.4 GB of
float32 store), a TopK x8 run trains in about 5 minutes, the three ReLU x8 points together in
12, and an x32 point in about 30.
Measured (benchmarks/RESULTS.md, "SAEs on SmolLM2"; 2026-12-02): TopK x8 gives L0 32, FVU 0.23,
no dead latents, loss recovered 0.984 and KL 0.36; ReLU x8 at L1 levels 0.01 / 0.03 / 0.1 gives
L0 434 / 248 / 45 at FVU 0.14 / 0.21 / 0.48 (loss recovered 0.998 / 0.991 / 0.880); after the
same one pass the x32 points are undertrained (TopK FVU 0.28, loss recovered 0.976; ReLU at
level 0.1 FVU 0.72, loss recovered 0.69; the other two ReLU x32 levels not run). Leaving
out position 1 as well as position 0 (SmolLM2's windows start mid-document, and the token after
the sink often carries a massive activation) lowers TopK's FVU on ordinary tokens from 0.27 to
0.21.

`get_config("tiny")` is the same pipeline at toy size on the real model (a few sequences of 32
tokens, a few steps) for tests.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from saejax import configs, models
from saejax.models import hf

HOOK = "blocks.15.hook_resid_post"
EXPANSION_FACTORS = (8, 32)
# ReLU's L1 is a mean over latents (saejax/sae/relu.py): the level held across sizes is
# l1_coefficient / expansion_factor, as in experiments/scaling.py. The toy's 0.3 collapses the
# SAE here (benchmarks/RESULTS.md, "SAEs on SmolLM2"); these levels bracket TopK's L0.
RELU_L1_LEVELS = (0.01, 0.03, 0.1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = configs.base_config()
    config.data.source = "store"
    config.data.d = 576
    config.data.normalize_inputs = True   # the scale is saved with the SAE
    config.data.shuffle_buffer_chunks = 32

    config.lm.hook = HOOK
    config.lm.context_length = 128
    config.lm.batch_sequences = 8
    # SmolLM2's windows start mid-document with no BOS (its tokenizer adds none): position 0 is
    # an attention sink, and position 1 (a newline, mostly) often carries a massive activation
    # too, so both are left out (benchmarks/RESULTS.md, "SAEs on SmolLM2"); the harvest's
    # --exclude_positions=0,1 writes the store to match.
    config.lm.exclude_positions = (0, 1)

    config.sae.architecture = "topk"
    config.sae.expansion_factor = 8
    config.sae.k = 32
    config.sae.k_aux = 288                # Gao et al.: about d / 2
    config.sae.l1_coefficient = RELU_L1_LEVELS[1] * 8  # relu at x8 (the sweep sets its own)
    config.sae.b_dec_init = "geometric_median"

    config.optim.learning_rate = learning_rate(8)
    config.optim.warmup_steps = 50
    config.optim.sparsity_warmup_steps = 50  # ReLU's L1 ramps in (TopK has none to ramp)
    # One pass over a million-token harvest: what these 2 cores train in tens of minutes.
    config.train.batch_size = 1024
    config.train.steps = 1_000
    config.train.log_every = 100
    config.train.checkpoint_every = 250
    config.evals.dead_window_tokens = 500_000
    config.evals.density_window_tokens = 500_000
    config.evals.loss_recovered_sequences = 64

    if arg == "tiny":
        config.data.shuffle_buffer_chunks = 2
        config.lm.context_length = 32
        config.lm.batch_sequences = 2
        config.sae.expansion_factor = 2
        config.sae.k = 8
        config.sae.k_aux = 32
        config.sae.b_dec_init = "zeros"
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 1
        config.train.batch_size = 64
        config.train.steps = 4
        config.train.log_every = 2
        config.train.checkpoint_every = 4
        config.evals.eval_batches = 1
        config.evals.dead_window_tokens = 256
        config.evals.density_window_tokens = 256
        config.evals.loss_recovered_sequences = 2
    elif arg:
        raise ValueError(f"experiments/smollm2.py: unknown argument {arg!r}; use 'tiny' or "
                         "nothing.")
    return config


def learning_rate(expansion_factor: int, d: int = 576) -> float:
    """Gao et al. 2024's rule (as sparsify applies it): 2e-4 / sqrt(n_latents / 2^14), to two
    significant digits."""
    return float(f"{2e-4 / ((expansion_factor * d) / 2 ** 14) ** 0.5:.2g}")


def get_sweep(arg: str | None = None) -> list[dict]:
    """TopK (k = 32) and ReLU (three L1 levels, one group per size) at expansion 8 and 32,
    the smaller size first."""
    if arg:
        raise ValueError(f"experiments/smollm2.py: get_sweep takes no argument, got {arg!r}.")
    points = []
    for e in EXPANSION_FACTORS:
        points += [{"sae.architecture": "topk", "sae.expansion_factor": e, "sae.k": 32,
                    "optim.learning_rate": learning_rate(e)},
                   *({"sae.architecture": "relu", "sae.expansion_factor": e,
                      "sae.l1_coefficient": round(level * e, 6),
                      "optim.learning_rate": learning_rate(e)} for level in RELU_L1_LEVELS)]
    return points


def write_token_ids(text_folder: str, checkpoint: str, out: str, *, max_tokens: int = 0,
                    context_length: int = 128) -> str:
    """Tokenises every .txt in `text_folder` (sorted; each file one document, after the model's
    BOS) with the checkpoint's tokenizer.json into `out`, a .npy [sequences, context_length]
    of at most `max_tokens` tokens (0: all): what `--tokens` of the harvest reads."""
    config = models.config_from_hf_dict(hf.read_config(checkpoint))
    tokenizer = models.load_tokenizer(checkpoint)
    files = sorted(f for f in os.listdir(text_folder) if f.endswith(".txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {text_folder!r}.")
    documents = []
    for name in files:
        with open(os.path.join(text_folder, name), encoding="utf-8") as f:
            documents.append(f.read())
    sequences = models.tokenize_texts(tokenizer, documents, context_length,
                                      bos_token_id=config.bos_token_id)
    if max_tokens:
        sequences = sequences[:max(1, max_tokens // context_length)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, sequences)
    return out

