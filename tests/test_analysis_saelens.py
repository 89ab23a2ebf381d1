"""SAELens interop: export to and import from SAELens' on-disk format, checked against the
format's documented field and tensor names and against SAELens' encode/decode formulas
(transcribed below from sae_lens/saes/*.py), on raw activations. tests/test_saelens_interop.py
checks the same against sae_lens itself where its environment is installed."""

import json
import os
import re

import jax
import numpy as np
import pytest

from saejax import sae
from saejax.analysis import loading, saelens
from saejax.analysis.loading import AnalysisError, LoadedSAE
from saejax.sae import shapes

D, N = 16, 48
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------
# SAELens' inference formulas (SAE.process_sae_in, StandardSAE / TopKSAE / JumpReLUSAE /
# GatedSAE .encode and .decode), in NumPy.
# ------------------------------------------------------------------------------------------
def _flat(cfg):
    out = {k: v for k, v in cfg.items() if k not in ("meta", "metadata")}
    out.update({k: v for k, v in (cfg.get("meta") or cfg.get("metadata") or {}).items()})
    return out


def saelens_encode(cfg, w, x):
    cfg = _flat(cfg)
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    architecture = cfg.get("architecture", "standard")
    if architecture == "gated":
        gate = sae_in @ w["W_enc"] + w["b_gate"]
        magnitude = sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
        return (gate > 0) * np.maximum(magnitude, 0)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * np.linalg.norm(w["W_dec"], axis=-1)
    if architecture == "standard" and cfg.get("activation_fn", "relu") == "relu":
        return np.maximum(hidden_pre, 0)
    if architecture == "jumprelu":
        return np.maximum(hidden_pre, 0) * (hidden_pre > w["threshold"])
    k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
    top = np.argsort(-hidden_pre, axis=-1)[:, :k]
    out = np.zeros_like(hidden_pre)
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(hidden_pre, top, -1), 0), -1)
    return out


def saelens_decode(cfg, w, f):
    if _flat(cfg).get("rescale_acts_by_decoder_norm"):
        f = f / np.linalg.norm(w["W_dec"], axis=-1)
    return f @ w["W_dec"] + w["b_dec"]


def _read(directory):
    from safetensors import numpy as st_numpy
    with open(os.path.join(directory, "cfg.json")) as f:
        cfg = json.load(f)
    return cfg, dict(st_numpy.load_file(os.path.join(directory, "sae_weights.safetensors")))


def _write(directory, cfg, tensors):
    from safetensors import numpy as st_numpy
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    st_numpy.save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()},
                       os.path.join(directory, "sae_weights.safetensors"),
                       metadata={"format": "pt"})


def _trained_like(architecture, input_scale=0.37):
    """A saejax SAE with every parameter away from its initial value."""
    config = loading.sae_config_for(architecture, k=5, switch_experts=4)
    params = jax.tree.map(np.asarray, sae.get(architecture).init(
        jax.random.PRNGKey(1), D, N, config))
    params = {k: np.array(v, np.float32) for k, v in params.items()}
    params["W_dec"] *= RNG.uniform(0.5, 1.5, (N, 1)).astype(np.float32)
    params["b_enc"] = RNG.normal(-0.2, 0.2, N).astype(np.float32)
    params["b_dec"] = RNG.normal(0, 1, D).astype(np.float32)
    if architecture == "jumprelu":
        params["log_threshold"] = np.log(RNG.uniform(0.05, 0.4, N)).astype(np.float32)
    if architecture == "gated":
        params["r_mag"] = RNG.normal(0, 0.3, N).astype(np.float32)
        params["b_mag"] = RNG.normal(0, 0.2, N).astype(np.float32)
    if architecture == "batchtopk":
        params["threshold"] = np.float32(0.15)
    return LoadedSAE(params=params, input_scale=input_scale,
                     architecture=sae.get(architecture), sae_config=config, source="/runs/x",
                     kind="saejax", step=7, hook="blocks.3.hook_resid_post",
                     lm_checkpoint="/models/gpt2", context_length=128)


def _activations(n=64):
    return (RNG.normal(0, 3, (n, D)) + 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------
# The SAELens form of the built-in architectures, as SAELens' documentation names it; an
# architecture registered later is checked by the same test against the tensors of the
# SAELens architecture it names (tests/test_saelens_interop.py runs sae_lens itself on all).
EXPECTED = {"relu": ("standard", {"b_enc"}), "topk": ("topk", {"b_enc"}),
            "jumprelu": ("jumprelu", {"b_enc", "threshold"}),
            "batchtopk": ("jumprelu", {"b_enc", "threshold"}),
            "gated": ("gated", {"b_gate", "r_mag", "b_mag"})}
SAELENS_TENSORS = {name: extra for name, extra in EXPECTED.values()}


@pytest.mark.parametrize("architecture", saelens.exportable())
def test_export_matches_the_format_and_saelens_formulas_on_raw_activations(architecture,
                                                                           tmp_path):
    loaded = _trained_like(architecture)
    out = saelens.export_saelens(loaded, str(tmp_path / "sae"))
    assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors"]
    cfg, w = _read(out)

    # The documented names: SAEConfig's fields with SAEMetadata nested under "metadata".
    name, extra = EXPECTED.get(architecture,
                               (cfg["architecture"], SAELENS_TENSORS.get(cfg["architecture"])))
    assert cfg["architecture"] == name and extra is not None, cfg["architecture"]
    assert set(saelens.CONFIG_FIELDS) <= set(cfg)
    assert set(cfg["metadata"]) == set(saelens.METADATA_FIELDS)
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, N, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["hook_layer"] == cfg["hook_layer"] == 3
    assert cfg["metadata"]["model_name"] == "gpt2" and cfg["metadata"]["context_size"] == 128
    if architecture == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    assert set(w) == {"W_enc", "W_dec", "b_dec"} | extra
    shapes = {"W_enc": (D, N), "W_dec": (N, D), "b_dec": (D,), "b_enc": (N,), "b_gate": (N,),
              "r_mag": (N,), "b_mag": (N,), "threshold": (N,)}
    for key, value in w.items():
        assert value.shape == shapes[key] and value.dtype == np.float32, key

    # SAELens on raw activations gives saejax's latents and its reconstruction in raw units.
    x = _activations()
    latents = np.asarray(loaded.encode(x))
    assert 0 < np.mean(latents > 0) < 0.9, "a degenerate test SAE"
    np.testing.assert_allclose(saelens_encode(cfg, w, x), latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(saelens_decode(cfg, w, latents), loaded.reconstruct(x),
                               rtol=1e-5, atol=1e-4)

    # And the import reads it back to the same SAE (the scale now folded in).
    imported = saelens.load(out)
    assert imported.input_scale == 1.0 and imported.n_latents == N
    np.testing.assert_allclose(imported.encode(x), latents, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(imported.reconstruct(x), loaded.reconstruct(x), rtol=1e-5,
                               atol=1e-4)


def test_a_run_directory_exports_through_load_sae(tmp_path):
    """export_saelens(workdir) goes through load_sae; a switch SAE has no SAELens form."""
    with pytest.raises(AnalysisError, match=r"'switch' SAE has no SAELens counterpart"):
        saelens.to_saelens(_trained_like("switch"))
    with pytest.raises(AnalysisError, match=r"is not a saejax run directory"):
        saelens.export_saelens(str(tmp_path), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------
# Import of directories as SAELens writes them.
# ------------------------------------------------------------------------------------------
def _meta(**overrides):
    meta = {"model_name": "gpt2-small", "hook_name": "blocks.5.hook_resid_post",
            "model_class_name": "HookedTransformer", "hook_layer": 5, "hook_head_index": None,
            "model_from_pretrained_kwargs": {}, "prepend_bos": True,
            "exclude_special_tokens": False, "neuronpedia_id": None, "context_size": 128,
            "seqpos_slice": [None], "dataset_path": "monology/pile-uncopyrighted",
            "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1"}
    return {**meta, **overrides}


def _weights(architecture):
    w = {"W_enc": RNG.normal(0, 0.3, (D, N)), "W_dec": RNG.normal(0, 0.3, (N, D)),
         "b_dec": RNG.normal(0, 0.5, D)}
    if architecture == "gated":
        w.update(b_gate=RNG.normal(-0.3, 0.3, N), r_mag=RNG.normal(0, 0.3, N),
                 b_mag=RNG.normal(0, 0.3, N))
    else:
        w["b_enc"] = RNG.normal(-0.3, 0.3, N)
    if architecture == "jumprelu":
        w["threshold"] = RNG.uniform(0.0, 0.6, N)
        w["threshold"][:3] = [0.0, -0.1, 0.0]  # zero and negative thresholds act as ReLU
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


HANDWRITTEN = {
    # Gemma Scope style: JumpReLU read on x without subtracting b_dec.
    "jumprelu_gemma_scope": ("jumprelu", {
        "architecture": "jumprelu", "d_in": D, "d_sae": N, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": _meta()}),
    # SAELens 6 TopK trained with rescale_acts_by_decoder_norm.
    "topk_rescaled": ("topk", {
        "architecture": "topk", "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "k": 6, "rescale_acts_by_decoder_norm": True,
        "metadata": _meta()}),
    # Before SAELens 6: a flat config, hook_point names, TopK through activation_fn_kwargs.
    "topk_pre_6": ("topk", {
        "architecture": "topk", "d_in": D, "d_sae": N, "dtype": "torch.float32",
        "device": "cuda", "model_name": "gpt2-small",
        "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
        "hook_point_head_index": None, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "context_size": 128, "prepend_bos": True,
        "normalize_activations": "none", "sae_lens_training_version": "3.13.0"}),
    "standard_pre_6": ("standard", {
        "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "model_name": "gpt2",
        "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
        "hook_point_head_index": None, "activation_fn_str": "relu",
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "context_size": 128, "normalize_activations": False}),
    # Metadata under "meta", as saejax's exports before SAELens' own key was used.
    "gated_no_b_dec_in": ("gated", {
        "architecture": "gated", "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none", "meta": _meta()}),
}


@pytest.mark.parametrize("case", sorted(HANDWRITTEN))
def test_handwritten_saelens_directory_imports_and_reconstructs_as_the_formula(case, tmp_path):
    architecture, cfg = HANDWRITTEN[case]
    w = _weights(architecture)
    _write(str(tmp_path / case), cfg, w)
    params, metadata = saelens.import_saelens(str(tmp_path / case))
    assert metadata["d"] == D and metadata["n_latents"] == N
    assert metadata["hook"] == _flat(cfg).get("hook_name", _flat(cfg).get("hook_point"))
    if "k" in cfg or "activation_fn_kwargs" in cfg:
        assert metadata["k"] == (cfg.get("k") or cfg["activation_fn_kwargs"]["k"])
    imported = loading.load_sae(str(tmp_path / case))
    assert imported.kind == "saelens" and set(imported.params) == set(params)
    assert set(params) == set(imported.architecture.param_axes)

    x = _activations()
    expected = saelens_encode(cfg, w, x)
    assert 0 < np.mean(expected > 0) < 0.9, "a degenerate test SAE"
    latents = np.asarray(imported.encode(x))
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(imported.reconstruct(x), saelens_decode(cfg, w, expected),
                               rtol=1e-5, atol=1e-4)


def test_saelens_inputs_that_cannot_be_read_are_refused(tmp_path):
    base = dict(HANDWRITTEN["jumprelu_gemma_scope"][1])
    w = _weights("jumprelu")

    def attempt(name, cfg=None, tensors=None, **kwargs):
        _write(str(tmp_path / name), cfg or base, tensors or w)
        return saelens.import_saelens(str(tmp_path / name), **kwargs)

    with pytest.raises(AnalysisError, match=r"normalize_activations='layer_norm' normalises"):
        attempt("ln", {**base, "normalize_activations": "layer_norm"})
    with pytest.raises(AnalysisError, match=r"pass norm_scaling_factor="):
        attempt("avg", {**base, "normalize_activations": "expected_average_only_in"})
    _, metadata = attempt("avg2", {**base, "normalize_activations": "expected_average_only_in"},
                          norm_scaling_factor=2.5)
    assert metadata["input_scale"] == 2.5
    with pytest.raises(AnalysisError, match=r"tensor 'threshold' is missing"):
        attempt("nothr", tensors={k: v for k, v in w.items() if k != "threshold"})
    with pytest.raises(AnalysisError, match=r"W_enc has shape \(16, 48\), but cfg.json's "
                                            r"d_in=16, d_sae=32 imply \(16, 32\)"):
        attempt("shape", {**base, "d_sae": 32})
    with pytest.raises(AnalysisError, match=r"reshape_activations='hook_z'"):
        attempt("hookz", {**base, "reshape_activations": "hook_z"})
    with pytest.raises(AnalysisError, match=r"architecture='matryoshka_batchtopk' has no saejax"):
        attempt("arch", {**base, "architecture": "matryoshka_batchtopk"})
    os.remove(tmp_path / "arch" / "sae_weights.safetensors")
    with pytest.raises(AnalysisError, match=r"sae_weights.safetensors is missing"):
        saelens.import_saelens(str(tmp_path / "arch"))


def test_a_transcoder_saelens_has_no_class_for_is_refused_naming_what_it_has(tmp_path):
    transcoder = shapes.Transcoder("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    refused = sorted(set(saelens.exportable()) - set(saelens.exportable(transcoder)))
    assert refused and saelens.exportable(transcoder)  # SAELens has some transcoders, not all
    for name in refused:
        config = loading.sae_config_for(name, k=5, **transcoder.config_fields())
        architecture = sae.from_config(config)
        params = jax.tree.map(np.asarray, architecture.init(jax.random.PRNGKey(0), D, N, config))
        loaded = LoadedSAE(params=params, input_scale=1.0, architecture=architecture,
                           sae_config=config, source="/runs/x", kind="saejax")
        with pytest.raises(AnalysisError, match=(
                rf"a '{name}' SAE with sae.shape='transcoder' has no SAELens counterpart: "
                r"SAELens has no transcoder for its '\w+' SAE; its transcoders are "
                r"'transcoder' \(from 'standard'\).*saejax exports "
                + re.escape(str(saelens.exportable(transcoder))) + " with sae.shape='transcoder'")):
            saelens.export_saelens(loaded, str(tmp_path / name))
