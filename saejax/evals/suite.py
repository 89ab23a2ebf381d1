"""The evaluation registry: named evaluations of a trained run, each `fn(context) -> result`,
that `python -m saejax.evals` runs on a workdir or on every point of a sweep.

Registering one (a module under saejax/evals that `EVAL_MODULES` names, so the CLI finds it):

    from saejax.evals import suite

    @suite.register("core", needs=(), description="SAEBench core: ...")
    def core(context: suite.Context) -> dict:
        batch = context.eval_batches()[0]
        r = context.forward(batch)          # x, target, latents, x_hat (raw units, NumPy)
        return {"eval_config": {...},
                "eval_result_metrics": {"reconstruction_quality": {"mse": ...}, ...}}

A result is SAEBench's eval output less its bookkeeping: `eval_result_metrics` (required,
`{category: {metric: number}}`, SAEBench's categories and names where SAEBench has the eval),
and optionally `eval_config`, `eval_result_details` (a list of dicts) and
`eval_result_unstructured`. `run` adds `eval_type_id` (the name), `eval_id`, the time, the
SAE's config and provenance (`sae_bench_layout`) and writes it to
`WORKDIR/analysis/evals/<name>.json`; `results.eval_metrics` reads them back as the
`eval:<name>/<metric>` columns of the sweep's table. `needs` names what the eval cannot run
without: "lm" (the run's language model and its held-out text), "ground_truth" (a synthetic
source's true features) or "texts" (the labelled plays of `Context.texts_folder`); an eval
whose needs a run lacks is skipped with the reason, not failed.

The `Context` builds each piece on first use and shares it among the evals of one run:
`workdir`, `options` (the CLI's `--eval_batches`, `--sequences`, ...), `config` (the run's
resolved config), `loaded` (`analysis.loaded.LoadedSAE`: params, input scale, architecture),
`texts_folder` (the labelled plays), `mesh`, `source` (the run's data source: `eval_batch(i)`, and `true_features` / `eval_codes`
when synthetic), `eval_batches()`, `forward(batch)`, `lm` and `held_out_tokens()`, and `cache`
(a dict for evals that share a computation).
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import time
import uuid
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saejax import configs, data, paths, sae, sharding
from saejax.results import EVALS_DIR
from saejax.analysis import loaded as loaded_lib
from saejax.workdir import flatten_config, write_json

# Modules that register evaluations when imported; the CLI imports them all.
EVAL_MODULES = ("saejax.evals.core", "saejax.evals.ground_truth", "saejax.evals.probing_suite")
NEEDS = ("lm", "ground_truth", "texts")


class Eval(NamedTuple):
    name: str
    fn: Callable[["Context"], dict]
    needs: tuple[str, ...]
    description: str
    by_default: bool = True   # run when no names are given (False: it trains, named only)


REGISTRY: dict[str, Eval] = {}


def register(name: str, *, needs: tuple[str, ...] = (), description: str = "",
             by_default: bool = True):
    """Decorator: registers `fn(context) -> result` as evaluation `name` (`by_default`:
    whether `run` without names runs it; an eval that trains something is named to run)."""
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"register({name!r}, needs={needs}): unknown {unknown}; one of {NEEDS}.")

    def add(fn):
        REGISTRY[name] = Eval(name, fn, tuple(needs), description or (fn.__doc__ or "").strip(),
                              by_default)
        return fn
    return add


def load_registry() -> dict[str, Eval]:
    for module in EVAL_MODULES:
        importlib.import_module(module)
    return REGISTRY


class Reconstruction(NamedTuple):
    """One batch through the dictionary, in raw activation units (NumPy, float32): the input
    it reads `x [n, d_in]`, the target it reconstructs `[n, d_out]` (x itself for an SAE),
    its latents `[n, n_latents]` (as it encodes for inference) and reconstruction `x_hat`."""

    x: np.ndarray
    target: np.ndarray
    latents: np.ndarray
    x_hat: np.ndarray


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's resolved config: `configs.base_config()` with config.json's values (a field
    the schema no longer has is ignored: nothing reads it)."""
    config = configs.base_config()
    known = flatten_config(config.to_dict())
    for key, value in flatten_config(loaded_lib.read_run_config(workdir)).items():
        if key in known:
            section, _, leaf = key.rpartition(".")
            parent = functools.reduce(lambda c, k: c[k], section.split(".") if section else (),
                                      config)
            parent[leaf] = value
    return config


class Context:
    """What an evaluation reads of one run; every piece is built on first use."""

    def __init__(self, workdir: str, options: dict | None = None):
        self.workdir = workdir
        self.options = {"eval_batches": 8, "sequences": 32, **(options or {})}
        self.cache: dict[str, Any] = {}

    @functools.cached_property
    def config(self) -> ml_collections.ConfigDict:
        return run_config(self.workdir)

    @functools.cached_property
    def loaded(self) -> loaded_lib.LoadedSAE:
        return loaded_lib.load_run(self.workdir)

    @property
    def architecture(self):
        return self.loaded.architecture

    @functools.cached_property
    def mesh(self):
        """One device: evaluation batches are small, and any run's batch size divides it."""
        return sharding.make_mesh(self.config.mesh, devices=jax.devices()[:1])

    @functools.cached_property
    def source(self):
        with sharding.activate(self.mesh, self.config.sharding_rules):
            return data.make_source(self.config, mesh=self.mesh,
                                    rules=self.config.sharding_rules)

    @property
    def has_ground_truth(self) -> bool:
        return str(self.config.data.source).startswith("synthetic")

    @property
    def texts_folder(self) -> str:
        """The labelled plays the probing evals read: `options["texts"]`, else
        `$SAEJAX_ASSETS/shakespeare`."""
        return self.options.get("texts") or os.path.join(os.environ.get("SAEJAX_ASSETS", ""),
                                                         "shakespeare")

    @property
    def has_lm(self) -> bool:
        return bool(self.config.lm.checkpoint) and bool(self.config.lm.tokens)

    def eval_batches(self, n: int | None = None) -> list[dict[str, np.ndarray]]:
        """The first `n` (default `options["eval_batches"]`) held-out batches of the run's
        source, `{hook: [batch, d]}` in raw units."""
        n = int(self.options["eval_batches"] if n is None else n)
        key = f"eval_batches:{n}"
        if key not in self.cache:
            with sharding.activate(self.mesh, self.config.sharding_rules):
                self.cache[key] = [{h: np.asarray(v, np.float32) for h, v in
                                    data.as_batch(self.source.eval_batch(i)).items()}
                                   for i in range(n)]
        return self.cache[key]

    def forward(self, batch: dict) -> Reconstruction:
        """`batch` through the dictionary (`Reconstruction`, raw units)."""
        return Reconstruction(*(np.asarray(a) for a in self._forward(
            self.loaded.params, jnp.asarray(self.loaded.input_scale, jnp.float32),
            {h: jnp.asarray(v) for h, v in batch.items()})))

    @functools.cached_property
    def _forward(self):
        architecture, sae_config = self.architecture, self.loaded.sae_config

        @jax.jit
        def forward(params, scale, batch):
            shape = architecture.shape
            x = shape.input(sae.base.scale_batch(shape, batch, scale))
            latents = architecture.encode(params, x, sae_config)
            x_hat = architecture.decode(params, latents, x)
            # In raw units: the batch's own, and the reconstruction over its hooks' scales.
            return (shape.input(batch), shape.target(batch), latents,
                    x_hat / sae.base.column_scales(shape, scale, x_hat.shape[-1]))
        return forward

    @functools.cached_property
    def lm(self):
        """The run's language model (`data.lm.LanguageModel` at its spliced hook)."""
        from saejax.data import lm  # pylint: disable=import-outside-toplevel
        from saejax.evals import downstream  # pylint: disable=import-outside-toplevel
        lm_config = self.config.lm.copy_and_resolve_references()
        with lm_config.unlocked():
            lm_config.hook = downstream.lm_hook(self.architecture.shape,
                                                str(self.config.lm.hook))
        return lm.load(lm_config, d=None)

    def held_out_tokens(self, n: int | None = None) -> np.ndarray:
        """The last `n` (default `options["sequences"]`) token sequences of `lm.tokens`, which
        the run's training and harvest left out (`data.lm.split`)."""
        from saejax.data import lm  # pylint: disable=import-outside-toplevel
        n = int(self.options["sequences"] if n is None else n)
        return lm.split(self.config.lm, self.lm, n)[1]


def missing_needs(entry: Eval, context: Context) -> list[str]:
    """Why `entry` cannot run on `context`'s run (empty: it can)."""
    reasons = []
    if "lm" in entry.needs and not context.has_lm:
        reasons.append("the run names no language model (lm.checkpoint, lm.tokens)")
    if "ground_truth" in entry.needs and not context.has_ground_truth:
        reasons.append(f"data.source={context.config.data.source!r} has no true features")
    if "texts" in entry.needs and not os.path.isdir(context.texts_folder):
        reasons.append(f"no labelled plays at {context.texts_folder!r} (--texts, default "
                       "$SAEJAX_ASSETS/shakespeare)")
    return reasons


def sae_bench_layout(name: str, result: dict, context: Context, seconds: float) -> dict:
    """SAEBench's eval-output fields around an eval's result (`eval_result_metrics` etc.)."""
    loaded = context.loaded
    return {
        "eval_type_id": name,
        "eval_config": result.get("eval_config", {}),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": result["eval_result_metrics"],
        "eval_result_details": result.get("eval_result_details", []),
        "eval_result_unstructured": result.get("eval_result_unstructured"),
        "sae_bench_commit_hash": "saejax",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": {"architecture": loaded.architecture.name,
                         "shape": loaded.architecture.shape.name, "d_in": loaded.d,
                         "d_sae": loaded.n_latents, "hook_name": loaded.hook,
                         "model_name": loaded.lm_checkpoint, "workdir": context.workdir,
                         "step": loaded.step},
        "saejax": {"seconds": seconds,
                   "written": datetime.datetime.now(datetime.timezone.utc).isoformat()},
    }


def result_path(workdir: str, name: str) -> str:
    return paths.join(workdir, EVALS_DIR, f"{name}.json")


def run(workdir: str, names=None, options: dict | None = None, *, log=print) -> dict:
    """Runs the registered evals `names` (default every `by_default` one) on one run's workdir and writes each
    one's result (`sae_bench_layout`) to `result_path`; returns {name: written dict, or
    {"skipped": reason}}."""
    registry = load_registry()
    names = [n for n, e in registry.items() if e.by_default] if names is None else list(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise loaded_lib.AnalysisError(f"--evals names {unknown}; registered: {sorted(registry)}.")
    context = Context(workdir, options)
    out = {}
    for name in names:
        entry = registry[name]
        reasons = missing_needs(entry, context)
        if reasons:
            out[name] = {"skipped": "; ".join(reasons)}
            log(f"{workdir}: {name} skipped: {out[name]['skipped']}.")
            continue
        start = time.perf_counter()
        result = entry.fn(context)
        seconds = time.perf_counter() - start
        out[name] = sae_bench_layout(name, result, context, seconds)
        paths.makedirs(paths.join(workdir, EVALS_DIR))
        write_json(result_path(workdir, name), out[name])
        log(f"{workdir}: {name} in {seconds:.1f} s -> {result_path(workdir, name)}")
    return out
