"""One vmapped step for a group of G SAEs against G separate steps, measured in one run.

    python benchmarks/group_step.py --group_size=4 --d=256 --expansion_factor=4 --batch_size=1024
    python benchmarks/group_step.py --group_size=4 --source=lm    # GPT-2-small width, layer 2
    python benchmarks/group_step.py --group_size=4 --over=hooks   # G hooks from one forward

--over picks what the members differ in: `coefficients` (group.sparsity_coefficients, every
member reading the same batch) or `hooks` (group.hooks, --source=lm implied: the SAEs read G
hooks of block --layer, hook_resid_pre, hook_resid_mid, hook_mlp_out, hook_resid_post, ...,
whose rows one LM forward gives; G separate runs are G runs at one hook each, each paying a
forward to the same block: the solo run is measured at the last of the hooks).

Two measurements: the step alone on a fixed batch, and the step with its input, which a group
produces once for all members while G separate runs produce it G times. Prints times per step,
the speed-up, SAE-tokens/s and peak memory; the last line is one JSON object.

The input (--source):
- synthetic (default): the toy generator at width --d (default 256). It is cheap, so the group
  saves little by producing it once.
- lm: data.source="lm", a language model run on the fly at every step, as training on a model's
  activations without a store does. The model is a GPT-2 of width --d (default 768, GPT-2
  small's), --n_layer layers and --n_head heads with random weights (a forward's speed does not
  depend on them: benchmarks/common.write_random_gpt2, as benchmarks/pipeline.py), saved as a
  Hugging Face checkpoint in a temp dir, hooked at blocks.{--layer}.hook_resid_post (blocks after
  it are not run), over uniformly random token ids. The default (3 layers of d=768, hook at
  layer 2, 128-token sequences, batch 1024) costs one LM forward about as much as one SAE step
  of x4 on a CPU; the full default run is about 1.5-2 minutes on 2 idle CPU cores (an estimate
  from the shapes; --iters=5 halves the timed part).

  So that each timed step pays exactly one LM forward, for its own batch, and nothing else:
  - one forward batch is one training batch (lm.batch_sequences = batch_size / context_length,
    so --batch_size must be a multiple of --context_length) and the shuffle window is one chunk
    (data.shuffle_buffer_chunks = 1): with the trainer's defaults a window of 16 chunks of 32
    sequences is computed at once, every 64th batch, and a median over 10 steps would miss it;
  - data.prefetch_windows = 0: the forward runs in the caller, in `source.next_batch()`, not in
    the reader's background thread. With prefetching the thread would run forwards for batches
    ahead while the step is timed (on a CPU competing with it for the same cores, during the
    fixed-batch timing too), so neither timing would be the step's nor the step's plus its input.
    Training prefetches, so on an accelerator it may hide some of the forward behind the step;
    both run on the same device, and what the group saves is G - 1 forwards of device time.
  An extra timing, `source.next_batch()` alone in the solo run, is the input's cost per batch.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from saejax import data, models, sae, sharding, train  # noqa: E402

SYNTHETIC_D, LM_D = 256, 768


def _step_seconds(config, iters, *, time_input=False):
    """(seconds per step on a fixed batch, seconds per step producing its batch[, seconds per
    batch produced alone when `time_input`])."""
    mesh = sharding.make_mesh(config.mesh)
    with sharding.activate(mesh, config.sharding_rules):
        source = data.make_source(config, mesh=mesh, rules=config.sharding_rules)
        trainer = train.make_trainer(config, mesh, d=source.d, batch_sharding=source.sharding)
        fixed = source.next_batch()
        holder = {"state": trainer.init(jax.random.PRNGKey(0))}

        def run(batch_fn):
            holder["state"], metrics = trainer.train_step(holder["state"], batch_fn())
            return metrics

        times = (common.time_fn(run, lambda: fixed, iters=iters),
                 common.time_fn(run, source.next_batch, iters=iters))
        if time_input:
            times += (common.time_fn(source.next_batch, iters=iters),)
        if hasattr(source, "close"):
            source.close()
        return times


def _lm_config(config, args, workdir):
    """`config` switched to data.source="lm" over a random-init GPT-2 written into `workdir`;
    returns the facts about the model the result reports."""
    if args.batch_size % args.context_length:
        raise SystemExit(f"--batch_size={args.batch_size} must be a multiple of "
                         f"--context_length={args.context_length} (one LM forward per batch).")
    if not 0 <= args.layer < args.n_layer:
        raise SystemExit(f"--layer={args.layer} must lie in [0, --n_layer={args.n_layer}).")
    batch_sequences = args.batch_size // args.context_length
    checkpoint, params_used = common.write_random_gpt2(
        workdir, vocab_size=args.vocab_size, n_embd=args.d, n_layer=args.n_layer,
        n_head=args.n_head, n_positions=max(1024, args.context_length),
        used_layers=args.layer + 1)
    # The solo run's source takes 1 + 3 x (2 warm-up + iters) batches (the group's fewer), the
    # evaluation batches are held out at the end; past them a second epoch would cost the same.
    train_batches = 1 + 3 * (args.iters + 2)
    held_out = int(config.evals.eval_batches)
    tokens = common.write_random_tokens(
        os.path.join(workdir, "tokens.npy"),
        sequences=(train_batches + held_out) * batch_sequences,
        context_length=args.context_length, vocab_size=args.vocab_size)
    config.data.source = "lm"
    config.data.d = args.d
    config.data.shuffle_buffer_chunks = 1
    config.data.prefetch_windows = 0
    config.lm.checkpoint = checkpoint
    config.lm.tokens = tokens
    config.lm.hook = (_group_hooks(args)[-1] if args.over == "hooks"
                      else f"blocks.{args.layer}.hook_resid_post")
    config.lm.context_length = args.context_length
    config.lm.batch_sequences = batch_sequences
    return {"model": {"n_layer": args.n_layer, "n_embd": args.d, "n_head": args.n_head,
                      "vocab_size": args.vocab_size, "init": "random"},
            "hook": config.lm.hook, "context_length": args.context_length,
            "lm_batch_sequences": batch_sequences,
            # as benchmarks/pipeline.py: 2 x the weights of the blocks run + causal attention
            "lm_flops_per_token": 2 * params_used
            + 2 * (args.layer + 1) * args.context_length * args.d}


# The hooks of one block a hook group reads (--over=hooks), in this order.
BLOCK_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
               "hook_attn_out", "hook_mlp_in", "ln2.hook_normalized")


def _group_hooks(args) -> tuple[str, ...]:
    if not 1 <= args.group_size <= len(BLOCK_HOOKS):
        raise SystemExit(f"--over=hooks reads at most {len(BLOCK_HOOKS)} hooks of a block; "
                         f"--group_size={args.group_size}.")
    return tuple(f"blocks.{args.layer}.{hook}" for hook in BLOCK_HOOKS[:args.group_size])


def _as_group(config, args) -> None:
    """`config` (the solo run) turned into the group: G coefficients, or G hooks read from one
    forward."""
    if args.over == "coefficients":
        config.group.sparsity_coefficients = tuple(0.3 * 2**i for i in range(args.group_size))
        return
    config.lm.hook = config.group.hooks = ",".join(_group_hooks(args))


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--vectorize", default="auto", choices=("auto", "vmap", "map"),
                        help="group.vectorize: vmap the members, or map them one by one")
    parser.add_argument("--source", default="synthetic", choices=("synthetic", "lm"),
                        help="the step's input: the toy generator, or a GPT-2 run on the fly")
    parser.add_argument("--over", default="coefficients", choices=("coefficients", "hooks"),
                        help="the members differ in their sparsity coefficient or their hook")
    common.add_shape_flags(parser, d=None, expansion_factor=4, batch_size=1024)
    lm_flags = parser.add_argument_group("--source=lm", "the GPT-2 (its width is --d)")
    gpt2 = models.GPT2Config()
    lm_flags.add_argument("--n_layer", type=int, default=3)
    lm_flags.add_argument("--n_head", type=int, default=gpt2.n_head)
    lm_flags.add_argument("--vocab_size", type=int, default=gpt2.vocab_size)
    lm_flags.add_argument("--layer", type=int, default=2,
                          help="the SAEs read blocks.LAYER.hook_resid_post")
    lm_flags.add_argument("--context_length", type=int, default=128)
    args = parser.parse_args()
    if args.over == "hooks":
        args.source = "lm"
    if args.d is None:
        args.d = LM_D if args.source == "lm" else SYNTHETIC_D
    return args


def _print(result: dict, args) -> None:
    g, group, solo = args.group_size, result["group_seconds_per_step"], result[
        "solo_seconds_per_step"]
    group_with_input = result["group_seconds_per_step_with_input"]
    print(f"group of {g} {args.architecture} SAEs, one per "
          f"{'hook of one forward' if args.over == 'hooks' else 'coefficient'} (d={args.d}, "
          f"n_latents={result['n_latents']}, batch {args.batch_size}):")
    if "input_seconds_per_batch" in result:
        print(f"  input: {result['hook']} of a random GPT-2 ({args.n_layer} layers, "
              f"{args.n_head} heads), {result['lm_batch_sequences']} x {args.context_length} "
              f"tokens per forward: {result['input_seconds_per_batch'] * 1e3:.1f} ms per batch "
              f"({result['lm_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    print(f"  step only:  group {group * 1e3:.1f} ms vs {g} separate {g * solo * 1e3:.1f} ms "
          f"-> {result['speedup_step_only']:.2f}x")
    print(f"  with input: group {group_with_input * 1e3:.1f} ms vs {g} separate "
          f"{g * result['solo_seconds_per_step_with_input'] * 1e3:.1f} ms -> "
          f"{result['speedup_with_input']:.2f}x")
    print(f"  per SAE: {result['tokens_per_s_per_sae']:,.0f} tokens/s in the group, "
          f"{result['separate_tokens_per_s_per_sae']:,.0f} in {g} separate runs")
    print(f"  {result['tokens_per_s']:,.0f} SAE-tokens/s, group step at "
          f"{result['flops_per_s'] / 1e9:.1f} GFLOP/s of "
          f"{result['matmul_flops_per_s'] / 1e9:.1f} measured matmul peak, peak memory "
          f"{result['peak_memory_bytes'] / 2**20:.0f} MiB")
    print(json.dumps(result))


def main():
    args = _parse_args()
    config = common.config_from_flags(args)
    config.group.vectorize = args.vectorize

    workdir = tempfile.mkdtemp(prefix="saejax_group_step_bench_") if args.source == "lm" else None
    try:
        lm_facts = _lm_config(config, args, workdir) if workdir else None
        solo, solo_with_input, *input_only = _step_seconds(config, args.iters,
                                                           time_input=lm_facts is not None)
        _as_group(config, args)
        group, group_with_input = _step_seconds(config, args.iters)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    g = args.group_size
    flops_per_token = sae.get(args.architecture).flops_per_token(
        args.d, args.d * args.expansion_factor, config.sae)
    result = {
        "benchmark": "group_step", "source": args.source, "architecture": args.architecture,
        "over": args.over, "group_size": g, "d": args.d,
        "n_latents": args.d * args.expansion_factor, "batch_size": args.batch_size,
        "solo_seconds_per_step": solo, "group_seconds_per_step": group,
        "speedup_step_only": g * solo / group,
        "solo_seconds_per_step_with_input": solo_with_input,
        "group_seconds_per_step_with_input": group_with_input,
        "speedup_with_input": g * solo_with_input / group_with_input,
        "tokens_per_s": g * args.batch_size / group_with_input,  # SAE-tokens
        # Each SAE's tokens/s: in the group, and in G separate runs one after another.
        "tokens_per_s_per_sae": args.batch_size / group_with_input,
        "separate_tokens_per_s_per_sae": args.batch_size / (g * solo_with_input),
        "flops_per_s": g * args.batch_size * flops_per_token / group,
        "matmul_flops_per_s": common.matmul_flops_per_s(shapes=((args.peak_size,) * 3,)),
        "peak_memory_bytes": common.peak_memory_bytes(), "machine": common.machine(),
    }
    if lm_facts is not None:
        result.update(lm_facts)
        result["input_seconds_per_batch"] = input_only[0]
        result["lm_flops_per_s"] = args.batch_size * lm_facts["lm_flops_per_token"] / input_only[0]
    if args.over == "hooks":
        result["hooks"] = list(_group_hooks(args))
    _print(result, args)


if __name__ == "__main__":
    main()
