"""The downstream metrics of a dictionary spliced into the language model at its hook point:
next-token cross-entropies and KL from the LM's logits, their sums over a token batch for the
clean, spliced and zero-ablated passes (`downstream_sums`), and the scores of the sums
(`downstream_metrics`, `loss_recovered`, `downstream_score`). Re-exported by `saejax.evals`,
where every caller names them; the LM's forward passes are run by `evals/downstream.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def downstream_score(with_sae, with_ablation, clean=0.0):
    """SAEBench's normalised downstream scores: the fraction of the gap between zero-ablating
    the hook and the clean model that the SAE closes. CE score: `(ce_ablation - ce_sae) /
    (ce_ablation - ce_clean)` (`loss_recovered`); KL score: clean KL is 0, so
    `(kl_ablation - kl_sae) / kl_ablation`."""
    return (with_ablation - with_sae) / (with_ablation - clean)


def next_token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Per-position cross-entropy (nats) of predicting `tokens[:, 1:]` from `logits[:, :-1]`:
    `[batch, seq - 1]`."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def kl_divergences(clean_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-position KL(clean || other) of the next-token distributions, `[batch, seq]`."""
    p_log = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
    q_log = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def loss_recovered(ce_clean, ce_sae, ce_zero_ablation):
    """Fraction of the loss gap between zero-ablating the hook point and the clean model that
    the SAE's reconstruction closes: 1 = as good as the clean model, 0 = as bad as ablation
    (SAEBench's CE score, `downstream_score`)."""
    return downstream_score(ce_sae, ce_zero_ablation, ce_clean)


def downstream_sums(lm_forward, tokens: jax.Array, hook, reconstructs, *,
                    ce_fn=None, kl_fn=None) -> list[dict]:
    """Summed next-token losses and KL of the clean LM, the LM with the activation at `hook`
    replaced by each SAE's reconstruction, and with it zero-ablated, over one token batch.

    Args:
      lm_forward: `(tokens, interventions) -> logits`, the LM with its params bound.
      tokens: int token ids `[batch, seq]`.
      hook: the hook point the SAEs were trained on, e.g. "blocks.8.hook_resid_post"; or
        several hooks, all zero-ablated together (a cross-layer transcoder's MLP outputs).
      reconstructs: per SAE, activation `[batch, seq, d]` -> its reconstruction at `hook` (one
        hook only); or per SAE the interventions `{hook: fn}` of its one spliced forward pass
        (the replacement model of a cross-layer transcoder; required with several hooks). The clean and zero-ablated passes are
        shared by all of them (a group's members).
      ce_fn, kl_fn: `(output, tokens) -> [batch, seq - 1]` and `(clean output, output) ->
        [batch, seq]` when `lm_forward` returns something other than logits (the final
        residual, for losses computed over the vocabulary in chunks); default
        `next_token_losses` and `kl_divergences` of logits.

    Returns one dict per SAE. Sums (not means) so batches add up; `positions` counts the
    predicted tokens.
    """
    next_token_losses_ = ce_fn or next_token_losses
    kl_divergences_ = kl_fn or kl_divergences
    hooks = (hook,) if isinstance(hook, str) else tuple(hook)
    clean = lm_forward(tokens, None)
    ablated = lm_forward(tokens, {h: jnp.zeros_like for h in hooks})
    shared = {
        "ce_clean": jnp.sum(next_token_losses_(clean, tokens)),
        "ce_zero_ablation": jnp.sum(next_token_losses_(ablated, tokens)),
        "kl_zero_ablation": jnp.sum(kl_divergences_(clean, ablated)[:, :-1]),
        "positions": jnp.asarray(tokens.shape[0] * (tokens.shape[1] - 1), jnp.float32),
    }
    sums = []
    for reconstruct in reconstructs:
        if not isinstance(reconstruct, dict) and len(hooks) > 1:
            # One function cannot say which of several hooks it replaces; splicing it at the
            # first alone would score a model that the others' ablation never sees replaced.
            raise ValueError(f"downstream_sums: with several hooks {list(hooks)} each entry of "
                             f"`reconstructs` must be a dict of interventions keyed by hook "
                             f"({{hook: fn}}, as the replacement model's), not one function.")
        interventions = reconstruct if isinstance(reconstruct, dict) else {hooks[0]: reconstruct}
        spliced = lm_forward(tokens, interventions)
        sums.append({**shared, "ce_sae": jnp.sum(next_token_losses_(spliced, tokens)),
                     "kl_sae": jnp.sum(kl_divergences_(clean, spliced)[:, :-1])})
    return sums


def downstream_metrics(sums: dict) -> dict:
    """Per-token means of `downstream_sums` (added over batches), the loss recovered (the CE
    score) and the KL score."""
    n = sums["positions"]
    means = {k: v / n for k, v in sums.items() if k != "positions"}
    return {**means, "loss_recovered": loss_recovered(means["ce_clean"], means["ce_sae"],
                                                      means["ce_zero_ablation"]),
            "kl_score": downstream_score(means["kl_sae"], means["kl_zero_ablation"])}
