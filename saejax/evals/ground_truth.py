"""Ground-truth recovery of a run on a synthetic source (registered as "ground_truth"): MMCS
and SAELens' synthetic-benchmark scores (`evals.recovery_metrics`: Hungarian-matched MCC,
uniqueness, each latent's firing precision / recall / F1 / accuracy against its best-matching
true feature), over the source's held-out batches and their true codes. Every kind whose
source has true features (SAE, transcoder, crosscoder; a shape whose decoder is not one
`W_dec` gives its rows by `decoder_rows`, `evals.decoder_rows`)."""

from __future__ import annotations

import numpy as np

from saejax import evals
from saejax.evals import suite


@suite.register("ground_truth", needs=("ground_truth",),
                description="MMCS, Hungarian-matched MCC, uniqueness, firing precision/recall/F1")
def ground_truth(context: suite.Context) -> dict:
    batches = context.eval_batches()
    latents = [context.forward(b).latents for b in batches]
    codes = [np.asarray(context.source.eval_codes(i)) for i in range(len(batches))]
    decoder = evals.decoder_rows(context.architecture.shape, context.loaded.params)
    true_features = np.asarray(context.source.true_features)
    recovery = evals.recovery_metrics(decoder, true_features, latents, codes)
    true_l0 = float(np.mean([np.sum(c > 0, axis=-1).mean() for c in codes]))
    return {
        "eval_config": {"data_source": str(context.config.data.source),
                        "n_features": int(true_features.shape[0]),
                        "rows": int(sum(len(c) for c in codes))},
        "eval_result_metrics": {
            "recovery": {"mmcs": float(evals.mmcs(decoder, true_features)),
                         "mcc": recovery["mcc"], "uniqueness": recovery["uniqueness"],
                         "true_l0": true_l0},
            "classification": {k.split("/", 1)[1]: v for k, v in recovery.items()
                               if k.startswith("classification/")},
        },
    }
