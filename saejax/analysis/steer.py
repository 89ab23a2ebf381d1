"""Steering and ablation: the LM (any family) run with one latent clamped, added or ablated,
with greedy generations and the change in the next-token distribution.

    python -m saejax.analysis.steer DIR --latent=I --mode=add --value=5 --prompt="..."

At every position, with f_i the latent's activation where it is read and d_i its direction in
raw units at a hook it writes (an SAE's W_dec[i] / input scale at its hook), at each such hook:

    add     x + value * d_i                 (as if the latent fired `value` more)
    clamp   x + (value - f_i) * d_i         (the latent set to `value`; the SAE's error kept)
    ablate  x - f_i * d_i                   (clamp to 0)

Where each kind reads and writes (a transcoder: its input hook, its target; a crosscoder: every
hook, f_i from a clean pass; a CLT latent l * n + i: layer l's input, the MLP outputs m >= l)
is `interventions.py`'s. Values are in the latent's own units: the dashboard shows its typical
and top activations.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from saejax import cli, models, sharding
from saejax.analysis import dashboard_data, kinds, loading
from saejax.analysis import interventions as interventions_lib
from saejax.analysis.loading import AnalysisError, LoadedSAE

MODES = ("clamp", "add", "ablate")


class SteeringResult(NamedTuple):
    latent: int
    mode: str
    value: float
    hook: str                       # the hooks written, comma-separated
    prompt_tokens: np.ndarray       # [batch, seq]
    clean_tokens: np.ndarray        # [batch, n_new] greedy continuation without the intervention
    steered_tokens: np.ndarray      # [batch, n_new] with it
    latent_activation: np.ndarray   # [batch, seq] the latent on the prompt, clean run
    kl_last: float                  # KL(clean || steered) at the last prompt token (nats)
    kl_mean: float                  # ... averaged over every prompt position
    top_increased: list[tuple[int, float]]  # (token id, steered - clean log-prob), last token
    top_decreased: list[tuple[int, float]]
    # The `top` tokens the latent's decoder direction promotes through the unembedding (the
    # dashboard's logit view), and what the intervention does to them: the log of the
    # probability the model puts on that set for the next token, averaged over every position
    # of the prompt and its clean continuation (the same text, clean and steered), and how many
    # of the greedy tokens generated clean and steered are in the set.
    promoted: list[int]
    promoted_log_prob_clean: float
    promoted_log_prob_steered: float
    promoted_generated_clean: int
    promoted_generated_steered: int
    read_hooks: tuple[str, ...] = ()   # where the latent's activation is read
    write_hooks: tuple[str, ...] = ()  # where its direction is added (a CLT latent's: m >= l)


def make_intervention(loaded: LoadedSAE, hook: str | None = None
                      ) -> Callable[[tuple, jax.Array], jax.Array]:
    """An SAE's `apply(args, x) -> x'` at its hook (`hook`, else the one it was trained at),
    jit-able, with `args` from `intervention_args`: x + on * (value - replace * f_i(x)) * d_i."""
    kind = kinds.kind_of(loaded, hook)
    if kind.name != "sae":
        raise AnalysisError(f"a {kind.name} reads {list(kind.reads)} and writes "
                            f"{list(kind.writes)}: steer it through `steer`, not at one hook.")

    def apply(args, x):
        interventions, _ = interventions_lib.running_interventions(loaded, kind, args)
        return interventions[kind.reads[0]](x)

    return apply


def intervention_args(loaded: LoadedSAE, latent: int, mode: str, value: float, *,
                      on: bool = True, hook: str | None = None) -> tuple:
    """The traced arguments of the interventions for one latent and mode."""
    return interventions_lib.intervention_args(loaded, latent, mode, value, on=on,
                                               kind=kinds.kind_of(loaded, hook))


@functools.lru_cache(maxsize=8)
def _programs(config, kind: kinds.Kind, loaded_ref: "_Ref"):
    """The jitted logits and generation programs for one model, kind and SAE (every mode)."""
    forward = interventions_lib.make_forward(config, loaded_ref(), kind)
    # The clean run (on=0) gives the latent's own activation where it is read.
    logits_fn = jax.jit(forward)

    @jax.jit
    def generate_fn(lm_params, args, buffer, prompt_length):
        def body(t, buffer):
            logits, _ = forward(lm_params, args, buffer)
            # Causal attention: the positions not generated yet do not affect position t - 1.
            last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(
                buffer, jnp.argmax(last, axis=-1).astype(buffer.dtype), t, axis=1)
        return jax.lax.fori_loop(prompt_length, buffer.shape[1], body, buffer)

    return logits_fn, generate_fn


def _checked(model, loaded: LoadedSAE, tokens, latent: int, mode: str, value, n_new_tokens):
    """(latent, value, tokens [batch, seq] int32) of a steering request, or an AnalysisError
    naming what cannot work."""
    if mode not in MODES:
        raise AnalysisError(f"mode={mode!r}: choose one of {list(MODES)}.")
    latent = loading.check_latent(loaded, latent)
    if mode == "ablate":
        if value not in (None, 0, 0.0):
            raise AnalysisError(f"mode='ablate' sets the latent to 0 and takes no value (got "
                                f"{value}); use mode='clamp' to set it to another value.")
        value = 0.0
    elif value is None or not math.isfinite(float(value)):
        raise AnalysisError(f"mode={mode!r} needs a finite value (the latent's activation to "
                            f"{'add' if mode == 'add' else 'clamp it to'}); got {value!r}.")
    value = float(value)
    config, hook = model.config, model.hook
    loading.check_width(loaded, config.d_model, f"{hook} of the model (d_model={config.d_model})",
                        "Use the model (checkpoint and hook) this SAE was trained on.")
    kind = kinds.kind_of(loaded, hook)
    if kind.name == "sae" and loaded.hook and hook != loaded.hook:
        logging.warning("The SAE was trained at %s but is applied at %s.", loaded.hook, hook)
    for h in (*kind.reads, *kind.writes):
        models.check_hook(config, h, f"the {kind.name} reads or writes {h!r}, not a hook of "
                          "the model; pass the checkpoint it was trained on (--checkpoint)",
                          AnalysisError)
    interventions_lib.check_order(config, kind)
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise AnalysisError(f"tokens must be integer ids [seq] or [batch, seq]; got "
                            f"{tokens.dtype} {tokens.shape}.")
    if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise AnalysisError(f"token ids must lie in [0, {config.vocab_size}); got "
                            f"[{tokens.min()}, {tokens.max()}].")
    total = tokens.shape[1] + int(n_new_tokens)
    if total > config.max_positions:
        raise AnalysisError(f"{tokens.shape[1]} prompt tokens + {n_new_tokens} new ones exceed "
                            f"the model's {config.max_positions} positions; shorten one.")
    tokens = tokens.astype(np.int32)
    return latent, value, tokens


def steer(model, loaded: LoadedSAE, tokens, latent: int, mode: str, value: float | None = None,
          *, n_new_tokens: int = 20, top: int = 10,
          promoted: list[int] | None = None) -> SteeringResult:
    """Runs `model` (a `saejax.data.lm.LanguageModel`: config, params, hook) on `tokens` ([seq] or
    [batch, seq] ids) with `latent` of `loaded` clamped/added/ablated at the model's hook.

    Returns the KL divergence from the clean next-token distribution (at the last prompt token
    and averaged over the prompt), the tokens whose log-probabilities at the last prompt token
    rise and fall most, and `n_new_tokens` greedy tokens with and without the intervention
    (which applies at every position, the generated ones included); and for the `top` tokens
    the latent promotes, the log-probability the model gives them, clean and steered. The
    promoted tokens are the logit lens's (the decoder direction through the unembedding),
    which at a middle layer of a deep model says little; `promoted` (token ids) names them
    instead, e.g. the tokens that follow the latent's top contexts on the dashboard.
    """
    latent, value, tokens = _checked(model, loaded, tokens, latent, mode, value, n_new_tokens)
    config = model.config
    kind = kinds.kind_of(loaded, model.hook)
    total = tokens.shape[1] + int(n_new_tokens)

    logits_fn, generate_fn = _programs(config, kind, _Ref(loaded))
    def args(on):
        out = interventions_lib.intervention_args(loaded, latent, mode, value, on=on, kind=kind)
        # Beside a model split over a mesh (tensor parallel), the SAE is replicated on it.
        return out if model.mesh is None else jax.device_put(out, sharding.replicated(model.mesh))

    n = tokens.shape[1]
    buffer = np.zeros((tokens.shape[0], total), np.int32)
    buffer[:, :n] = tokens
    prompt_length = jnp.int32(n)
    with model.context():
        clean = np.asarray(generate_fn(model.params, args(False), buffer, prompt_length))
        steered = np.asarray(generate_fn(model.params, args(True), buffer, prompt_length))
        # One clean and one steered pass over the prompt and its clean continuation serve both
        # the prompt's figures (causal: its positions do not see the continuation) and the
        # promoted tokens' measurement over the whole text.
        clean_logits, activation = logits_fn(model.params, args(False), clean)
        steered_logits, _ = logits_fn(model.params, args(True), clean)
    logp_clean = jax.nn.log_softmax(clean_logits, axis=-1)
    logp_steered = jax.nn.log_softmax(steered_logits, axis=-1)
    kl = jnp.sum(jnp.exp(logp_clean[:, :n]) * (logp_clean[:, :n] - logp_steered[:, :n]),
                 axis=-1)   # [b, prompt]
    change = np.asarray(jnp.mean(logp_steered[:, n - 1] - logp_clean[:, n - 1], axis=0))
    order = np.argsort(-change, kind="stable")
    top = min(int(top), len(change))

    if promoted is None:
        up_ids, _, _, _ = dashboard_data.promoted_tokens(
            loaded, np.asarray(models.unembedding(model.params, config), np.float32), [latent],
            k=top)
        promoted = [int(i) for i in up_ids[0]]
    promoted = [int(i) for i in promoted]
    if not promoted or min(promoted) < 0 or max(promoted) >= config.vocab_size:
        raise AnalysisError(f"promoted token ids must be some of [0, {config.vocab_size}); got "
                            f"{promoted}.")

    def promoted_log_prob(logp):
        return float(jnp.mean(jax.nn.logsumexp(logp[..., np.asarray(promoted)], axis=-1)))

    def promoted_count(generated):
        return int(np.isin(generated[:, n:], promoted).sum())

    written = tuple(kinds.write_directions(loaded, latent, kind))
    return SteeringResult(
        latent=latent, mode=mode, value=value, hook=",".join(written), prompt_tokens=tokens,
        clean_tokens=clean[:, n:], steered_tokens=steered[:, n:],
        latent_activation=np.asarray(activation)[:, :n],
        kl_last=float(jnp.mean(kl[:, -1])), kl_mean=float(jnp.mean(kl)),
        top_increased=[(int(i), float(change[i])) for i in order[:top]],
        top_decreased=[(int(i), float(change[i])) for i in order[::-1][:top]],
        promoted=promoted, promoted_log_prob_clean=promoted_log_prob(logp_clean),
        promoted_log_prob_steered=promoted_log_prob(logp_steered),
        promoted_generated_clean=promoted_count(clean),
        promoted_generated_steered=promoted_count(steered), read_hooks=kind.reads,
        write_hooks=written)


class _Ref:
    """Hashable handle on a LoadedSAE for the program cache (compared by identity)."""

    def __init__(self, loaded: LoadedSAE):
        self._loaded = loaded

    def __call__(self) -> LoadedSAE:
        return self._loaded

    def __hash__(self):
        return id(self._loaded)

    def __eq__(self, other):
        return isinstance(other, _Ref) and other._loaded is self._loaded


def encode_prompt(tokenizer, prompt: str, *, prepend_bos: bool = True,
                  bos_token_id: int | None = None) -> np.ndarray:
    """The prompt's token ids, after the separator saejax's training sequences put before every
    document when `prepend_bos`: the model's `bos_token_id`, else the tokenizer's
    `<|endoftext|>` when it has one."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    bos = None
    if prepend_bos:
        bos = (bos_token_id if bos_token_id is not None
               else tokenizer.token_to_id(models.END_OF_TEXT))
    ids = ([bos] if bos is not None else []) + list(ids)
    if not ids:
        raise AnalysisError("the prompt gives no tokens.")
    return np.asarray(ids, np.int32)


def report(result: SteeringResult, tokenizer=None, *, prompt: str | None = None) -> str:
    """The result as the CLI prints it."""
    text = (lambda ids: tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
            ) if tokenizer is not None else (lambda ids: " ".join(map(str, ids)))
    token = (lambda i: tokenizer.decode([int(i)], skip_special_tokens=False)
             ) if tokenizer is not None else str
    what = {"add": f"add {result.value:g}", "clamp": f"clamped to {result.value:g}",
            "ablate": "ablated"}[result.mode]
    activations = " ".join(f"{a:.3g}" for a in result.latent_activation[0])
    read = ("" if result.read_hooks in ((), result.write_hooks)
            else f" (read at {', '.join(result.read_hooks)})")
    lines = [f"Latent {result.latent} ({what}) at {result.hook}{read}",
             f"Prompt:  {prompt if prompt is not None else text(result.prompt_tokens[0])!r}",
             f"  the latent on the prompt's tokens (clean): {activations}",
             f"Clean:   {text(result.clean_tokens[0])!r}",
             f"Steered: {text(result.steered_tokens[0])!r}",
             f"KL(clean || steered) at the last prompt token: {result.kl_last:.4g} nats "
             f"(mean over the prompt {result.kl_mean:.4g})",
             "Next-token log-probability change at the last prompt token (steered - clean):",
             "  up:   " + "  ".join(f"{token(i)!r} {d:+.3g}" for i, d in result.top_increased),
             "  down: " + "  ".join(f"{token(i)!r} {d:+.3g}" for i, d in result.top_decreased),
             "Tokens the latent promotes: "
             + " ".join(repr(token(i)) for i in result.promoted),
             f"  log P(next token is one of them), mean over the clean text: "
             f"{result.promoted_log_prob_clean:.4g} clean, "
             f"{result.promoted_log_prob_steered:.4g} steered "
             f"({result.promoted_log_prob_steered - result.promoted_log_prob_clean:+.4g})",
             f"  of them in the greedy continuation: {result.promoted_generated_clean} clean, "
             f"{result.promoted_generated_steered} steered"]
    return "\n".join(lines)


def steer_run(path: str, *, latent: int, prompt: str, mode: str = "add",
              value: float | None = None, new_tokens: int = 20, checkpoint: str | None = None,
              hook: str | None = None, top: int = 10, prepend_bos: bool = True,
              step: int | None = None, promoted: list[str] | None = None,
              mesh_model: int = 1) -> str:
    """What the CLI does: steers the SAE of `path` (a run's workdir or a SAELens directory)
    on `prompt` and returns the printed report; `mesh_model` devices split the LM."""
    loaded = loading.load_sae(path, step=step)
    loading.check_latent(loaded, latent)
    model = loading.load_language_model(loaded, checkpoint=checkpoint, hook=hook,
                                        mesh_model=mesh_model)
    tokenizer = loading.load_tokenizer(loaded, checkpoint)
    if tokenizer is None:
        raise AnalysisError("the prompt needs the checkpoint's tokenizer.json; pass "
                            "--checkpoint=DIR holding one.")
    tokens = encode_prompt(tokenizer, prompt, prepend_bos=prepend_bos,
                           bos_token_id=model.config.bos_token_id)
    promoted_ids = None
    if promoted:  # each a token's text, as the dashboard shows it
        promoted_ids = [tokenizer.token_to_id(t) for t in promoted]
        if None in promoted_ids:
            missing = [t for t, i in zip(promoted, promoted_ids) if i is None]
            raise AnalysisError(f"--promoted: {missing} are not tokens of the vocabulary "
                                "(a token's text as the tokenizer holds it, e.g. 'ĠRome' for "
                                "' Rome' in a byte-level BPE).")
    result = steer(model, loaded, tokens, latent, mode, value, n_new_tokens=new_tokens, top=top,
                   promoted=promoted_ids)
    return report(result, tokenizer, prompt=prompt)


# ------------------------------------------------------------------------------------------
# Command line (saejax/cli.py): flags defined only when this module runs as the program, so
# importing it as a library defines none and cannot clash with another tool's flags.
# ------------------------------------------------------------------------------------------
def _define_flags() -> None:
    flags.DEFINE_integer("latent", None, "The latent to steer with.")
    flags.DEFINE_enum("mode", "add", list(MODES), "add, clamp or ablate.")
    flags.DEFINE_float("value", None, "add: the activation added; clamp: the activation set.")
    flags.DEFINE_string("prompt", None, "Text to continue.")
    flags.DEFINE_integer("new_tokens", 20, "Greedy tokens to generate.")
    flags.DEFINE_string("checkpoint", None, "Model checkpoint (default: the run's "
                        "lm.checkpoint).")
    flags.DEFINE_string("hook", None, "Hook point (default: the SAE's).")
    flags.DEFINE_integer("top", 10, "Tokens shown per direction of change.")
    flags.DEFINE_list("promoted", None, "The tokens to measure the steering on (vocabulary "
                      "entries, e.g. ĠRome); default: the latent's logit-lens tokens.")
    flags.DEFINE_bool("prepend_bos", True, "Start the prompt with the model's BOS token "
                      "(<|endoftext|> for GPT-2).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("mesh_model", 1, "Devices that split the LM (tensor parallel: its "
                         "heads, MLP and vocabulary); its query heads must divide it.")


def main(argv):
    (path,) = cli.positional(argv, 1, "python -m saejax.analysis.steer DIR --latent=I "
                                      "--mode=add --value=5 --prompt='...'")
    cli.setup()
    values = flags.FLAGS
    if values.latent is None or values.prompt is None:
        raise AnalysisError("--latent and --prompt are required.")
    print(steer_run(path, latent=values.latent, prompt=values.prompt, mode=values.mode,
                    value=values.value, new_tokens=values.new_tokens,
                    checkpoint=values.checkpoint, hook=values.hook, top=values.top,
                    prepend_bos=values.prepend_bos, step=values.step,
                    promoted=values.promoted, mesh_model=values.mesh_model))


if __name__ == "__main__":
    cli.run(main, _define_flags)
