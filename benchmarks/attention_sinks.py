"""Attention sinks on a real LM: how much larger the first position's residual norm is than the
others', and what leaving the sinks out of the store does to a TopK SAE's FVU.

    SAEJAX_ASSETS=/work/assets/real PYTHONPATH=$PWD python benchmarks/attention_sinks.py \
        --model=smollm2 --hook=blocks.15.hook_resid_post --sequences=8 [--fvu_sequences=96]

1. Norms: saejax's own forward over the first `--sequences` windows (context 128) of the
   Shakespeare folder; prints the mean residual norm at position 0, at the BOS/special tokens
   elsewhere, and at every other token, and the ratio position 0 / others.
2. With `--fvu_sequences`, harvests that many windows twice into OUT (`--out`, default a temporary
   folder): every token, and the default exclusion (position 0 and the special tokens); trains
   a TopK SAE (k=32, expansion 4, `--steps` steps) on each store and prints each one's
   held-out FVU, and the FVU of the SAE trained with the sinks on the rows without them.
"""

import argparse
import os
import tempfile

import jax
import numpy as np

from saejax import configs, harvest, models, train
from saejax.data import lm, store

CONTEXT = 128


def norms(checkpoint: str, text: str, hook: str, n_sequences: int) -> dict:
    model = models.load(checkpoint)
    sequences = models.tokenizer.load_token_sequences(
        text, CONTEXT, tokenizer_path=checkpoint, vocab_size=model.config.vocab_size,
        bos_token_id=model.config.bos_token_id)[:n_sequences]
    forward = models.make_forward(model.config, hooks=(hook,),
                                  stop_at_layer=models.hook_layer(hook) + 1)
    acts = np.asarray(jax.jit(forward)(model.params, sequences.tokens)[1][hook], np.float32)
    norm = np.linalg.norm(acts, axis=-1)                       # [n, context]
    special = np.isin(sequences.tokens, lm.exclude_token_ids_of(
        lm.SPECIAL, checkpoint, model.config.bos_token_id))
    first = np.zeros_like(special)
    first[:, 0] = True
    other = ~first & ~special
    return {"position_0": float(norm[first].mean()),
            "special_elsewhere": float(norm[special & ~first].mean()) if np.any(
                special & ~first) else float("nan"),
            "others": float(norm[other].mean()),
            "ratio": float(norm[first].mean() / norm[other].mean()),
            "tokens": int(norm.size)}


def _train(store_path: str, workdir: str, d: int, steps: int) -> dict:
    config = configs.base_config()
    overrides = {"data.source": "store", "data.path": store_path, "data.d": d,
                 "data.normalize_inputs": True, "data.shuffle_buffer_chunks": 4,
                 "data.eval_tokens": 1024, "sae.architecture": "topk", "sae.k": 32,
                 "sae.expansion_factor": 4, "sae.k_aux": 256, "train.batch_size": 256,
                 "train.steps": steps, "train.log_every": steps, "train.checkpoint_every": steps,
                 "optim.learning_rate": 1e-3, "optim.warmup_steps": 20,
                 "evals.eval_batches": 4, "mesh.data": 1}
    return train.train_and_evaluate(configs.apply_overrides(config, overrides), workdir)


def fvu_on(workdir: str, store_path: str, n_rows: int) -> float:
    """FVU of the SAE in `workdir` on the last `n_rows` rows of `store_path`."""
    from saejax.analysis import loading  # pylint: disable=import-outside-toplevel
    loaded = loading.load_sae(workdir)
    opened = store.open_store(store_path)
    x = np.asarray(opened.read(opened.n_rows - n_rows, opened.n_rows).result(), np.float32)
    recon = np.asarray(loaded.reconstruct(x))
    return float(np.sum((x - recon) ** 2) / np.sum((x - x.mean(0)) ** 2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--fvu_sequences", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    root = os.environ.get("SAEJAX_ASSETS")
    if not root:
        parser.error("set SAEJAX_ASSETS to the folder `python -m saejax.models.fetch --out=DIR` "
                     "wrote")
    checkpoint, text = os.path.join(root, args.model), os.path.join(root, "shakespeare")
    print(args.model, args.hook, norms(checkpoint, text, args.hook, args.sequences), flush=True)
    if not args.fvu_sequences:
        return
    out = args.out or tempfile.mkdtemp()
    d = models.load(checkpoint).config.d_model
    stores = {}
    for name, exclusion in (("all_tokens", dict(exclude_positions=(), exclude_token_ids="")),
                            ("sinks_excluded", {})):
        result = harvest.harvest(checkpoint, text, os.path.join(out, name), hooks=[args.hook],
                                 context_length=CONTEXT, batch_sequences=8,
                                 max_sequences=args.fvu_sequences, chunk_rows=1024,
                                 **exclusion)
        stores[name] = result["stores"][args.hook]
    for name, path in stores.items():
        summary = _train(path, os.path.join(out, f"run_{name}"), d, args.steps)
        print(name, {k: summary.get(k) for k in ("fvu", "explained_variance", "l0",
                                                  "dead_fraction")}, flush=True)
    print("sae trained on all tokens, FVU on the rows without sinks:",
          fvu_on(os.path.join(out, "run_all_tokens"), stores["sinks_excluded"], 1024))


if __name__ == "__main__":
    main()
