"""Loss recovered and KL with SAEs spliced into their language model: the clean, zero-ablated
and spliced forward passes over held-out token sequences, summed by `evals.downstream_sums`.
`evaluate` splices one hook (an SAE; a transcoder replacing its MLP's output), and
`evaluate_replacement` runs a cross-layer transcoder's replacement model, every MLP output it
covers replaced at once. An evaluation of the data layer's `LanguageModel` (saejax.data.lm),
so it lives above it."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saejax import evals, models
from saejax.data import lm
from saejax.sae import clt


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
        return [splice(p) for p in sae_params]

    return _evaluate(model, tokens, (model.hook,), spliced, sae_params,
                     batch_sequences=batch_sequences, mesh=mesh, keep=keep)


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
        return [replacement_interventions(input_hooks, output_hooks, encode, decode, p)
                for p in clt_params]

    return _evaluate(model, tokens, tuple(output_hooks), replacements, clt_params,
                     batch_sequences=batch_sequences, mesh=mesh, keep=keep)


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


def _evaluate(model: lm.LanguageModel, tokens: np.ndarray, hooks: tuple[str, ...],
              interventions_of, params: list, *, batch_sequences: int, mesh,
              keep: np.ndarray | None) -> list[dict]:
    """`evals.downstream_metrics` per entry of `params`, over `tokens` in batches: the LM clean,
    with `hooks` zero-ablated, and spliced with each of `interventions_of(lm_params, tokens,
    params)` (one intervention, or a dict of them, per entry), in one jitted program."""
    config = model.config

    @jax.jit
    def sums(lm_params, params, tokens, keep):
        def only_kept(replace):
            return lambda x: jnp.where(keep[..., None], replace(x), x)

        # The final residual, not the logits: the losses run over the vocabulary in chunks.
        def lm_forward(t, interventions):
            if interventions:
                interventions = {h: only_kept(f) for h, f in interventions.items()}
            return models.forward(lm_params, t, config, interventions=interventions,
                                  unembed=False)[0]

        w_u, cap = models.unembedding(lm_params, config), config.final_logit_softcapping
        return evals.downstream_sums(
            lm_forward, tokens, hooks, interventions_of(lm_params, tokens, params),
            ce_fn=lambda h, t: models.vocab.next_token_losses(h, t, w_u, softcap=cap),
            kl_fn=lambda h, g: models.vocab.kl_divergences(h, g, w_u, softcap=cap))

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
    return [{k: float(v) for k, v in evals.downstream_metrics(t).items()} for t in total]


def evaluate_run(config, architecture, sae_params: list, mesh, *, d: int, sequences: int,
                 hook: str | None = None) -> list[dict]:
    """`evaluate` for SAEs trained by `config` (`sae_params`: `(params, input_scale)` each) on
    its LM's last `sequences` sequences of `lm.tokens` (those its training left out), at the
    hooks its shape splices (`shape.spliced_hooks`: a transcoder reads its input hook and
    replaces its target's; `hook`: the one the SAEs read, default `lm.hook`, a hook group's
    member's own), leaving the tokens `lm.exclude_*` names as they are. A shape that
    decodes layer by layer (a cross-layer transcoder) is evaluated as its replacement model
    (`evaluate_replacement`)."""
    shape = architecture.shape
    replacement = replaces_layers(shape)
    input_hook, hook = ((None, shape.target_hooks[-1]) if replacement
                        else shape.spliced_hooks(hook or str(config.lm.hook)))
    lm_config = config.lm.copy_and_resolve_references()
    with lm_config.unlocked():
        lm_config.hook = hook
    model = lm.load(lm_config, d=d, mesh=mesh, rules=config.sharding_rules)
    _, tokens = lm.split(config.lm, model, sequences)
    common = dict(batch_sequences=int(config.lm.batch_sequences), mesh=mesh,
                  keep=lm.keep_mask(tokens, *lm.exclusion(config.lm, model)))
    if replacement:
        encode, decode = _layerwise(architecture, config.sae)
        return evaluate_replacement(
            model, tokens, input_hooks=shape.input_hooks, output_hooks=shape.target_hooks,
            encode=encode, decode=decode, clt_params=sae_params, **common)

    def reconstruct(sae_state, x):
        params, scale = sae_state
        x = x * scale
        return architecture.decode(params, architecture.encode(params, x, config.sae), x) / scale

    return evaluate(model, tokens, reconstruct=reconstruct, sae_params=sae_params,
                    input_hook=input_hook, **common)


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
