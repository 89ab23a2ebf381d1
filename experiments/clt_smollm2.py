"""A cross-layer transcoder over SmolLM2-135M's layers 4 to 7 (of 30): each layer's encoder reads
its MLP's normalised input (`blocks.{l}.ln2.hook_normalized`), and its latents decode into the
MLP outputs (`blocks.{m}.hook_mlp_out`) of that layer and every later one; TopK with k = 32 per
layer, 576 latents per layer (x1 of d = 576). Loss recovered and KL are the replacement
model's: all four MLP outputs replaced at once, each encoder reading the replaced stream,
against zero-ablating the four. The sweep adds one per-layer transcoder per layer (same
mechanism, size and data) for comparison.

Tokens: the first 3,072 windows of 128 of experiments/smollm2.py's Shakespeare token ids (the
last 64 held out for loss recovered); one harvest of the eight hooks, read in lockstep:

    R=/work/scratch/cltreal; A=/work/assets/real
    python -c "from experiments import smollm2; smollm2.write_token_ids('$A/shakespeare', \
        '$A/smollm2', '$R/all_tokens.npy', max_tokens=1_048_576)"
    python -c "import numpy as np; np.save('$R/tokens.npy', np.load('$R/all_tokens.npy')[:3072])"
    python -m saejax.harvest --checkpoint=$A/smollm2 --tokens=$R/tokens.npy --out=$R/stores \
        --hooks=$(python -c "from experiments import clt_smollm2 as c; print(','.join(c.HOOKS))") \
        --context_length=128 --batch_sequences=8 --holdout_sequences=64 --exclude_positions=0,1
    P=$(python -c "from experiments import clt_smollm2 as c; print(c.store_paths('$R/stores'))")
    python -m saejax.main --config=experiments/clt_smollm2.py --workdir=$R/clt \
        --config.data.path=$P --config.lm.checkpoint=$A/smollm2 --config.lm.tokens=$R/tokens.npy
    python -m saejax.sweep --config=experiments/clt_smollm2.py --workdir=$R/sweep \
        --config.data.path=$P --config.lm.checkpoint=$A/smollm2 --config.lm.tokens=$R/tokens.npy

Hardware: a CPU does. On 2 shared CPU cores (CPU-2, heavily shared) the harvest wrote the
378,999 rows at 8 hooks in 12 minutes (539 tokens/s; 6.5 GiB of float32 stores), the CLT
trained in 19 minutes (138 tokens/s: it multiplies all 16 decoder blocks) and its replacement
model's evaluation took 9 more; each transcoder of the sweep trains in about 2 minutes.
Measured (benchmarks/RESULTS.md, "A cross-layer transcoder on SmolLM2"; 2026-12-02): FVU of
the MLP outputs 0.71 / 0.63 / 0.59 / 0.55 at layers 4 / 5 / 6 / 7 (the per-layer transcoders
0.73 / 0.71 / 0.71 / 0.68), and the replacement model's loss recovered 0.79 with KL 0.35
(zero-ablating the four MLP outputs: KL 1.10).

`get_config("x4")` is the same CLT at 2,304 latents a layer (learning rate 5.3e-4), decoded
densely (`--config.sae.topk_decoder=sparse` trains the same CLT, within float32 rounding, but
ran slower on these cores: RESULTS, the CLT's train step):

    python -m saejax.main --config=experiments/clt_smollm2.py:x4 --workdir=$R/clt_x4 \
        --config.data.path=$P --config.lm.checkpoint=$A/smollm2 --config.lm.tokens=$R/tokens.npy

On CPU-2 (shared) it trained the 150 steps in 18.5 minutes (138 tokens/s) and its evaluation
took 1 more. Measured (RESULTS, "A cross-layer transcoder on SmolLM2"; 2026-12-02): FVU 0.71 /
0.63 / 0.60 / 0.56 at layers 4 / 5 / 6 / 7, loss recovered 0.78 with KL 0.36: at 150 steps
no better than x1, with more latents dead; at 300 steps (--config.train.steps=300, 18 min)
FVU 0.61 / 0.53 / 0.50 / 0.46, loss recovered 0.84, KL 0.30 (x1 at 300: 0.63 / 0.54 / 0.50 /
0.46, 0.84, 0.31).

`get_config("tiny")` is the same pipeline at toy size.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import smollm2

LAYERS = (4, 5, 6, 7)
INPUT_HOOK = "blocks.{layer}.ln2.hook_normalized"
TARGET_HOOK = "blocks.{layer}.hook_mlp_out"
HOOKS = tuple(hook.format(layer=layer) for layer in LAYERS
              for hook in (INPUT_HOOK, TARGET_HOOK))
# 576 latents per layer: what 2 shared CPU cores train in a quarter of an hour with the dense
# decode (a CLT computes its L^2 decoder blocks; at x2 the step ran at 91 tokens/s there).
EXPANSION_FACTOR = 1
# get_config("x4"): 2,304 latents per layer. Decoded densely: the sparse decode
# (--config.sae.topk_decoder=sparse: each layer's k + k_aux selected latents from their rows of
# the unmasked blocks) trains the same CLT but ran at 64 tokens/s against the dense 86 on these
# cores, with 13.7 GiB against 1.4 (benchmarks/RESULTS.md, the CLT's train step).
X4_EXPANSION_FACTOR = 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The x1 CLT (no argument), the x4 one ("x4"), or the toy ("tiny")."""
    if arg not in (None, "", "x4", "tiny"):
        raise ValueError(f"experiments/clt_smollm2.py: unknown argument {arg!r}; use 'x4', "
                         "'tiny' or nothing.")
    config = smollm2.get_config("tiny" if arg == "tiny" else None)
    config.sae.shape = "clt"
    config.sae.layers = ",".join(map(str, LAYERS))
    config.sae.input_hook = INPUT_HOOK
    config.sae.target_hook = TARGET_HOOK
    config.lm.hook = TARGET_HOOK.format(layer=LAYERS[-1])
    if arg != "tiny":
        # Eight stores: smollm2.py's 32-chunk window, read ahead twice, would hold 3 x 32
        # chunks x 4,096 rows x 576 floats x 8 stores = 7 GB; 8 chunks a window hold 1.8 GB.
        config.data.shuffle_buffer_chunks = 8
        config.sae.expansion_factor = EXPANSION_FACTOR
        config.optim.learning_rate = smollm2.learning_rate(EXPANSION_FACTOR)
        # 154k of the 378,999 harvested rows.
        config.train.steps = 150
        config.train.checkpoint_every = 50
        # A window well inside the 153,600 tokens trained, so that AuxK (which revives the
        # latents silent for a window) engages; the measured runs used 200,000 (RESULTS), a
        # window longer than the run, so AuxK never did.
        config.evals.dead_window_tokens = 50_000
        config.evals.density_window_tokens = 50_000
    if arg == "x4":
        config.sae.expansion_factor = X4_EXPANSION_FACTOR
        config.optim.learning_rate = smollm2.learning_rate(X4_EXPANSION_FACTOR)
        config.sae.topk_decoder = "dense"
    return config


def store_paths(stores: str) -> str:
    """`data.path`: the harvest's stores of every hook, comma-separated."""
    return ",".join(f"{stores.rstrip('/')}/{hook}" for hook in HOOKS)


def get_sweep(arg: str | None = None) -> list[dict]:
    """The CLT, then a per-layer transcoder (TopK, the same size) at each of its layers."""
    if arg:
        raise ValueError(f"experiments/clt_smollm2.py: get_sweep takes no argument, got "
                         f"{arg!r}.")
    return [{}] + [{"sae.shape": "transcoder", "sae.input_hook": INPUT_HOOK.format(layer=layer),
                    "sae.target_hook": TARGET_HOOK.format(layer=layer),
                    "lm.hook": TARGET_HOOK.format(layer=layer)} for layer in LAYERS]


def transcoders_replacement(workdirs: list[str], *, batch_sequences: int = 8,
                            sequences: int | None = None) -> dict:
    """The replacement model of per-layer transcoders (one trained run's workdir per layer of
    LAYERS, e.g. the sweep's transcoder points): each layer's MLP output replaced by its own
    transcoder, which reads the replaced stream, all at once; loss recovered and KL against
    zero-ablating the same MLP outputs, on the held-out sequences of the first run's
    `lm.tokens` (`downstream.evaluate_replacement`, the CLT's evaluation): `sequences` of them,
    by default its `evals.loss_recovered_sequences`."""
    # Imported here: a config module stays importable without the LM stack.
    import jax  # pylint: disable=import-outside-toplevel
    from saejax.analysis import loaded as loaded_lib  # pylint: disable=import-outside-toplevel
    from saejax.data import lm  # pylint: disable=import-outside-toplevel
    from saejax.evals import downstream  # pylint: disable=import-outside-toplevel

    runs = [loaded_lib.load_run(w) for w in workdirs]
    hooks = [(run.sae_config.input_hook, run.sae_config.target_hook) for run in runs]
    run_config = loaded_lib.read_run_config(workdirs[0])
    lm_config = ml_collections.ConfigDict(run_config["lm"])
    n = int(sequences or run_config["evals"]["loss_recovered_sequences"])
    model = lm.from_checkpoint(str(lm_config.checkpoint), hooks[-1][1])
    _, tokens = lm.split(lm_config, model, n)

    def encode(params, layer, x):
        weights, scale = params[layer]
        x = x * scale
        return runs[layer].architecture.encode(weights, x, runs[layer].sae_config), x

    def decode(params, latents, layer):
        weights, scale = params[layer]
        f, x = latents[layer]
        return runs[layer].architecture.decode(weights, f, x) / scale

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    metrics, = downstream.evaluate_replacement(
        model, tokens, batch_sequences=batch_sequences, mesh=mesh,
        input_hooks=[h for h, _ in hooks], output_hooks=[h for _, h in hooks],
        encode=encode, decode=decode,
        clt_params=[[(run.params, np.float32(run.input_scale)) for run in runs]],
        keep=lm.keep_mask(tokens, *lm.exclusion(lm_config, model)))
    return metrics
