"""Checks a config before anything is built: a config that cannot work fails at start with a
message that names the field and what would fix it."""

from __future__ import annotations

import os

import jax

from saejax import data, groups, paths, sae, sharding, tracking
from saejax.data import hierarchy, lockstep
from saejax.evals import downstream
from saejax.errors import ConfigError

DECAYS = ("linear", "cosine", "none")
B_DEC_INITS = ("zeros", "geometric_median", "mean")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def n_latents(config) -> int:
    return int(config.sae.expansion_factor) * int(config.data.d)


def validate(config, n_devices: int) -> None:
    """Raises ConfigError naming the first field that cannot work with `n_devices` devices."""
    architecture = sae.from_config(config.sae)  # ConfigError for an unknown name or shape
    _require(config.data.source in data.SOURCES,
             f"data.source={config.data.source!r} is not known; choose one of "
             f"{sorted(data.SOURCES)}.")
    _check_shape(config, architecture)
    _check_counts(config)
    _check_choices(config)
    _check_group(config, architecture)
    n = n_latents(config)
    _check_architecture(config, architecture, n)
    _require(config.train.compute_dtype in COMPUTE_DTYPES,
             f"train.compute_dtype={config.train.compute_dtype!r} is not supported; choose one "
             f"of {', '.join(COMPUTE_DTYPES)}.")
    _check_data_paths(config)
    if config.data.source in data.SYNTHETIC_SOURCES:
        _require(0 < config.data.features_per_sample <= config.data.n_features,
                 f"data.features_per_sample={config.data.features_per_sample} must be in "
                 f"(0, data.n_features={config.data.n_features}].")
    if config.data.source == "synthetic_hierarchy":
        hierarchy.validate(config.data)
    _check_mesh(config, n_devices, n)
    tracking.validate(config)


# Fields that count something (steps, tokens, rows) and must be positive, or may be zero.
POSITIVE = ("data.d", "sae.expansion_factor", "train.batch_size", "train.steps",
            "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
            "train.preemption_check_every", "evals.eval_batches", "evals.dead_window_tokens",
            "resample.batches", "data.init_batches", "evals.density_window_tokens",
            "resample.rewarm_steps", "data.shuffle_buffer_chunks", "lm.context_length",
            "lm.batch_sequences", "data.n_layers")
NON_NEGATIVE = ("optim.warmup_steps", "optim.sparsity_warmup_steps", "optim.grad_clip_norm",
                "resample.every_steps", "resample.until_step", "resample.encoder_scale",
                "data.eval_tokens", "data.prefetch_windows", "evals.loss_recovered_sequences")


def _field(config, dotted: str):
    section, name = dotted.split(".")
    return config[section][name]


def _check_counts(config) -> None:
    for field in POSITIVE:
        value = _field(config, field)
        _require(int(value) == value and value > 0,
                 f"{field}={value!r} must be a positive integer.")
    for field in NON_NEGATIVE:
        value = _field(config, field)
        _require(value >= 0, f"{field}={value!r} is negative; it must be >= 0.")


def _check_choices(config) -> None:
    """The optimiser's and the resampling's settings, and the sharding rules."""
    _require(config.optim.learning_rate > 0,
             f"optim.learning_rate={config.optim.learning_rate!r} must be > 0.")
    _require(0 <= config.optim.decay_fraction <= 1,
             f"optim.decay_fraction={config.optim.decay_fraction!r} must be in [0, 1].")
    _require(config.sae.b_dec_init in B_DEC_INITS,
             f"sae.b_dec_init={config.sae.b_dec_init!r} is not known; choose one of "
             f"{B_DEC_INITS}.")
    _require(config.optim.decay in DECAYS,
             f"optim.decay={config.optim.decay!r} is not known; choose one of {DECAYS}.")
    if config.resample.every_steps > 0:
        _require(config.resample.until_step >= config.resample.every_steps,
                 f"resample.every_steps={config.resample.every_steps} with "
                 f"resample.until_step={config.resample.until_step} never resamples; set "
                 f"resample.until_step to the last step that may resample.")
    rules = dict(map(tuple, config.sharding_rules))
    _require(rules.get("batch") in (None, "data") and rules.get("latent") in (None, "model")
             and rules.get("layer") in (None, "model", "layer"),
             f"sharding_rules={config.sharding_rules}: `batch` may map to `data` (or None), "
             f"`latent` to `model` (or None) and `layer` to `layer` or `model` (or None); "
             f"other mesh axes do not exist.")
    _require(rules.get("layer") is None or rules.get("layer") != rules.get("latent"),
             f"sharding_rules={config.sharding_rules} map `layer` and `latent` both to "
             f"{rules.get('layer')!r}; one array cannot split two axes over one mesh axis: map "
             f"`latent` to None, or `layer` to `layer` with mesh.layer > 1.")
    has_layer_axis = sharding.mesh_layer(config.mesh) > 1
    _require((rules.get("layer") == "layer") == has_layer_axis,
             f"sharding_rules map `layer` to {rules.get('layer')!r} with "
             f"mesh.layer={config.mesh.get('layer', 1)}: the rule ('layer', 'layer') and "
             f"mesh.layer > 1 go together (the mesh has a `layer` axis only then); set both or "
             f"neither.")


def _check_group(config, architecture: sae.Architecture) -> None:
    _require(config.group.vectorize in ("auto", "vmap", "map"),
             f"group.vectorize={config.group.vectorize!r} must be 'auto', 'vmap' or 'map'.")
    group = groups.members(config)
    if not group.grouped:
        return
    _check_hook_group(config, group.hooks)
    workdirs = tuple(config.group.member_workdirs)
    _require(not workdirs or (len(workdirs) == group.size
                              and len(set(workdirs)) == len(workdirs)),
             f"group.member_workdirs has {len(workdirs)} folders for {group.size} members "
             f"({max(len(group.hooks), 1)} group.hooks x {max(len(group.coefficients), 1)} "
             f"group.sparsity_coefficients); give one distinct folder per member, or none "
             f"for <workdir>/members/<name>/.")
    coefficients = group.coefficients
    if not coefficients:
        return
    groupable = [a.name for a in sae.ARCHITECTURES.values() if a.sparsity_coefficient]
    _require(architecture.sparsity_coefficient is not None,
             f"group.sparsity_coefficients={coefficients} needs an architecture with a "
             f"sparsity coefficient; sae.architecture={architecture.name!r} has none. Use "
             f"one of {', '.join(groupable)}, or an empty group.")
    names = {f"{c:g}" for c in coefficients}
    _require(all(c >= 0 for c in coefficients) and len(names) == len(coefficients),
             f"group.sparsity_coefficients={coefficients} must be >= 0 and distinct to 6 "
             f"significant digits (they name the members' folders).")


def _check_hook_group(config, hooks: tuple[str, ...]) -> None:
    """A hook group's hooks are distinct hooks of the batches of an LM or of stores, and each
    member is an SAE of one hook."""
    if not hooks:
        return
    _require(len(set(hooks)) == len(hooks),
             f"group.hooks={config.group.hooks!r} names a hook twice; name each once.")
    _require(config.data.source in ("lm", "store"),
             f"group.hooks={config.group.hooks!r} trains an SAE per hook of an LM's or a "
             f"harvest's activations; data.source={config.data.source!r} is neither: use "
             f"data.source='lm' with lm.hook naming the hooks, or 'store' with data.path "
             f"naming their stores.")
    _require(config.sae.shape == "single_hook",
             f"group.hooks={config.group.hooks!r} trains one single-hook SAE per hook; "
             f"sae.shape={config.sae.shape!r} reads several hooks at once: set "
             f"sae.shape='single_hook', or leave group.hooks empty.")
    given = data.batch_hooks(config) or ()
    where = "lm.hook" if config.data.source == "lm" else "data.path"
    missing = [hook for hook in hooks if hook not in given]
    _require(not missing,
             f"group.hooks={config.group.hooks!r}: {missing} are not hooks of the batches "
             f"(their hooks: {list(given) or 'one'}); name every hook in {where}, "
             f"comma-separated (one forward pass or one read gives them all).")


def _check_mesh(config, n_devices: int, n: int) -> None:
    """The dictionary divides over the model axis and the batch over the data axis."""
    n_data, n_model = sharding.mesh_shape(config.mesh, n_devices)
    _require(n % n_model == 0,
             f"n_latents={n} (sae.expansion_factor={config.sae.expansion_factor} x "
             f"data.d={config.data.d}) is not divisible by mesh.model={n_model}: the dictionary "
             f"is split evenly across the model axis. Choose mesh.model among the divisors of "
             f"{n} or change sae.expansion_factor.")
    _check_split_params(config, n_devices)
    _require(int(config.train.batch_size) % n_data == 0,
             f"train.batch_size={config.train.batch_size} is not divisible by mesh.data="
             f"{n_data}: the batch is split evenly across the data axis. Use a multiple of "
             f"{n_data} or change mesh.data.")


def _check_split_params(config, n_devices: int) -> None:
    """Every param dimension the rules split divides over its mesh axis (a CLT's layers over
    the axis `layer` maps to)."""
    rules = dict(map(tuple, sharding.full_rules(config.sharding_rules)))
    if rules.get("layer") is None:  # the other split axes have their own checks
        return
    n_data, n_model = sharding.mesh_shape(config.mesh, n_devices)
    sizes = {"data": n_data, "model": n_model, "layer": sharding.mesh_layer(config.mesh)}
    architecture = sae.from_config(config.sae)
    hooks = data.batch_hooks(config) or (data.hook_name(config),)
    d = {hook: int(config.data.d) for hook in hooks}
    abstract = jax.eval_shape(lambda key: architecture.init(key, d, n_latents(config),
                                                            config.sae), jax.random.PRNGKey(0))
    for name, value in abstract.items():
        for axis, size in zip(architecture.param_axes.get(name, ()), value.shape):
            mesh_axis = rules.get(axis)
            if mesh_axis is None or axis == "latent" or size % sizes[mesh_axis] == 0:
                continue
            divisors = [m for m in range(1, size + 1) if size % m == 0]
            field = "layer" if mesh_axis == "layer" else mesh_axis
            _require(False, f"{name}'s `{axis}` axis has {size} entries (sae.layers: the CLT's "
                     f"layers), which do not split over mesh.{field}={sizes[mesh_axis]}; set "
                     f"mesh.{field} to one of {divisors} (it must divide {size})."
                     if axis == "layer" else
                     f"{name}'s `{axis}` axis ({size}) does not split over "
                     f"mesh.{field}={sizes[mesh_axis]}; choose one of {divisors}.")


def _check_architecture(config, architecture: sae.Architecture, n: int) -> None:
    """The architecture's own checks, and no field of another one set: it would be ignored."""
    for field, spec in sae.config_fields().items():
        if (spec.exclusive and field not in architecture.config_fields
                and config.sae[field] != spec.default):
            _require(False, f"sae.{field}={config.sae[field]!r} is read by "
                     f"{', '.join(sae.owners(field))} ({spec.doc}); "
                     f"sae.architecture={architecture.name!r} has none: set it to "
                     f"{spec.default!r}.")
    architecture.validate(config, n)


def _check_shape(config, architecture: sae.Architecture) -> None:
    """The data's batches hold what the shape reads and reconstructs."""
    hooks = data.batch_hooks(config)
    if config.sae.shape == "single_hook":
        _require(hooks is None or bool(groups.group_hooks(config)),
                 f"data.source={config.data.source!r} (data.path={config.data.path!r}) gives "
                 f"the hooks {list(hooks or ())}; a single-hook SAE reads one: set sae.shape "
                 f"to one that reads several (sae.shape='transcoder' with sae.input_hook and "
                 f"sae.target_hook among them), train an SAE at each (group.hooks naming "
                 f"them), or name one store in data.path.")
        return
    _require(hooks is not None,
             f"sae.shape={architecture.shape.name!r} reads several hooks; "
             f"data.source={config.data.source!r} gives one: name the stores of one harvest "
             f"in data.path, comma-separated (data.source='store'), or use "
             f"data.source='synthetic_transcoder'.")
    architecture.shape.entries({hook: int(config.data.d) for hook in hooks})
    if config.evals.loss_recovered_sequences:  # ConfigError where the shape cannot be spliced
        downstream.lm_hook(architecture.shape, str(config.lm.hook))


def _check_data_paths(config) -> None:
    """The files a source or the loss-recovered evaluation reads exist; their contents (width,
    dtype, chunks) are checked when they are opened."""
    source = config.data.source
    if source in ("store", "npy"):
        what = ("an activation store directory written by `python -m saejax.harvest`"
                if source == "store" else "a .npy file of activations [tokens, d]")
        _require(bool(config.data.path),
                 f"data.source={source!r} needs data.path: set --config.data.path to {what}.")
        several = lockstep.split_paths(config.data.path) if source == "store" else []
        if len(several) > 1:
            for path in several:
                _require(paths.exists(path),
                         f"data.path={config.data.path!r}: {path!r} does not exist; each of "
                         f"the comma-separated paths should be {what}.")
        else:
            _require(paths.exists(config.data.path),
                     f"data.path={config.data.path!r} does not exist; it should be {what}.")
    needs_lm = [reason for reason, needed in (
        ("data.source='lm'", source == "lm"),
        (f"evals.loss_recovered_sequences={config.evals.loss_recovered_sequences}",
         config.evals.loss_recovered_sequences > 0)) if needed]
    for reason in needs_lm:
        for field, what in (("lm.checkpoint", "a local Hugging Face format GPT-2 directory "
                             "(config.json + model.safetensors)"),
                            ("lm.tokens", "a .npy of token ids or a .txt file")):
            value = config.lm[field.split(".")[1]]
            _require(bool(value), f"{reason} needs {field}: set --config.{field} to {what}"
                     + ("." if "loss_recovered" not in reason else
                        ", or set --config.evals.loss_recovered_sequences=0."))
            _require(os.path.exists(value), f"{field}={value!r} does not exist; it should be "
                     f"{what}.")
