"""Runs in the SAELens environment (benchmarks/setup_saelens.sh: sae-lens and sae-bench),
never importing saejax: the reference side of tests/test_evals.py.

    python tests/saebench_peer.py REQUEST.json

REQUEST.json names an .npz of arrays (decoder rows, encoder, true features, batches of
activations, reconstructions, latents and true codes, tokens and three runs' logits) and the
result JSON files saejax writes (waited for: the test writes them while this imports). The
peer scores the arrays with the libraries' own functions: sae_lens.synthetic's MCC,
uniqueness and classification metrics; sae_lens.evals' sparsity-and-variance and
downstream-reconstruction metrics (the model, activation store and SAE are stand-ins that
hand back the given arrays, so the metric code itself is sae_lens'); sae_bench core's max
cosine and misc metrics. It validates each result file with sae_bench's own result class
(CoreEvalOutput for "core"). Prints one JSON line.
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from sae_lens import evals as sl_evals
from sae_lens.synthetic import evals as synthetic
from sae_lens.training.activation_scaler import ActivationScaler
from sae_bench.evals.core import main as core_main
from sae_bench.evals.core.eval_output import CoreEvalOutput
from transformer_lens.utils import lm_cross_entropy_loss

HOOK = "blocks.0.hook_resid_post"


class _Replay:
    """Model, activation store and SAE in one: each batch hands back the given arrays."""

    def __init__(self, arrays, tokens: str):
        self.a = arrays
        self.tokens = tokens  # "tokens" for the activations' batches, "lm_tokens" for the LM's
        self.i = -1
        self.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_name=HOOK, hook_head_index=None),
                                   d_sae=arrays["latents"].shape[-1])
        self.device = torch.device("cpu")

    # activation store
    def get_batch_tokens(self, n):
        self.i += 1
        if self.tokens == "tokens":  # every row a token of one prompt: [1, rows]
            return torch.zeros((1, self.a["x"].shape[2]), dtype=torch.long)
        return torch.from_numpy(self.a["lm_tokens"][self.i])

    # model: activations
    def run_with_cache(self, tokens, **kwargs):
        return None, {HOOK: torch.from_numpy(self.a["x"][self.i])}

    # SAE
    def encode(self, x):
        return torch.from_numpy(self.a["latents"][self.i])

    def decode(self, latents):
        return torch.from_numpy(self.a["x_hat"][self.i])

    # model: logits (clean, spliced, zero-ablated), the loss by TransformerLens
    def _both(self, logits, tokens):
        logits = torch.from_numpy(logits)
        return logits, lm_cross_entropy_loss(logits, tokens, per_token=True)

    def __call__(self, tokens, **kwargs):
        return self._both(self.a["clean_logits"][self.i], tokens)

    def run_with_hooks(self, tokens, fwd_hooks, **kwargs):
        (_, hook), = fwd_hooks
        ablated = "zero_ablate" in getattr(hook, "func", hook).__name__
        key = "ablated_logits" if ablated else "sae_logits"
        return self._both(self.a[key][self.i], tokens)


def _synthetic(a) -> dict:
    decoder, features = torch.from_numpy(a["decoder"]), torch.from_numpy(a["true_features"])
    latents = torch.from_numpy(a["latents"].reshape(-1, a["latents"].shape[-1]))
    codes = torch.from_numpy(a["codes"].reshape(-1, a["codes"].shape[-1]))
    classification = synthetic.compute_classification_metrics(latents, codes, decoder, features)
    return {"mcc": synthetic.mean_correlation_coefficient(decoder, features),
            "uniqueness": synthetic.feature_uniqueness(decoder, features),
            "classification": vars(classification)}


def _core(a) -> dict:
    replay = _Replay(a, "tokens")
    metrics, feature_metrics = sl_evals.get_sparsity_and_variance_metrics(
        replay, replay, replay, ActivationScaler(), n_batches=a["x"].shape[0],
        compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True, eval_batch_size_prompts=1,
        model_kwargs={})
    replay = _Replay(a, "lm_tokens")
    downstream = sl_evals.get_downstream_reconstruction_metrics(
        replay, replay, replay, ActivationScaler(), compute_kl=True, compute_ce_loss=True,
        n_batches=len(a["clean_logits"]), eval_batch_size_prompts=1)
    w_enc = torch.from_numpy(a["encoder"])              # [d, n], SAELens' layout
    w_dec = torch.from_numpy(a["decoder"])              # [n, d]
    weights = {"max_encoder_cosine_sim": core_main.calculate_max_cosine_sim(w_enc).tolist(),
               "max_decoder_cosine_sim": core_main.calculate_max_cosine_sim(w_dec.T).tolist()}
    misc = core_main.calculate_misc_metrics(
        {**weights, "feature_density": feature_metrics["feature_density"]})
    return {"sparsity_variance": metrics, "feature_density": feature_metrics["feature_density"],
            "downstream": downstream, "misc": misc, **weights}


VALIDATORS = {"core": CoreEvalOutput}


# What core computes only with a language model: a run without one leaves them out, and they
# are filled here with placeholders so that the rest is validated.
LM_CATEGORIES = {"model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation",
                                                 "kl_div_with_sae"),
                 "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation",
                                                    "ce_loss_with_sae", "ce_loss_without_sae")}


def _wait_for(path: str, timeout_s: float = 600.0) -> None:
    """The test writes the result files while this process imports and scores the arrays."""
    start = time.time()
    while not os.path.exists(path):
        if time.time() - start > timeout_s:
            raise TimeoutError(f"{path} was not written within {timeout_s} s")
        time.sleep(0.2)


def _validate(path: str) -> dict:
    _wait_for(path)
    with open(path) as f:
        result = json.load(f)
    cls = VALIDATORS[result["eval_type_id"]]
    fields = set(cls.__dataclass_fields__)
    metrics = dict(result["eval_result_metrics"])
    filled = [c for c in LM_CATEGORIES if c not in metrics]
    metrics.update({c: dict.fromkeys(LM_CATEGORIES[c], 0.0) for c in filled})
    parsed = cls(**{**{k: v for k, v in result.items() if k in fields},
                    "eval_result_metrics": metrics})
    return {"class": cls.__name__, "extra_fields": sorted(set(result) - fields),
            "placeholder_categories": filled, "categories": list(vars(parsed.eval_result_metrics)),
            "details": len(parsed.eval_result_details)}


def main(request_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    a = dict(np.load(request["arrays"]))
    out = {"synthetic": _synthetic(a), "core": _core(a),
           "validated": {p: _validate(p) for p in request.get("results", ())}}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
