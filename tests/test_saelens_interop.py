"""SAELens interop checked against `sae_lens` itself, in the SAELens environment of
benchmarks/setup_saelens.sh (`SAEJAX_SAELENS_PYTHON`, else benchmarks/.venv-saelens/bin/python):
tests/saelens_peer.py runs there once, in one subprocess (one for all pytest-xdist workers),
without saejax; arrays cross as .npy files, SAEs as SAELens directories.

- Export: every registered architecture with a SAELens form, as an SAE and as a transcoder
  (with and without its skip connection), trained-like (biases, thresholds, gains away from
  their init; an input scale to fold) -> `SAE.load_from_disk` -> SAELens' `encode` and
  `forward` on raw activations equal saejax's.
- Import: every SAELens architecture saejax reads, built by SAELens with random tensors and
  saved by its own save function -> saejax's encode and reconstruction equal SAELens' own.

Missing, the environment skips these tests locally and fails them in CI (CI=true), where .ci/run
creates it.
"""

import fcntl
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from saejax import sae
from saejax.analysis import loading, saelens
from saejax.analysis.loading import LoadedSAE
from saejax.sae import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "tests", "saelens_peer.py")
D_IN, D_OUT, N, K = 16, 12, 48, 5
HOOK = "blocks.3.hook_resid_post"
TRANSCODER_HOOKS = ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
SHAPES = {"sae": shapes.SINGLE_HOOK,
          "transcoder": shapes.Transcoder(*TRANSCODER_HOOKS),
          "skip_transcoder": shapes.Transcoder(*TRANSCODER_HOOKS, skip_connection=True)}
ATOL = 1e-5
# Matryoshka BatchTopK (sae.matryoshka_widths) exports as SAELens saves its own
# MatryoshkaBatchTopKTrainingSAE for inference: a JumpReLU SAE with the learned threshold.
MATRYOSHKA = ("batchtopk-matryoshka", "batchtopk", "sae")
MATRYOSHKA_WIDTHS = (12,)


def saelens_python() -> str:
    """The SAELens environment's interpreter; skipped locally, failed in CI, when missing."""
    python = (os.environ.get("SAEJAX_SAELENS_PYTHON")
              or os.path.join(ROOT, "benchmarks", ".venv-saelens", "bin", "python"))
    if not os.path.isfile(python):
        why = (f"no SAELens environment at {python}; create one with `bash "
               "benchmarks/setup_saelens.sh [VENV]` and set "
               "SAEJAX_SAELENS_PYTHON=VENV/bin/python")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return python


def _cases():
    """(case, architecture, shape) for every registered architecture SAELens has a counterpart
    of in that shape (`saelens.exportable`)."""
    return [(f"{name}-{shape_name}", name, shape_name)
            for shape_name, shape in SHAPES.items()
            for name in saelens.exportable(shape)] + [MATRYOSHKA]


def _sae_config(name: str, shape, **fields):
    return loading.sae_config_for(name, k=K, **shape.config_fields(), **fields)


def _trained_like(name: str, shape, rng, **fields) -> LoadedSAE:
    """An SAE of architecture `name` in `shape` with every parameter away from its init:
    decoder rows of different norms, a skip matrix, each per-latent param shifted by a normal
    draw as wide as its magnitude (a log-threshold of log(1e-3) spans thresholds from ~0 to
    several times the pre-activations' scale), a scalar moved up into that scale."""
    config = _sae_config(name, shape, **fields)
    architecture = sae.from_config(config)
    d = D_IN if shape is shapes.SINGLE_HOOK else {shape.input_hook: D_IN,
                                                  shape.target_hook: D_OUT}
    params = {k: np.array(v, np.float32) for k, v in architecture.init(
        jax.random.PRNGKey(1), d, N, config).items()}
    for key, value in params.items():
        if key == "W_dec":
            value *= rng.uniform(0.5, 1.5, (N, 1)).astype(np.float32)
        elif value.ndim == 2 and not value.any():  # the skip starts at zero
            params[key] = rng.normal(0, 0.3 / np.sqrt(value.shape[0]), value.shape)
        elif value.ndim == 1:
            params[key] = value + rng.normal(0, 1, value.shape) * (np.abs(value) + 0.3)
        elif value.ndim == 0:  # a shared threshold: into the pre-activations' range
            params[key] = value + rng.uniform(0.2, 0.8) * (np.abs(value) + 1)
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    return LoadedSAE(params=params, input_scale=0.37, architecture=architecture,
                     sae_config=config, source="/runs/x", kind="saejax", step=7, hook=HOOK,
                     lm_checkpoint="/models/gpt2", context_length=128)


def _inner_shape(loaded: LoadedSAE):
    """The shape a Matryoshka SAE's prefixes wrap; any other SAE's own."""
    return getattr(loaded.architecture.shape, "inner", loaded.architecture.shape)


def _init_params(loaded: LoadedSAE) -> dict:
    shape = _inner_shape(loaded)
    d = loaded.d if shape is shapes.SINGLE_HOOK else {shape.input_hook: loaded.d,
                                                      shape.target_hook: D_OUT}
    return loaded.architecture.init(jax.random.PRNGKey(1), d, N, loaded.sae_config)


def _build_cfg(saelens_architecture: str) -> dict:
    """A SAELens config of `saelens_architecture` for SAELens to build; fields its class does
    not have are dropped by SAELens (filter_valid_dataclass_fields)."""
    shape, _ = shapes.from_saelens(saelens_architecture, {})
    transcoder = shape is not shapes.SINGLE_HOOK
    metadata = {"hook_name": TRANSCODER_HOOKS[0] if transcoder else HOOK,
                "sae_lens_version": "6.0.0"}
    if transcoder:
        metadata["hook_name_out"] = TRANSCODER_HOOKS[1]
    return {"architecture": saelens_architecture, "d_in": D_IN, "d_sae": N, "k": K,
            "d_out": D_OUT, "dtype": "float32", "device": "cpu",
            # SAEs read x - b_dec by default; Gemma Scope's leave it out (folded on import).
            "apply_b_dec_to_input": False,
            "rescale_acts_by_decoder_norm": True, "metadata": metadata}


def _shared_dir(tmp_path_factory):
    """A folder every pytest-xdist worker of this session shares (the session's own without
    xdist), so that the peer runs once however the tests are spread."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Runs tests/saelens_peer.py once (the first worker to get here; the others wait and read
    its outputs) and returns what each side needs."""
    python = saelens_python()
    rng = np.random.default_rng(0)
    x = (rng.normal(0.3, 1.0, (64, D_IN))).astype(np.float32)
    exported = {case: _trained_like(name, SHAPES[shape_name], rng, **(
                    {"matryoshka_widths": MATRYOSHKA_WIDTHS} if case == MATRYOSHKA[0] else {}))
                for case, name, shape_name in _cases()}
    work = _shared_dir(tmp_path_factory) / "saelens-peer"
    load_cases = [{"name": case, "dir": str(work / "export" / case), "x": str(work / "x.npy"),
                   "out": str(work / f"load-{case}")} for case in exported]
    build_cases = [{"name": name, "cfg": _build_cfg(name), "dir": str(work / "build" / name),
                    "x": str(work / "x.npy"), "out": str(work / f"build-{name}")}
                   for name in saelens.importable()]
    with open(str(work) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (work / "done.json").exists():
            work.mkdir(parents=True, exist_ok=True)
            np.save(work / "x.npy", x)
            for case in load_cases:
                saelens.export_saelens(exported[case["name"]], case["dir"])
            with open(work / "request.json", "w") as f:
                json.dump({"load": load_cases, "build": build_cases}, f)
            result = subprocess.run([python, PEER, str(work / "request.json")],
                                    capture_output=True, text=True, timeout=300, check=False,
                                    cwd=str(work))
            assert result.returncode == 0, result.stderr[-4000:]
            (work / "done.json").write_text(result.stdout.strip().splitlines()[-1])
    done = json.loads((work / "done.json").read_text())
    assert set(done["loaded"]) == set(exported) and set(done["built"]) == set(
        saelens.importable()), done

    def outputs(prefix):
        return (np.load(prefix + ".latents.npy"), np.load(prefix + ".reconstruction.npy"))

    return {"x": x, "exported": exported, "done": done,
            "loaded": {c["name"]: outputs(c["out"]) for c in load_cases},
            "built": {c["name"]: (c["dir"], *outputs(c["out"])) for c in build_cases}}


def test_every_form_is_covered():
    """What is exported covers SAE and transcoder forms, and each is compared below."""
    assert {shape for _, _, shape in _cases()} == set(SHAPES), _cases()
    assert {shapes.from_saelens(n, {})[0].name for n in saelens.importable()} == {
        "single_hook", "transcoder"}


@pytest.mark.parametrize("case", [case for case, _, _ in _cases()])
def test_saelens_loads_the_export_and_encodes_and_decodes_as_saejax(peer, case):
    loaded, x = peer["exported"][case], peer["x"]
    theirs_latents, theirs_reconstruction = peer["loaded"][case]
    # SAELens read a transcoder as one of its transcoder classes (sae_lens/saes/transcoder.py).
    transcoder = _inner_shape(loaded) is not shapes.SINGLE_HOOK
    assert peer["done"]["loaded"][case].endswith("Transcoder") == transcoder, peer["done"]
    latents = np.asarray(loaded.encode(x))
    assert 0.02 < np.mean(latents > 0) < 0.9, "a degenerate test SAE"
    np.testing.assert_allclose(theirs_latents, latents, rtol=1e-5, atol=ATOL)
    reconstruction = np.asarray(loaded.reconstruct(x))
    assert reconstruction.shape == theirs_reconstruction.shape
    np.testing.assert_allclose(theirs_reconstruction, reconstruction, rtol=1e-5, atol=1e-4)
    # Each param of the mechanism matters: at its init value the latents would differ, so
    # the agreement above checks its conversion too.
    init = _init_params(loaded)
    for name in set(loaded.architecture.param_axes) - set(loaded.architecture.shape.param_axes):
        reset = loaded._replace(params={**loaded.params, name: np.asarray(init[name])})
        assert not np.allclose(np.asarray(reset.encode(x)), latents, atol=ATOL), name


@pytest.mark.parametrize("name", saelens.importable())
def test_saejax_imports_what_saelens_saved_and_matches_its_outputs(peer, name):
    directory, theirs_latents, theirs_reconstruction = peer["built"][name]
    x = peer["x"]
    imported = loading.load_sae(directory)
    assert imported.kind == "saelens"
    latents = np.asarray(imported.encode(x))
    assert 0.02 < np.mean(theirs_latents > 0) < 0.9, "a degenerate test SAE"
    np.testing.assert_allclose(latents, theirs_latents, rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(np.asarray(imported.reconstruct(x)), theirs_reconstruction,
                               rtol=1e-5, atol=1e-4)
