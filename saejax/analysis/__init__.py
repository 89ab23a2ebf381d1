"""Reading a trained dictionary: what each latent means and what it does.

- `loaded`: the `LoadedSAE` every tool reads, and reading a saejax run's workdir as one.
- `loading`: a run's workdir or a SAELens directory as one `LoadedSAE`, and the shared checks.
- `kinds`: what each kind of dictionary (SAE, transcoder, crosscoder, CLT) reads and writes,
  its flat latent index and the directions a latent writes; `stores`: the stores of the hooks
  it reads, of one harvest.
- `top_activations`: one sharded pass over the activation store(s) keeping each latent's top
  activating tokens with their context, density, mean activation and histogram.
- `dashboard`: static HTML pages per latent and an index (`python -m saejax.analysis.dashboard`).
- `review`: human validation in the browser (`python -m saejax.analysis.review`): a rating panel
  on each latent's page, blind with random-direction controls; `ratings`: the ratings file and
  the score and labels the pages and report show (the score: `saejax.evals.interpretability`).
- `steer`: the LM with a latent clamped, added or ablated where it writes
  (`python -m saejax.analysis.steer`); `interventions`: those interventions for every kind.
- `saelens`: export to and import from SAELens' on-disk format (SAEs and transcoders).
"""

import importlib

# Imported on first use, so that `python -m saejax.analysis.<tool>` does not import the tool's
# module twice (once through this package, once as __main__).
_EXPORTS = {
    "AnalysisError": "loading", "LoadedSAE": "loading", "check_latent": "loading",
    "check_width": "loading", "load_language_model": "loading", "load_sae": "loading",
    "export_saelens": "saelens", "import_saelens": "saelens",
    "SteeringResult": "steer", "steer": "steer",
    "TopActivations": "top_activations", "compute_top_activations": "top_activations",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"saejax.analysis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'saejax.analysis' has no attribute {name!r}")
