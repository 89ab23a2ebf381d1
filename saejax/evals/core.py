"""SAEBench's core evaluation of a run (registered as "core"): reconstruction, shrinkage,
sparsity and density over the run's held-out batches, the largest cosine of each latent's
encoder and decoder to another's, and, when the run has a language model, the CE and KL scores
of the dictionary spliced in against zero-ablation. The metric definitions are in
`saejax.evals` (`reconstruction_sums` / `reconstruction_metrics`, `density_metrics`,
`max_cosine_to_others`, `downstream_metrics`); this module gathers them into SAEBench's
categories and field names (sae_bench.evals.core.eval_output)."""

from __future__ import annotations

import jax
import numpy as np

from saejax import evals
from saejax.evals import downstream, suite


def _sums(context: suite.Context) -> dict:
    total = None
    for batch in context.eval_batches():
        r = context.forward(batch)
        sums = jax.device_get(evals.reconstruction_sums(r.target, r.x_hat, r.latents))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    return total


def _weights(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(encoder rows `[n, d_in]`, decoder rows `[n, d_out]`) of the dictionary's params."""
    return np.asarray(params["W_enc"]).T, np.asarray(params["W_dec"])


def _details(params: dict, density, max_encoder, max_decoder) -> list[dict]:
    """SAEBench core's per-latent details. `consistent_activation_heuristic` (firings per
    prompt that fires) needs rows grouped by prompt, which shuffled store rows are not: -1,
    SAEBench's mark of a value it could not compute; so is the encoder-decoder cosine of a
    dictionary whose input and output widths differ."""
    encoder_rows, decoder_rows = _weights(params)
    encoder_norm = np.linalg.norm(encoder_rows, axis=-1)
    bias = np.asarray(params.get("b_enc", np.zeros(len(density))), np.float32)
    if encoder_rows.shape == decoder_rows.shape:
        unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
        enc_dec = np.sum(unit(encoder_rows) * unit(decoder_rows), axis=-1)
    else:
        enc_dec = np.full(len(density), -1.0)
    return [{"index": i, "feature_density": float(density[i]),
             "consistent_activation_heuristic": -1.0, "encoder_bias": float(bias[i]),
             "encoder_norm": float(encoder_norm[i]),
             "encoder_decoder_cosine_sim": float(enc_dec[i]),
             "max_decoder_cosine_sim": float(max_decoder[i]),
             "max_encoder_cosine_sim": float(max_encoder[i])} for i in range(len(density))]


def _lm_categories(context: suite.Context) -> dict:
    loaded = context.loaded
    result = downstream.evaluate_run(
        context.config, loaded.architecture, [(loaded.params, np.asarray(loaded.input_scale, np.float32))],
        context.mesh, d=loaded.d, sequences=int(context.options["sequences"]))[0]
    return {
        "model_behavior_preservation": {
            "kl_div_score": result["kl_score"], "kl_div_with_ablation": result["kl_zero_ablation"],
            "kl_div_with_sae": result["kl_sae"]},
        "model_performance_preservation": {
            "ce_loss_score": result["loss_recovered"],
            "ce_loss_with_ablation": result["ce_zero_ablation"],
            "ce_loss_with_sae": result["ce_sae"], "ce_loss_without_sae": result["ce_clean"]},
    }


@suite.register("core", description="SAEBench core: reconstruction, sparsity, density, "
                "encoder/decoder similarity; CE and KL scores when the run has an LM")
def core(context: suite.Context) -> dict:
    sums = _sums(context)
    metrics = {k: float(v) for k, v in evals.reconstruction_metrics(sums).items()}
    density = np.asarray(evals.feature_density(sums["fire_counts"], sums["rows"]))
    encoder_rows, decoder_rows = _weights(context.loaded.params)
    max_encoder = np.asarray(evals.max_cosine_to_others(encoder_rows))
    max_decoder = np.asarray(evals.max_cosine_to_others(decoder_rows))
    misc = {k: float(v) for k, v in evals.density_metrics(density).items()}
    categories = _lm_categories(context) if context.has_lm else {}
    rows = int(sums["rows"])
    categories.update({
        "reconstruction_quality": {k: metrics[k] for k in
                                   ("explained_variance", "explained_variance_legacy", "mse",
                                    "cossim")},
        "shrinkage": {k: metrics[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio",
                                              "relative_reconstruction_bias")},
        "sparsity": {"l0": metrics["l0"], "l1": metrics["l1"]},
        "token_stats": {"total_tokens_eval_reconstruction":
                        (rows if not context.has_lm else
                         int(context.options["sequences"]) * int(context.config.lm.context_length)),
                        "total_tokens_eval_sparsity_variance": rows},
        "misc_metrics": {**misc, "average_max_encoder_cosine_sim": float(np.mean(max_encoder)),
                         "average_max_decoder_cosine_sim": float(np.mean(max_decoder))},
    })
    details = _details(context.loaded.params, density, max_encoder, max_decoder)
    return {"eval_config": {"model_name": context.loaded.lm_checkpoint or "",
                            "n_eval_sparsity_variance_batches": len(context.eval_batches()),
                            "context_size": int(context.config.lm.context_length),
                            "compute_kl": context.has_lm, "compute_ce_loss": context.has_lm,
                            "compute_l2_norms": True, "compute_sparsity_metrics": True,
                            "compute_variance_metrics": True,
                            "compute_featurewise_density_statistics": True,
                            "compute_featurewise_weight_based_metrics": True},
            "eval_result_metrics": categories, "eval_result_details": details}
