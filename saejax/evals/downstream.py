"""Loss recovered and KL with SAEs spliced into their language model: the clean, zero-ablated
and spliced forward passes over held-out token sequences, summed by `evals.downstream_sums`.
`evaluate` splices one hook (an SAE; a transcoder replacing its MLP's output),
`evaluate_hooks` replaces every hook a crosscoder reads at once and each on its own, and
`evaluate_replacement` runs a cross-layer transcoder's replacement model, every MLP output it
covers replaced at once. `evaluate_run` picks the one a run's dictionary needs. An evaluation
of the data layer's `LanguageModel` (saejax.data.lm), so it lives above it."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saejax import evals, models
from saejax.data import lm
from saejax.sae import base, clt


def evaluate(model: lm.LanguageModel, tokens: np.ndarray, *, batch_sequences: int, reconstruct,
             sae_params: list, mesh, keep: np.ndarray | None = None,
             input_hook: str | None = None) -> list[dict]:
    """Per SAE of `sae_params`: loss recovered and KL with it spliced in at the model's hook
    (`evals.downstream_metrics`), over `tokens` in batches of `batch_sequences`. The clean and
    zero-ablated forward passes run once per batch for all the SAEs.

    `reconstruct(sae_params, activation [n, d]) -> reconstruction [n, d]` applies the SAE (with
    its input scale) to raw activations; it runs inside the same jitted program as the LM.
    With `input_hook` (a transcoder's: upstream of the model's hook, e.g. the MLP's normalised
    input for its output), `reconstruct` reads the clean activation there and its output
    replaces the activation at the hook: the MLP replaced by the transcoder.
    `keep` (bool like `tokens`; default all): the tokens the SAE reads (`keep_mask`); at the
    others (attention sinks it was not trained on) both the SAE and the zero ablation leave
    the activation as it is.
    """
    config = model.config

    def spliced(lm_params, tokens, sae_params):
        reads = None
        if input_hook not in (None, model.hook):  # the clean input, captured once
            reads = models.forward(lm_params, tokens, config, hooks=(input_hook,),
                                   stop_at_layer=model.layer + 1, unembed=False)[1][input_hook]

        def splice(params):
            def apply(x):
                source = x if reads is None else reads
                flat = reconstruct(params, source.reshape(-1, source.shape[-1]))
                return flat.reshape(*x.shape[:-1], -1).astype(x.dtype)
            return apply
        return [{"": {model.hook: splice(p)}} for p in sae_params]

    return [r[""] for r in _evaluate(model, tokens, {"": (model.hook,)}, spliced, sae_params,
                                     batch_sequences=batch_sequences, mesh=mesh, keep=keep)]


def evaluate_replacement(model: lm.LanguageModel, tokens: np.ndarray, *, batch_sequences: int,
                         input_hooks: Sequence[str], output_hooks: Sequence[str],
                         encode: Callable, decode: Callable, clt_params: list, mesh,
                         keep: np.ndarray | None = None) -> list[dict]:
    """Per cross-layer transcoder of `clt_params`: loss recovered and KL of its replacement
    model (Ameisen et al. 2025), against the zero ablation of every MLP output it replaces
    (`evals.downstream_metrics`, the same definitions as `evaluate`'s).

    The LM runs layer by layer: at layer l, `encode(params, l, x [n, d_in]) -> latents [n, k]`
    reads `input_hooks[l]` from the replacement's own stream (every earlier layer's output
    already replaced), and `output_hooks[m]` becomes `decode(params, [latents of layers 0..m],
    m) -> [n, d_out]`. Both apply the CLT with its input scale to raw activations, inside the
    LM's jitted program. The hooks must interleave in the order the forward pass reaches them
    (input 0, output 0, input 1, ...), as an MLP's normalised input and its output do.
    `keep` as in `evaluate`: at the other tokens the MLP outputs stay the model's own.
    """
    check_replacement_hooks(model.config, input_hooks, output_hooks)

    def replacements(lm_params, tokens, clt_params):
        del lm_params, tokens
        return [{"": replacement_interventions(input_hooks, output_hooks, encode, decode, p)}
                for p in clt_params]

    return [r[""] for r in _evaluate(model, tokens, {"": tuple(output_hooks)}, replacements,
                                     clt_params, batch_sequences=batch_sequences, mesh=mesh,
                                     keep=keep)]


def evaluate_hooks(model: lm.LanguageModel, tokens: np.ndarray, *, hooks: Sequence[str],
                   batch_sequences: int, reconstruct: Callable, sae_params: list, mesh,
                   keep: np.ndarray | None = None) -> list[dict]:
    """Per dictionary of `sae_params` that reads several hooks of the LM into one code and
    reconstructs each (a crosscoder): loss recovered and KL with every hook of `hooks` replaced
    at once by its reconstruction, against all of them zero-ablated (named as `evaluate`'s
    metrics), and with each hook replaced alone, against it alone zero-ablated (the same names
    with `/<hook>`; `ce_clean` is the one clean pass's).

    `reconstruct(sae_params, {hook: [n, d]}) -> {hook: [n, d]}` applies the dictionary (with
    its input scales) to raw activations, inside the LM's jitted program. The code is encoded
    once, from the clean activations of every hook (a first clean pass captures them): each
    hook's activation becomes its slice of that one decode, whether the others are replaced
    or not. `keep` as in `evaluate`."""
    hooks = tuple(hooks)
    for hook in hooks:
        models.check_hook(model.config, hook, "a crosscoder's hook")
    deepest = max(models.hook_layer(h) for h in hooks)

    def interventions(lm_params, tokens, sae_params):
        clean = models.forward(lm_params, tokens, model.config, hooks=hooks,
                               stop_at_layer=deepest + 1, unembed=False)[1]
        flat = {h: clean[h].reshape(-1, clean[h].shape[-1]) for h in hooks}
        replace = lambda part: lambda x: part.reshape(x.shape).astype(x.dtype)
        per_entry = []
        for params in sae_params:
            parts = {h: replace(part) for h, part in reconstruct(params, flat).items()}
            per_entry.append({"": parts, **{f"/{h}": {h: parts[h]} for h in hooks}})
        return per_entry

    variants = {"": hooks, **{f"/{h}": (h,) for h in hooks}}
    results = _evaluate(model, tokens, variants, interventions, sae_params,
                        batch_sequences=batch_sequences, mesh=mesh, keep=keep)
    return [{f"{name}{suffix}": value for suffix, metrics in result.items()
             for name, value in metrics.items() if not (suffix and name == "ce_clean")}
            for result in results]


def replaces_layers(shape) -> bool:
    """Whether a dictionary's shape is evaluated as a replacement model (`evaluate_replacement`:
    a cross-layer transcoder, which decodes each of its layers' MLP outputs on its own) rather
    than spliced at one hook (`evaluate`)."""
    return callable(getattr(shape, "decode_layer", None))


def check_replacement_hooks(config, input_hooks: Sequence[str],
                            output_hooks: Sequence[str]) -> None:
    """A replacement model's hooks exist and interleave as the forward pass reaches them: layer
    l's encoder must read after every earlier layer's output is replaced, and before its own."""
    if len(input_hooks) != len(output_hooks) or not input_hooks:
        raise ValueError(f"a replacement model needs one input hook per output hook; got "
                         f"{list(input_hooks)} and {list(output_hooks)}.")
    for hook in (*input_hooks, *output_hooks):
        models.check_hook(config, hook, "a replacement model's hook")
    order = {h: i for i, h in enumerate(models.hook_names(config))}
    hooks = [h for pair in zip(input_hooks, output_hooks) for h in pair]
    if any(order[a] >= order[b] for a, b in zip(hooks, hooks[1:])):
        raise ValueError(f"a replacement model's hooks must interleave in the forward pass's "
                         f"order (input 0, output 0, input 1, ...); got inputs "
                         f"{list(input_hooks)} and outputs {list(output_hooks)}.")


def replacement_interventions(input_hooks: Sequence[str], output_hooks: Sequence[str],
                              encode: Callable, decode: Callable, params) -> dict:
    """The interventions of one replacement forward pass: each input hook encodes what it sees
    (and passes it on unchanged), each output hook is replaced by the decode of the latents
    encoded so far. The latents ride from one intervention to the next in a carry local to
    these interventions: the forward pass calls its hooks in order while it is traced."""
    latents: dict[int, jax.Array] = {}

    def read(layer):
        def encode_here(x):
            latents[layer] = encode(params, layer, x.reshape(-1, x.shape[-1]))
            return x
        return encode_here

    def write(layer):
        def decode_here(x):
            out = decode(params, [latents[i] for i in range(layer + 1)], layer)
            return out.reshape(*x.shape[:-1], -1).astype(x.dtype)
        return decode_here

    return {**{h: read(i) for i, h in enumerate(input_hooks)},
            **{h: write(i) for i, h in enumerate(output_hooks)}}


def _evaluate(model: lm.LanguageModel, tokens: np.ndarray, variants: dict[str, tuple[str, ...]],
              interventions_of, params: list, *, batch_sequences: int, mesh,
              keep: np.ndarray | None) -> list[dict[str, dict]]:
    """`evals.downstream_metrics` per entry of `params` and per variant, over `tokens` in
    batches, in one jitted program: the LM clean, with variant v's hooks `variants[v]`
    zero-ablated, and spliced with v's interventions, `interventions_of(lm_params, tokens,
    params)` giving per entry `{v: {hook: fn}}`. Returns per entry `{v: metrics}`."""
    config = model.config

    @jax.jit
    def sums(lm_params, params, tokens, keep):
        def only_kept(replace):
            return lambda x: jnp.where(keep[..., None], replace(x), x)

        # The final residual, not the logits: the losses run over the vocabulary in chunks.
        # The clean pass is traced once for every variant (their tokens are the same).
        clean = {}

        def lm_forward(t, interventions):
            if not interventions:
                if "clean" not in clean:
                    clean["clean"] = models.forward(lm_params, t, config, unembed=False)[0]
                return clean["clean"]
            interventions = {h: only_kept(f) for h, f in interventions.items()}
            return models.forward(lm_params, t, config, interventions=interventions,
                                  unembed=False)[0]

        w_u, cap = models.unembedding(lm_params, config), config.final_logit_softcapping
        per_entry = interventions_of(lm_params, tokens, params)
        by_variant = {v: evals.downstream_sums(
            lm_forward, tokens, hooks, [entry[v] for entry in per_entry],
            ce_fn=lambda h, t: models.vocab.next_token_losses(h, t, w_u, softcap=cap),
            kl_fn=lambda h, g: models.vocab.kl_divergences(h, g, w_u, softcap=cap))
            for v, hooks in variants.items()}
        return [{v: sums[i] for v, sums in by_variant.items()} for i in range(len(per_entry))]

    # A model split over a mesh (`LanguageModel.mesh`, tensor parallel) runs as it is sharded,
    # under its rules; else it is replicated over `mesh`.
    lm_params = model.params if model.mesh is not None else jax.device_put(
        model.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    keep = np.ones(np.shape(tokens), bool) if keep is None else np.asarray(keep, bool)
    total = None
    for start in range(0, len(tokens), batch_sequences):
        chunk = np.asarray(tokens[start:start + batch_sequences], np.int32)
        with model.context():
            out = jax.device_get(sums(lm_params, list(params), chunk,
                                      keep[start:start + batch_sequences]))
        total = out if total is None else jax.tree.map(np.add, total, out)
    return [{v: {k: float(x) for k, x in evals.downstream_metrics(summed).items()}
             for v, summed in entry.items()} for entry in total]


def evaluate_run(config, architecture, sae_params: list, mesh, *, d: int, sequences: int,
                 hook: str | None = None) -> list[dict]:
    """Loss recovered and KL of dictionaries trained by `config` (`sae_params`: `(params,
    input_scale)` each) on its LM's last `sequences` sequences of `lm.tokens` (those its
    training left out), leaving the tokens `lm.exclude_*` names as they are. By the shape:
    spliced at one hook (`evaluate`, at the hooks `shape.spliced_hooks` names: a transcoder
    reads its input hook and replaces its target's; `hook`: the one the SAEs read, default
    `lm.hook`, a hook group's member's own); every hook it reads replaced at once and each
    alone (`evaluate_hooks`: a crosscoder); or its replacement model (`evaluate_replacement`:
    a cross-layer transcoder, which decodes layer by layer)."""
    shape = architecture.shape
    lm_config = config.lm.copy_and_resolve_references()
    with lm_config.unlocked():
        lm_config.hook = lm_hook(shape, hook or str(config.lm.hook))
    model = lm.load(lm_config, d=d, mesh=mesh, rules=config.sharding_rules)
    _, tokens = lm.split(config.lm, model, sequences)
    common = dict(batch_sequences=int(config.lm.batch_sequences), mesh=mesh,
                  keep=lm.keep_mask(tokens, *lm.exclusion(config.lm, model)))
    if replaces_layers(shape):
        encode, decode = _layerwise(architecture, config.sae)
        return evaluate_replacement(
            model, tokens, input_hooks=shape.input_hooks, output_hooks=shape.target_hooks,
            encode=encode, decode=decode, clt_params=sae_params, **common)
    if replaces_hooks(shape):
        return evaluate_hooks(model, tokens, hooks=shape.replaced_hooks, sae_params=sae_params,
                              reconstruct=joint_reconstruct(architecture, config.sae), **common)

    def reconstruct(sae_state, x):
        params, scale = sae_state
        x = x * scale
        return architecture.decode(params, architecture.encode(params, x, config.sae), x) / scale

    return evaluate(model, tokens, reconstruct=reconstruct, sae_params=sae_params,
                    input_hook=shape.spliced_hooks(hook or str(config.lm.hook))[0], **common)


def replaces_hooks(shape) -> bool:
    """Whether a dictionary's shape reconstructs several hooks of one LM from one code, each
    replaced by its part of the decode (`evaluate_hooks`: a crosscoder's `replaced_hooks`)."""
    return bool(getattr(shape, "replaced_hooks", ()))


def lm_hook(shape, hook: str) -> str:
    """The `lm.hook` at which the LM is loaded for a dictionary's loss recovered: the hook its
    shape replaces (`spliced_hooks`, from the one it reads, `hook`), every hook a crosscoder
    replaces (comma-separated), or a CLT's last MLP output."""
    if replaces_layers(shape):
        return shape.target_hooks[-1]
    if replaces_hooks(shape):
        return ",".join(shape.replaced_hooks)
    return shape.spliced_hooks(hook)[1]


def joint_reconstruct(architecture, sae_config) -> Callable:
    """`reconstruct(sae_state, {hook: [n, d]}) -> {hook: [n, d]}` of a dictionary over several
    hooks (`evaluate_hooks`), on raw activations: `sae_state` is `(params, input_scale)`, its
    scale one per hook or one for all (`sae.base.scale_batch`)."""
    shape = architecture.shape

    def reconstruct(sae_state, activations):
        params, scale = sae_state
        x = shape.input(base.scale_batch(shape, activations, scale))
        x_hat = architecture.decode(params, architecture.encode(params, x, sae_config), x)
        return shape.split_target(x_hat / base.column_scales(shape, scale, x_hat.shape[-1]))
    return reconstruct


def _layerwise(architecture, sae_config):
    """A cross-layer transcoder's (encode, decode) for its replacement model, on raw
    activations with its input scale: layer l's latents from its input, and layer m's MLP
    output from the latents of layers 0 .. m."""
    def encode(clt_state, layer, x):
        params, scale = clt_state
        return clt.encode_layer(architecture, params, x * scale, layer, sae_config)

    def decode(clt_state, latents, layer):
        params, scale = clt_state
        return architecture.shape.decode_layer(params, jnp.stack(latents, axis=-2),
                                               layer) / scale
    return encode, decode
