"""SAELens interop: export a trained SAE to SAELens' on-disk format and import SAELens SAEs.

    python -m saejax.analysis.saelens DIR OUT [--step=N]    # export a run's SAE to OUT

A SAELens SAE directory holds `cfg.json` and `sae_weights.safetensors` (`W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_in]`, `b_dec [d_in]`, and per architecture `b_enc`, `threshold`, `b_gate`,
`r_mag`, `b_mag`). The field and tensor names and the encode formulas below follow SAELens'
source (sae_lens/saes/{sae,standard_sae,topk_sae,jumprelu_sae,gated_sae,batchtopk_sae,
transcoder}.py, sae_lens/loading/pretrained_sae_loaders.py, SAELens 6.x; older flat configs are
read too); tests/test_saelens_interop.py checks them against sae_lens itself.

A transcoder (`sae.shape='transcoder'`) is one of SAELens' transcoder classes (`transcoder`,
`skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`): `d_out`, the target
hook as `hook_name_out`, `W_skip [d_out, d_in]`; the shape does its part of the conversion
(`shapes.Transcoder.to_saelens`), the mechanism the rest.

SAELens encodes raw activations: `sae_in = x - b_dec * apply_b_dec_to_input`,
`hidden_pre = sae_in @ W_enc + b_enc`. saejax encodes `x * input_scale`, so the export folds the
scale into the weights (W_enc * s, b_dec / s, W_dec / s, the fold SAELens itself uses for
`expected_average_only_in`): the latents are unchanged and the reconstruction comes out in raw
units, with `normalize_activations: "none"`.

The format's file names and fields, and which architectures convert, are in `saelens_format.py`
(re-exported here); this module owns the conversions both ways and the command.
"""


from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
import numpy as np

from saejax import cli, models, sae
from saejax.analysis import loaded as loaded_sae
from saejax.analysis.loaded import AnalysisError, LoadedSAE
# The format, named here as every caller names it (saelens.exportable, saelens.CFG_FILENAME).
from saejax.analysis.saelens_format import (  # noqa: F401
    CFG_FILENAME, CONFIG_FIELDS, FLAT_METADATA_FIELDS, METADATA_FIELDS, PRE_6_RENAMES,
    SAELENS_FORMAT_VERSION, WEIGHTS_FILENAME, _convert, exportable, importable, is_saelens_dir)
from saejax.errors import ConfigError
from saejax.sae import shapes


# ------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------
def to_saelens(loaded: LoadedSAE, *, model_name: str | None = None,
               dataset_path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, cfg) of `loaded` as a SAELens inference SAE that reads raw activations."""
    architecture = loaded.architecture
    shape = architecture.shape
    described = f"a {architecture.name!r} SAE" + (
        "" if shape.name == shapes.SINGLE_HOOK.name else f" with sae.shape={shape.name!r}")
    if architecture.saelens is None or architecture.saelens.to_saelens is None:
        raise AnalysisError(f"{described} has no SAELens counterpart; only "
                            f"{exportable(shape)} SAEs export.")
    p = {k: np.asarray(v, np.float32) for k, v in loaded.params.items()}
    try:
        name, tensors, extra, hooks = _convert(architecture, p, loaded.sae_config)
    except ConfigError as e:
        raise AnalysisError(f"{described} has no SAELens counterpart: {e} saejax exports "
                            f"{exportable(shape)} with sae.shape={shape.name!r}.") from None
    s = np.float32(loaded.input_scale)
    tensors = {**tensors, "W_enc": tensors["W_enc"] * s, "W_dec": tensors["W_dec"] / s,
               "b_dec": tensors["b_dec"] / s}
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    metadata = _metadata(loaded, model_name, dataset_path, hooks)
    cfg = {
        "architecture": name,
        "d_in": loaded.d,
        "d_sae": loaded.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": metadata,
        **{k: metadata[k] for k in FLAT_METADATA_FIELDS},
        # Ignored by SAELens (it keeps only its dataclass fields); where this SAE came from.
        "saejax": {"architecture": architecture.name, "shape": shape.name,
                   "source": loaded.source, "step": loaded.step,
                   "input_scale_folded": float(loaded.input_scale),
                   "lm_checkpoint": loaded.lm_checkpoint, "store": loaded.store},
    }
    return tensors, cfg


def _metadata(loaded: LoadedSAE, model_name, dataset_path, hooks: dict) -> dict[str, Any]:
    """SAEMetadata's fields; `hooks` are the shape's (a transcoder's hook_name_out)."""
    hook = hooks.get("hook_name", loaded.hook)
    if model_name is None and loaded.lm_checkpoint:
        model_name = os.path.basename(os.path.normpath(loaded.lm_checkpoint))
    return {
        "model_name": model_name,
        "hook_name": hook,
        "model_class_name": "HookedTransformer",
        "hook_layer": _hook_layer(hook),
        "hook_head_index": None,
        "model_from_pretrained_kwargs": None,
        # saejax's sequences are windows of a document stream with <|endoftext|> between
        # documents, not each started by a BOS token.
        "prepend_bos": False,
        "exclude_special_tokens": None,
        "neuronpedia_id": None,
        "context_size": loaded.context_length,
        "seqpos_slice": None,
        "dataset_path": dataset_path,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        **hooks,
    }


def export_saelens(source: str | LoadedSAE, out_dir: str, *, step: int | None = None,
                   model_name: str | None = None) -> str:
    """Writes `out_dir/cfg.json` and `out_dir/sae_weights.safetensors` for a trained run's
    workdir (its newest checkpoint, or `step`) or a `LoadedSAE`; returns out_dir.

    `SAE.load_from_disk(out_dir)` in SAELens then encodes raw activations at the run's hook to
    the same latents as saejax, and decodes them to the same reconstruction in raw units (a
    transcoder's `forward` reconstructs its target hook).
    """
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    loaded = source if isinstance(source, LoadedSAE) else _load_run(source, step)
    dataset_path = None
    config = (loaded.metadata or {}).get("config", {})
    if config:
        dataset_path = config.get("lm", {}).get("tokens") or config.get("data", {}).get("path")
    tensors, cfg = to_saelens(loaded, model_name=model_name, dataset_path=dataset_path or None)
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILENAME)
    # SAELens reads the file with safe_open(framework="pt"), which wants a format tag.
    st_numpy.save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(out_dir, CFG_FILENAME) + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(os.path.join(out_dir, CFG_FILENAME) + ".tmp", os.path.join(out_dir, CFG_FILENAME))
    return out_dir


def _load_run(workdir: str, step: int | None) -> LoadedSAE:
    workdir = os.path.abspath(os.fspath(workdir))
    if not loaded_sae.is_run_dir(workdir):
        raise AnalysisError(f"{workdir} is not a saejax run directory (config.json and "
                            "checkpoints/, as `python -m saejax.main --workdir` writes).")
    return loaded_sae.load_run(workdir, step)


def _hook_layer(hook: str | None) -> int | None:
    if not hook:
        return None
    try:
        return models.hook_layer(hook)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------
# Import.
# ------------------------------------------------------------------------------------------
def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    try:
        return dict(st_numpy.load_file(path))
    except TypeError:  # bfloat16: NumPy has no such dtype; the JAX reader has
        from safetensors import flax as st_flax  # pylint: disable=import-outside-toplevel
        return {k: np.asarray(v.astype("float32")) for k, v in st_flax.load_file(path).items()}


def _flat_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """cfg.json in one flat namespace: 6.x nests the metadata under "metadata" (saejax wrote
    "meta"); before 6.0 it was flat, with some older names."""
    flat = {PRE_6_RENAMES.get(k, k): v for k, v in cfg.items() if k not in ("meta", "metadata")}
    for key, value in {**(cfg.get("meta") or {}), **(cfg.get("metadata") or {})}.items():
        if value is not None or key not in flat:
            flat[key] = value
    return flat


def _read_directory(path: str) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(cfg.json, its flat form, float32 tensors) of a SAELens directory."""
    for file in (os.path.join(path, n) for n in (CFG_FILENAME, WEIGHTS_FILENAME)):
        if not os.path.isfile(file):
            raise AnalysisError(f"{path} is not a SAELens SAE directory: {os.path.basename(file)}"
                                f" is missing (it needs {CFG_FILENAME} and {WEIGHTS_FILENAME}).")
    with open(os.path.join(path, CFG_FILENAME)) as f:
        cfg = json.load(f)
    tensors = _read_safetensors(os.path.join(path, WEIGHTS_FILENAME))
    return cfg, _flat_config(cfg), {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _saelens_architecture(flat: dict, where: str) -> str:
    """cfg.json's architecture, checked to be one saejax reads."""
    architecture = flat.get("architecture") or "standard"
    if architecture not in importable():
        raise AnalysisError(f"{where}: architecture={architecture!r} has no saejax "
                            f"counterpart; supported: {importable()}.")
    activation_fn = flat.get("activation_fn")
    if activation_fn not in (None, "relu", "topk"):
        raise AnalysisError(f"{where}: activation_fn={activation_fn!r}; saejax reads SAEs "
                            "whose activation is ReLU (or TopK).")
    if flat.get("reshape_activations") not in (None, "none"):
        raise AnalysisError(f"{where}: reshape_activations={flat['reshape_activations']!r} "
                            "(attention hook_z SAEs) is not supported; saejax's hooks are "
                            "[batch, seq, d] activations.")
    if activation_fn == "topk" and architecture == "standard":
        return "topk"  # SAELens 4.x/5.x wrote TopK SAEs as standard + activation_fn
    return architecture


def _input_scale(flat: dict, where: str, norm_scaling_factor: float | None) -> float:
    normalize = flat.get("normalize_activations")
    if normalize in (True, "expected_average_only_in"):
        if norm_scaling_factor is None:
            raise AnalysisError(
                f"{where}: normalize_activations='expected_average_only_in' scales inputs by "
                "a dataset-wide factor that is not stored in the directory; pass "
                "norm_scaling_factor= (SAELens' pretrained_saes.yaml lists it as "
                "norm_scaling_factor), or fold it into the weights first "
                "(SAE.fold_activation_norm_scaling_factor in SAELens).")
        return float(norm_scaling_factor)
    if normalize not in (None, False, "none"):
        raise AnalysisError(f"{where}: normalize_activations={normalize!r} normalises each "
                            "token on its own, which a saejax SAE cannot express; only 'none' "
                            "and 'expected_average_only_in' are supported.")
    return 1.0


def _check_tensors(tensors: dict, required: dict, architecture: str, flat: dict,
                   where: str) -> None:
    for name, shape in required.items():
        if name not in tensors:
            raise AnalysisError(f"{where}: tensor {name!r} is missing; a SAELens "
                                f"{architecture!r} SAE has {sorted(required)}.")
        if tensors[name].shape != shape:
            widths = ", ".join(f"{k}={flat[k]}" for k in ("d_in", "d_sae", "d_out") if k in flat)
            raise AnalysisError(f"{where}: {name} has shape {tensors[name].shape}, but "
                                f"cfg.json's {widths} imply {shape}.")


def import_saelens(path: str, *, norm_scaling_factor: float | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a SAELens SAE (or transcoder) directory as saejax params (float32 NumPy) and
    metadata.

    The params encode raw activations times `metadata["input_scale"]` with the architecture
    `metadata["architecture"]` in the shape `metadata["sae_fields"]` name to SAELens' latents,
    and decode them to its reconstruction (times the same scale). What SAELens does outside
    its weights is folded in: `apply_b_dec_to_input: false` (into b_enc),
    `rescale_acts_by_decoder_norm` (into the weights), a finetuning scaling factor (into
    W_dec). `normalize_activations: "expected_average_only_in"` multiplies inputs by a
    dataset-wide factor that is not in the directory: pass it as `norm_scaling_factor` (it
    becomes the input scale). Per-token normalisations ("constant_norm_rescale",
    "layer_norm") and hook_z reshaping have no saejax counterpart and are refused.
    """
    path = os.path.abspath(path)
    cfg_path, weights_path = (os.path.join(path, n) for n in (CFG_FILENAME, WEIGHTS_FILENAME))
    cfg, flat, tensors = _read_directory(path)
    architecture = _saelens_architecture(flat, cfg_path)
    input_scale = _input_scale(flat, cfg_path, norm_scaling_factor)
    shape, form = shapes.from_saelens(architecture, flat)
    d_in, d_sae = int(flat["d_in"]), int(flat["d_sae"])
    conversion = sae.saelens_importer(form).saelens
    _check_tensors(tensors, {**shape.saelens_required(d_in, d_sae, flat),
                             **conversion.required(form, d_sae, tensors)},
                   architecture, flat, weights_path)

    folded = []
    scaling = tensors.get("finetuning_scaling_factor", tensors.get("scaling_factor"))
    if scaling is not None and not np.allclose(scaling, 1.0):
        # decode: (f * scaling) @ W_dec
        tensors = {**tensors, "W_dec": tensors["W_dec"] * scaling[:, None]}
        folded.append("finetuning_scaling_factor into W_dec")
    try:
        saejax_architecture, params, fields, own_folds = conversion.from_saelens(
            form, tensors, flat)
        params, shape_folds = shape.from_saelens(params, tensors, flat, conversion)
    except ConfigError as e:
        raise AnalysisError(f"{cfg_path}: {e}") from None
    params = {key: np.ascontiguousarray(v, np.float32) for key, v in params.items()}
    k = fields.get("k")
    provenance = cfg.get("saejax") if isinstance(cfg.get("saejax"), dict) else {}
    metadata = {
        "architecture": saejax_architecture,
        "saelens_architecture": architecture,
        "d": d_in,
        "n_latents": d_sae,
        "k": None if k is None else int(k),
        # The `sae.<field>`s it needs besides its params: the mechanism's and the shape's.
        "sae_fields": {**fields, **shape.config_fields()},
        "input_scale": input_scale,
        "hook": flat.get("hook_name"),
        "layer": flat.get("hook_layer"),
        "model_name": flat.get("model_name"),
        "context_size": flat.get("context_size"),
        "prepend_bos": flat.get("prepend_bos"),
        "dataset_path": flat.get("dataset_path"),
        "sae_lens_version": flat.get("sae_lens_version"),
        "folded": folded + own_folds + shape_folds,
        "saejax": provenance,
        "cfg": cfg,
    }
    return params, metadata


def load(path: str, *, norm_scaling_factor: float | None = None) -> LoadedSAE:
    """A SAELens directory as a `LoadedSAE`, usable by every analysis tool."""
    params, metadata = import_saelens(path, norm_scaling_factor=norm_scaling_factor)
    sae_config = loaded_sae.sae_config_for(metadata["architecture"], **metadata["sae_fields"])
    provenance = metadata["saejax"]
    # A directory saejax exported remembers its model and store; use them when still there.
    existing = lambda p: p if p and os.path.exists(p) else None
    return LoadedSAE(
        params=params, input_scale=metadata["input_scale"],
        architecture=sae.from_config(sae_config), sae_config=sae_config,
        source=os.path.abspath(path), kind="saelens", hook=metadata["hook"],
        lm_checkpoint=existing(provenance.get("lm_checkpoint")),
        store=existing(provenance.get("store")), data_source="saelens",
        context_length=metadata["context_size"], metadata=metadata)


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py).
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("model_name", None, "cfg.json's model_name (default: the checkpoint "
                        "directory's name), e.g. the TransformerLens name gpt2-small.")


def main(argv):
    workdir, out = cli.positional(argv, 2, "python -m saejax.analysis.saelens DIR OUT "
                                           "[--step=N] (DIR: a run's workdir; OUT: the "
                                           "SAELens directory to write)")
    cli.setup()
    out = export_saelens(workdir, out, step=flags.FLAGS.step,
                         model_name=flags.FLAGS.model_name)
    print(f"SAELens SAE: {out} (load it with sae_lens.SAE.load_from_disk({out!r}))")


if __name__ == "__main__":
    cli.run(main, _define_flags)
