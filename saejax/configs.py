"""The full config schema with its defaults: every field an experiment may set, in one place.

Experiment files under `experiments/` start from `base_config()` and override a few fields (as
Flax's examples derive configs from a default). The config is locked on the command line, so a
field that is not declared here is a misspelling, reported as an error.
"""

import copy

import ml_collections

from saejax import sae
from saejax.errors import ConfigError


# Renamed fields: {old name: new name}. The old name stays a field (an ml_collections
# FieldReference to the new one), and a workdir's config.json written before the rename
# resumes (workdir.config_changes reads the old name's value for the new one).
ALIASES = {"optim.l1_warmup_steps": "optim.sparsity_warmup_steps"}

# Fields whose default trains differently from the code before they existed: a workdir whose
# config.json lacks one ran as this value, and resumes with it (workdir.check_resumable) unless
# the user sets the field. The attention-sink exclusion was added on by default.
BEFORE_FIELD_EXISTED = {"lm.exclude_positions": (), "lm.exclude_token_ids": ""}


def _data_section(config: ml_collections.ConfigDict) -> None:
    """The config.data section."""
    # Where activations come from: "synthetic" (known ground truth, below), "store" (a
    # tensorstore activation store written by `python -m saejax.harvest`), "npy" (a NumPy array
    # [tokens, d] that the user brings) or "lm" (the LM section's model, run on the fly).
    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"
    config.data.d = 256                   # activation width; checked against store / LM
    config.data.seed = 0                  # synthetic ground truth; shuffling order otherwise
    config.data.normalize_inputs = False  # True: scale inputs to unit mean squared norm
    config.data.init_batches = 4          # batches for the input scale and b_dec_init
    # synthetic
    config.data.n_features = 512
    config.data.features_per_sample = 5.0
    config.data.frequency_decay = 0.99
    config.data.correlated = True
    config.data.n_layers = 3              # synthetic_crosscoder: hooks layer_0 ... layer_{n-1}
    # synthetic_hierarchy (saejax/data/hierarchy.py): parents, each with children that fire
    # only with it (one child, with this probability, when the parent fires); magnitudes
    # U[1 - spread, 1 + spread). data.features_per_sample sets the parents' probability.
    config.data.hierarchy_parents = 16
    config.data.hierarchy_children = 4
    config.data.hierarchy_child_probability = 0.5
    config.data.hierarchy_magnitude_spread = 0.0
    # Orthonormal feature directions (needs data.d >= the feature count) instead of random
    # unit ones, whose pairs in d = 64 reach cosines near 0.5 (saejax/data/hierarchy.py).
    config.data.hierarchy_orthogonal = False
    # store, npy
    config.data.path = ""                 # a store directory or a .npy file
    config.data.shuffle_buffer_chunks = 16  # chunks shuffled together (memory: chunks x rows x d)
    config.data.eval_tokens = 0           # held-out rows at the store's end; 0: eval_batches x batch
    config.data.prefetch_windows = 2      # shuffle windows read ahead in a background thread
    config.data.npy_chunk_rows = 4096     # npy: rows per shuffling chunk (a store keeps its own)
    config.data.allow_partial = False     # train on the committed rows of an unfinished store


def _lm_section(config: ml_collections.ConfigDict) -> None:
    """The config.lm section."""
    # The language model: a local Hugging Face format GPT-2 checkpoint directory (config.json +
    # model.safetensors), used by data.source="lm" and by the loss-recovered evaluation.
    config.lm = ml_collections.ConfigDict()
    config.lm.checkpoint = ""
    config.lm.hook = "blocks.8.hook_resid_post"
    # Token ids: a .npy of ids ([sequences, context] or flat), or text tokenised with the
    # checkpoint's tokenizer.json: a .txt (a document per line), a folder of .txt files (a
    # document per file) or a .jsonl ({"text": ...} per line).
    config.lm.tokens = ""
    config.lm.context_length = 128
    config.lm.batch_sequences = 32        # sequences per LM forward pass
    # Attention sinks, left out of the rows (data.source="lm"; harvest has the same flags): the
    # positions of each sequence, and the token ids ("special": the tokenizer's special tokens
    # and the model's BOS; "": none; or ids "0,1,2").
    config.lm.exclude_positions = (0,)
    config.lm.exclude_token_ids = "special"


def _sae_section(config: ml_collections.ConfigDict) -> None:
    """The config.sae section."""
    # The dictionary. The fields every architecture shares are here; each architecture
    # declares its own (saejax/sae/<name>.py, `config_fields`, with a comment each), and every
    # registered architecture's fields are added when the config is built, so that
    # --config.sae.k=32 is a field whatever sae.architecture is.
    config.sae = ml_collections.ConfigDict()
    config.sae.architecture = "relu"      # a name of saejax.sae.ARCHITECTURES
    config.sae.expansion_factor = 4       # n_latents = expansion_factor x data.d
    config.sae.b_dec_init = "zeros"       # or "geometric_median" (Towards Monosemanticity), "mean"
    # The dictionary's shape (saejax/sae/shapes.py): "single_hook" encodes and reconstructs the
    # batch's one entry; "transcoder" reads sae.input_hook and reconstructs sae.target_hook,
    # with a linear skip W_skip when sae.skip_connection (Paulo et al. 2025); "crosscoder"
    # reads and reconstructs every hook of sae.hooks (comma-separated; Lindsey et al. 2024).
    config.sae.shape = "single_hook"
    config.sae.input_hook = ""
    config.sae.target_hook = ""
    config.sae.skip_connection = False
    config.sae.hooks = ""
    # "clt" (cross-layer transcoder, saejax/sae/clt.py) reads sae.input_hook at each layer of
    # sae.layers ("0-3" or "0,1,2,3") and reconstructs sae.target_hook at that layer and every
    # later one; both are templates with {layer} (empty: the MLP's input and output).
    config.sae.layers = ""
    # Matryoshka (saejax/sae/matryoshka.py): nested prefixes of the latents, each reconstructing
    # the target, as latent counts (64, 256) or fractions of n_latents (0.0625, 0.25); the whole
    # dictionary is the last prefix. Empty: a plain dictionary.
    config.sae.matryoshka_widths = ()
    # The factor on each smaller prefix's loss: one number, or one per prefix below the whole
    # dictionary; empty means 1 each. Below 1 lets the whole dictionary's loss pull the first
    # latents back from their children's mean direction ("balance Matryoshka", Chanin et al.
    # 2025, "Feature Hedging"); experiments/matryoshka.py uses it.
    config.sae.matryoshka_weights = ()
    # The step from which those weights apply (each is 1 before it).
    config.sae.matryoshka_weights_from_step = 0
    # AuxK per prefix (TopK family only): the dead latents each prefix adds reconstruct that
    # prefix's residual (SAELens' use_matryoshka_aux_loss).
    config.sae.matryoshka_auxk = False
    for name, field in sae.config_fields().items():
        config.sae[name] = field.default


def _optim_section(config: ml_collections.ConfigDict) -> None:
    """The config.optim section."""
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 100
    config.optim.decay = "linear"
    config.optim.decay_fraction = 0.2
    # The sparsity coefficient (sae.l1_coefficient, sae.l0_coefficient, ...) ramps linearly
    # from 0 over this many steps. `l1_warmup_steps` is its old name, kept as an alias: the
    # same value, whichever is set.
    config.optim.sparsity_warmup_steps = 0
    config.optim.l1_warmup_steps = config.optim.get_ref("sparsity_warmup_steps")
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 0.0     # 0 = off


def _group_section(config: ml_collections.ConfigDict) -> None:
    """The config.group section."""
    # A group trains one SAE per sparsity coefficient in one vmapped step (same shape, same
    # batches): e.g. (0.3, 0.6, 1.2). Empty: a single SAE with sae.l1_coefficient.
    config.group = ml_collections.ConfigDict()
    config.group.sparsity_coefficients = ()
    # A hook group trains one SAE (one per coefficient, with sparsity_coefficients) at each of
    # these hooks (comma-separated), from batches holding every hook's rows of the same tokens:
    # lm.hook or data.path naming those hooks, one LM forward (or one read) for all. Empty: the
    # batch's one hook.
    config.group.hooks = ""
    # Each member's folder, in the order of the members (hook-major: each hook's coefficients;
    # a sweep puts them in its point folders); empty: <workdir>/members/<name>/, named as the
    # sweep names points (l1-0.3), after the hook in a hook group
    # (blocks.8.hook_resid_post_l1-0.3).
    config.group.member_workdirs = ()
    # "vmap" the members (batched matmuls), "map" them one after another inside the step, or
    # "auto": vmap on accelerators, map on CPU (a little faster there).
    config.group.vectorize = "auto"


def _resample_section(config: ml_collections.ConfigDict) -> None:
    """The config.resample section."""
    # Dead-latent resampling (Towards Monosemanticity); every_steps = 0 turns it off.
    config.resample = ml_collections.ConfigDict()
    config.resample.every_steps = 0
    config.resample.until_step = 0        # last step that may resample
    config.resample.batches = 4           # batches whose losses pick the new directions
    config.resample.encoder_scale = 0.2
    config.resample.rewarm_steps = 100    # learning-rate re-warm after each resampling


def _train_section(config: ml_collections.ConfigDict) -> None:
    """The config.train section."""
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 1024
    config.train.steps = 4_000
    # Multi-process runs: how often (in steps) the hosts agree on whether any got SIGTERM (an
    # allgather, which waits for the step to finish); a single process checks every step free.
    config.train.preemption_check_every = 10
    # Mixed precision: the dtype of the SAE's matmuls and activations inside the step
    # ("float32" or "bfloat16"). Params, gradients and the optimizer state stay float32, and the
    # losses and metrics are reduced in float32. bfloat16 is for GPUs and TPUs; on CPU it runs
    # but is slower than float32.
    config.train.compute_dtype = "float32"
    config.train.log_every = 500
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3


def _evals_section(config: ml_collections.ConfigDict) -> None:
    """The config.evals section."""
    config.evals = ml_collections.ConfigDict()
    config.evals.dead_window_tokens = 100_000
    config.evals.density_window_tokens = 100_000  # feature density histogram window
    config.evals.dense_threshold = 0.1    # dense_fraction: latents firing on > 10% of tokens
    config.evals.eval_batches = 8
    # Loss recovered: splice the SAE into the LM at lm.hook on the last N sequences of
    # lm.tokens (held out by harvest --holdout_sequences); 0 = off. Needs lm.checkpoint.
    config.evals.loss_recovered_sequences = 0


def _mesh_section(config: ml_collections.ConfigDict) -> None:
    """The config.mesh section."""
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.model = 1
    # Devices along a third mesh axis, `layer` (1: the mesh is data x model); a CLT's layer
    # axis is split over it with the rule ("layer", "layer") in sharding_rules.
    config.mesh.layer = 1
    # Logical axis -> mesh axis. "group" (the members of a group) stays unsplit; the LM's
    # heads, MLP and vocabulary split over `model` with the dictionary (sharding.LM_RULES).
    config.sharding_rules = (("batch", "data"), ("latent", "model"), ("embed", None),
                             ("group", None), ("heads", "model"), ("kv_heads", "model"),
                             ("mlp", "model"), ("vocab", "model"), ("layers", None))


def _logging_section(config: ml_collections.ConfigDict) -> None:
    """The config.logging section: where metrics.jsonl is mirrored (saejax/tracking.py)."""
    config.logging = ml_collections.ConfigDict()
    config.logging.tensorboard = True     # event files in <workdir>/tensorboard/
    # Weights & Biases (pip install 'saejax[wandb]'): a project name turns it on.
    config.logging.wandb_project = ""
    config.logging.wandb_entity = ""      # "": wandb's default entity
    config.logging.wandb_mode = ""        # "online", "offline", "disabled"; "": WANDB_MODE


def base_config() -> ml_collections.ConfigDict:
    """Every field and its default, a section at a time (the `sae` section gains every
    registered architecture's fields)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    for section in (_data_section, _lm_section, _sae_section, _optim_section, _group_section,
                    _resample_section, _train_section, _evals_section, _mesh_section,
                    _logging_section):
        section(config)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict,
                    *, source: str = "An override") -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key overrides (`{"sae.k": 4}`) applied; a key that is not
    a field is a ConfigError naming it (`source` says who set it: "The sweep")."""
    # A deep copy keeps field references (the aliases) linked; resolving them would cut an
    # alias from the field it names.
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for name in path:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"{source} sets {key!r}, which is not a config field "
                              f"(saejax/configs.py lists them all).")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source} sets {key}={value!r}: {e}") from None
    return config
