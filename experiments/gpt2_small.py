"""GPT-2 small, layer 8 residual stream: a TopK SAE (k = 32, 32x = 24,576 latents) on real
activations, with loss recovered measured by splicing the SAE back into the model.

Bring a local Hugging Face format checkpoint (a directory with config.json, model.safetensors
and tokenizer.json, e.g. a copy of `gpt2`) and token data (a .txt file, or a .npy of token ids);
nothing is downloaded. Harvest the activations once, then train from the store:

    python -m saejax.harvest --checkpoint=$GPT2 --tokens=$TOKENS --out=$STORE \
        --hooks=blocks.8.hook_resid_post --context_length=128 --holdout_sequences=512
    python -m saejax.main --config=experiments/gpt2_small.py --workdir=$WORKDIR \
        --config.data.path=$STORE/blocks.8.hook_resid_post \
        --config.lm.checkpoint=$GPT2 --config.lm.tokens=$TOKENS

Without a store, `--config.data.source=lm` runs the model on the fly instead (slower per step,
nothing on disk). Hardware: one accelerator (the 768 x 24,576 dictionary with Adam state is
about 0.5 GB); 40,000 steps x 4096 tokens = 164M tokens. Not yet measured here (no GPT-2
weights or accelerator were at hand); Gao et al. 2024 report normalised MSE about 0.2 at this
L0 and width on GPT-2 small's layer 8, which is the figure to compare with.

`get_config("tiny")` is the same pipeline on a tiny GPT-2 (d = 64) for tests and laptops.
"""

import ml_collections

from saejax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = configs.base_config()
    config.data.source = "store"
    config.data.d = 768
    config.data.normalize_inputs = True   # the scale is saved with the SAE
    config.data.shuffle_buffer_chunks = 32

    config.lm.hook = "blocks.8.hook_resid_post"
    config.lm.context_length = 128
    config.lm.batch_sequences = 64

    config.sae.architecture = "topk"
    config.sae.expansion_factor = 32
    config.sae.k = 32
    config.sae.k_aux = 512                # Gao et al.: about d / 2
    config.sae.b_dec_init = "geometric_median"

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.train.batch_size = 4096
    config.train.steps = 40_000
    config.train.log_every = 500
    config.train.checkpoint_every = 2000
    config.evals.dead_window_tokens = 10_000_000
    config.evals.density_window_tokens = 1_000_000
    config.evals.loss_recovered_sequences = 256

    if arg == "tiny":
        config.data.d = 64
        config.data.shuffle_buffer_chunks = 4
        config.lm.hook = "blocks.1.hook_resid_post"
        config.lm.context_length = 32
        config.lm.batch_sequences = 16
        config.sae.expansion_factor = 4
        config.sae.k = 8
        config.sae.k_aux = 32
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 10
        config.train.batch_size = 256
        config.train.steps = 60
        config.train.log_every = 20
        config.train.checkpoint_every = 20
        config.evals.eval_batches = 2
        config.evals.dead_window_tokens = 256 * 20
        config.evals.density_window_tokens = 256 * 20
        config.evals.loss_recovered_sequences = 16
    elif arg:
        raise ValueError(f"experiments/gpt2_small.py: unknown argument {arg!r}; use 'tiny' or "
                         "nothing.")
    return config
