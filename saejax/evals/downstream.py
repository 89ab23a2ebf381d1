"""Loss recovered and KL with SAEs spliced into their language model: the clean, zero-ablated
and spliced forward passes over held-out token sequences, summed by `evals.downstream_sums`.
An evaluation of the data layer's `LanguageModel` (saejax.data.lm), so it lives above it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax import evals, models
from saejax.data.lm import LanguageModel


def evaluate(model: LanguageModel, tokens: np.ndarray, *, batch_sequences: int, reconstruct,
             sae_params: list, mesh, keep: np.ndarray | None = None,
             input_hook: str | None = None) -> list[dict]:
    """Per SAE of `sae_params`: loss recovered and KL with it spliced in at the model's hook
    (`evals.downstream_metrics`), over `tokens` in batches of `batch_sequences`. The clean and
    zero-ablated forward passes run once per batch for all the SAEs.

    `reconstruct(sae_params, activation [n, d]) -> reconstruction [n, d]` applies the SAE (with
    its input scale) to raw activations; it runs inside the same jitted program as the LM.
    With `input_hook` (a transcoder's: upstream of the model's hook, e.g. the MLP's normalised
    input for its output), `reconstruct` reads the clean activation there and its output
    replaces the activation at the hook: the MLP replaced by the transcoder.
    `keep` (bool like `tokens`; default all): the tokens the SAE reads (`keep_mask`); at the
    others (attention sinks it was not trained on) both the SAE and the zero ablation leave
    the activation as it is.
    """

    config = model.config

    @jax.jit
    def sums(lm_params, sae_params, tokens, keep):
        def only_kept(replace):
            return lambda x: jnp.where(keep[..., None], replace(x), x)

        # The final residual, not the logits: the losses run over the vocabulary in chunks.
        def lm_forward(t, interventions):
            if interventions:
                interventions = {h: only_kept(f) for h, f in interventions.items()}
            return models.forward(lm_params, t, config, interventions=interventions,
                                  unembed=False)[0]

        reads = None
        if input_hook not in (None, model.hook):  # the clean input, captured once
            reads = models.forward(lm_params, tokens, config, hooks=(input_hook,),
                                   stop_at_layer=model.layer + 1, unembed=False)[1][input_hook]

        def splice(params):
            def apply(x):
                source = x if reads is None else reads
                flat = reconstruct(params, source.reshape(-1, source.shape[-1]))
                return flat.reshape(*x.shape[:-1], -1).astype(x.dtype)
            return apply

        w_u, cap = models.unembedding(lm_params, config), config.final_logit_softcapping
        return evals.downstream_sums(
            lm_forward, tokens, model.hook, [splice(p) for p in sae_params],
            ce_fn=lambda h, t: models.vocab.next_token_losses(h, t, w_u, softcap=cap),
            kl_fn=lambda h, g: models.vocab.kl_divergences(h, g, w_u, softcap=cap))

    # A model split over a mesh (`LanguageModel.mesh`, tensor parallel) runs as it is sharded,
    # under its rules; else it is replicated over `mesh`.
    lm_params = model.params if model.mesh is not None else jax.device_put(
        model.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    keep = np.ones(np.shape(tokens), bool) if keep is None else np.asarray(keep, bool)
    total = None
    for start in range(0, len(tokens), batch_sequences):
        chunk = np.asarray(tokens[start:start + batch_sequences], np.int32)
        with model.context():
            out = jax.device_get(sums(lm_params, list(sae_params), chunk,
                                      keep[start:start + batch_sequences]))
        total = out if total is None else jax.tree.map(np.add, total, out)
    return [{k: float(v) for k, v in evals.downstream_metrics(t).items()} for t in total]
