"""SAELens' on-disk format as saejax reads and writes it: the file names, the config and
metadata fields of `cfg.json` (SAELens 6.x, and the names SAELens before 6.0 used), and which
registered architectures have a SAELens counterpart (`exportable`, `importable`, each through
the architecture's conversion and its shape's, `_convert`). The conversions both ways and the
command are in `saelens.py`, which re-exports every name here.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from saejax import sae
from saejax.analysis import loaded as loaded_sae
from saejax.errors import ConfigError
from saejax.sae import shapes

CFG_FILENAME = "cfg.json"                      # sae_lens/constants.py SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"   # sae_lens/constants.py SAE_WEIGHTS_FILENAME
# The format version written into cfg.json: SAELens reads configs older than 6.0 through its
# pre-6.0 converter, so the version says which layout this file has.
SAELENS_FORMAT_VERSION = "6.0.0"

# SAEConfig's fields (sae_lens/saes/sae.py) and SAEMetadata's, as `SAEConfig.to_dict` writes
# them: the metadata nested under "metadata" (saejax before this wrote "meta", still read).
CONFIG_FIELDS = ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                 "normalize_activations", "reshape_activations", "metadata")
METADATA_FIELDS = ("model_name", "hook_name", "model_class_name", "hook_layer",
                   "hook_head_index", "model_from_pretrained_kwargs", "prepend_bos",
                   "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                   "dataset_path", "sae_lens_version", "sae_lens_training_version")
# Written at the top level as well, where SAELens before 6.0 (and tools built on it) read them.
FLAT_METADATA_FIELDS = ("model_name", "hook_name", "hook_layer", "hook_head_index",
                        "context_size", "prepend_bos", "dataset_path")
# SAELens before 6.0 named some fields differently (handle_pre_6_0_config).
PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_layer": "hook_layer",
                 "hook_point_head_index": "hook_head_index",
                 "activation_fn_str": "activation_fn"}


def is_saelens_dir(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, n)) for n in (CFG_FILENAME, WEIGHTS_FILENAME))


def exportable(shape=shapes.SINGLE_HOOK) -> list[str]:
    """The registered architectures with a SAELens counterpart in `shape`: every one with a
    conversion (`Architecture.saelens`) for one hook; for a transcoder, those whose SAE form
    SAELens has a transcoder class of (`shapes.SAELENS_TRANSCODERS`)."""
    names = []
    for architecture in sae.ARCHITECTURES.values():
        if not (architecture.saelens and architecture.saelens.to_saelens):
            continue
        if shape.name != shapes.SINGLE_HOOK.name:
            if architecture.mechanism is None or (
                    architecture.mechanism.shapes is not None
                    and shape.name not in architecture.mechanism.shapes):
                continue
            architecture = sae.compose(architecture.mechanism, shape)
            try:
                _convert(architecture, _zeros_like_init(architecture))
            except ConfigError:
                continue
        names.append(architecture.name)
    return sorted(names)


def importable() -> list[str]:
    """The SAELens architectures some registered architecture reads, one hook or transcoder."""
    forms = {n for a in sae.ARCHITECTURES.values() if a.saelens for n in a.saelens.imports}
    return sorted(forms | {name for (form, _), name in shapes.SAELENS_TRANSCODERS.items()
                           if form in forms})


def _zeros_like_init(architecture) -> dict[str, np.ndarray]:
    """Params of `architecture`'s layout, all zero (what its SAELens form is named by)."""
    config = loaded_sae.sae_config_for(architecture.name)
    abstract = jax.eval_shape(lambda key: architecture.init(key, 4, 4, config),
                              jax.random.key(0))
    return {k: np.zeros(v.shape, np.float32) for k, v in abstract.items()}


def _convert(architecture, params, sae_config=None):
    """(SAELens architecture, tensors, cfg fields, metadata) at saejax's input scale: the
    mechanism's SAE form, turned by the shape into its own."""
    sae_config = sae_config or loaded_sae.sae_config_for(architecture.name)
    form, tensors, extra = architecture.saelens.to_saelens(params, sae_config)
    name, tensors, shape_fields, hooks = architecture.shape.to_saelens(form, tensors, params)
    return name, tensors, {**shape_fields, **extra}, hooks
