"""A crosscoder over SmolLM2-135M's residual streams after layers 4, 5 and 6 (of 30)
(`blocks.{l}.hook_resid_post`): one shared TopK code (k = 32 over the three hooks together) of
2,304 latents (x4 of d = 576), a decoder per hook, each hook normalised by its own input scale
(the residual norm grows with depth). Trained from the `lm` source, the model run on the fly
once per chunk for the three hooks in lockstep. Loss recovered and KL: every hook replaced at
once by its part of the one decode (the code encoded from the clean pass), against
zero-ablating the three (`loss_recovered`, `kl_sae`), and each hook replaced alone against it
alone zero-ablated (`loss_recovered/<hook>`, `kl_sae/<hook>`).

Tokens: the first 1,024 windows of 128 of experiments/smollm2.py's Shakespeare token ids (the
last 32 held out for loss recovered):

    R=/work/scratch/xcoder; A=/work/assets/real
    python -c "from experiments import smollm2; smollm2.write_token_ids( \
        '$A/shakespeare', '$A/smollm2', '$R/tokens.npy', max_tokens=131_072)"
    nice -n 19 python -m saejax.main --config=experiments/crosscoder_smollm2.py \
        --workdir=$R/crosscoder --config.lm.checkpoint=$A/smollm2 --config.lm.tokens=$R/tokens.npy

Hardware: a CPU does. On 2 shared CPU cores (CPU-2, shared, at nice 19) it ran in 19.5 minutes
(10 of them training at 150-210 tokens/s, 6 for the loss-recovered passes). Measured
(benchmarks/RESULTS.md, "A crosscoder on SmolLM2"; 2026-12-02): input scales 0.00953 /
0.00919 / 0.00880 at layers 4 / 5 / 6 (the residual norm grows with depth), FVU 0.175 / 0.180 /
0.189 (0.181 in all) at L0 32; loss recovered 0.955 with all three hooks replaced (KL 0.66,
zero-ablating the three 9.4), and 0.955 / 0.957 / 0.955 with each hook replaced alone.

`get_config("tiny")` is the same pipeline at toy size on the real model (a few sequences of 32
tokens, a few steps) for tests.
"""

from __future__ import annotations

import ml_collections

from experiments import smollm2

LAYERS = (4, 5, 6)
HOOKS = tuple(f"blocks.{layer}.hook_resid_post" for layer in LAYERS)
EXPANSION_FACTOR = 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = smollm2.get_config(arg)
    config.data.source = "lm"
    config.lm.hook = ",".join(HOOKS)
    config.sae.shape = "crosscoder"
    config.sae.hooks = ",".join(HOOKS)
    if not arg:
        config.sae.expansion_factor = EXPANSION_FACTOR
        config.optim.learning_rate = smollm2.learning_rate(EXPANSION_FACTOR)
        # 300 x 512 = 153,600 tokens, 1.3 passes over the 119,952 training rows (positions 0
        # and 1 left out): what 2 shared CPU cores train in about 10 minutes.
        config.train.batch_size = 512
        config.train.steps = 300
        config.train.checkpoint_every = 100
        config.optim.warmup_steps = 20
        config.data.shuffle_buffer_chunks = 8
        # A window well inside the run, so that AuxK revives latents silent that long.
        config.evals.dead_window_tokens = 50_000
        config.evals.density_window_tokens = 50_000
        # 32 x 128 held-out tokens: nine forward passes of the whole model for the four
        # loss-recovered figures (all hooks, each hook).
        config.evals.loss_recovered_sequences = 32
    return config
