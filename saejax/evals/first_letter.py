"""Feature absorption on a real LM (Chanin et al. 2024, as SAEBench's `absorption` eval runs
it): does the latent for "starts with S" stay silent on words where another latent has taken
the direction over?

1. The words: the model's own vocabulary's single tokens that are alphabetic (a leading space
   allowed), each put in SAEBench's in-context prompt (`{word} has the first letter:` after
   `n_icl_examples` answered examples); the activation is the hook's at the word's position.
2. Ground truth: a logistic probe per letter on the activations (train words), the letter's
   direction; its true positives on the test words are where the letter is "present".
3. The SAE's latents for each letter: an L1 probe over all latents ranks them; k-sparse
   probes on the top k (k = 1..max_k) are scored by F1 on the test words, and k grows while
   F1 jumps by more than `f1_jump` (feature splitting): those are the letter's main latents.
4. On each true positive: the absorption fraction (how much of the probe's projection other
   latents carry instead of the main ones) and full absorption (the main latents are silent and
   the top projecting latent carries it) with SAEBench's thresholds; `evals.absorption_rate`
   is the full-absorption count, the same definition as the synthetic hierarchy's.

Runs with nothing but the model and its tokenizer; `benchmarks/saebench_evals.py` runs it on
SmolLM2.
"""

from __future__ import annotations

import re
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saejax import evals
from saejax.evals import probing

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"  # SAEBench's prompt; the answer follows it


class Words(NamedTuple):
    """The vocabulary words of the eval: token ids [n], their text, first letters [n] (0..25)."""

    token_ids: np.ndarray
    text: list[str]
    letters: np.ndarray


def alphabetic_words(tokenizer, *, exclude_ids=()) -> Words:
    """Every vocabulary token whose text is ASCII letters only, after one optional leading
    space (SAEBench's `get_alpha_tokens`); byte tokens and `exclude_ids` are left out."""
    ids, texts = [], []
    exclude = set(int(i) for i in exclude_ids)
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token_id in exclude or re.search(r"[\d<>]", token):
            continue
        text = tokenizer.decode([token_id])
        word = text[1:] if text.startswith(" ") else text
        if word and all(ch in string.ascii_letters for ch in word):
            ids.append(token_id)
            texts.append(text)
    letters = np.array([LETTERS.index(t.strip()[0].lower()) for t in texts], np.int32)
    return Words(np.array(ids, np.int32), texts, letters)


def split_words(words: Words, *, max_words: int, train_fraction: float = 0.8,
                seed: int = 0) -> tuple[Words, Words]:
    """A random `max_words` of the words (0: all), split into train and test words."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(words.token_ids))[:max_words or None]
    cut = int(len(order) * train_fraction)
    pick = lambda idx: Words(words.token_ids[idx], [words.text[i] for i in idx],
                             words.letters[idx])
    return pick(order[:cut]), pick(order[cut:])


def prompt_token_ids(tokenizer, words: Words, *, examples: Words, n_icl_examples: int,
                     bos_token_id: int | None, seed: int = 0) -> tuple[np.ndarray, int]:
    """[n_words, length] prompts of equal length (the word and the examples are one token
    each) and the word's position: `n_icl_examples` examples (`{word} has the first letter:
    W` lines, drawn from `examples` without the word) then `{word} has the first letter:`."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    suffix = encode(TEMPLATE.format(word=""))
    newline = encode("\n")
    rng = np.random.default_rng(seed)
    prompts = []
    for token_id in words.token_ids:
        ids = [] if bos_token_id is None else [int(bos_token_id)]
        candidates = np.flatnonzero(examples.token_ids != token_id)
        for j in rng.choice(candidates, size=n_icl_examples, replace=False):
            answer = encode(" " + examples.text[j].strip()[0].upper())[:1]
            ids += [int(examples.token_ids[j])] + suffix + answer + newline
        prompts.append(ids + [int(token_id)] + suffix)
    position = len(prompts[0]) - len(suffix) - 1
    return np.array(prompts, np.int32), position


def word_activations(activations_fn, params, prompts: np.ndarray, position: int, *,
                     batch_size: int = 64) -> np.ndarray:
    """[n_words, d] activations at the hook at `position` (`data.lm.activations_fn`)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        pad = batch_size - len(batch)  # one compiled shape for every batch
        full = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)]) if pad else batch
        out.append(np.asarray(activations_fn(params, jnp.asarray(full))[:, position])[
            :len(batch)])
    return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------------------------------------
# The letter probes and the SAE's main latents for each letter.
# ------------------------------------------------------------------------------------------
def letter_probes(x, letters) -> probing.LinearProbe:
    """One balanced logistic probe per letter on activations [n, d]: weight [26, d]."""
    targets = np.asarray(letters)[None, :] == np.arange(len(LETTERS))[:, None]
    return probing.fit_logistic_many(x, targets, balanced=True)


@jax.jit
def _l1_probe(latents, targets, l1_decay):
    """SAEBench's L1 multi-probe: BCE with positive weights plus `l1_decay` times the mean
    over probes of |w|_1, full-batch Adam from 1e-2 decaying to 1e-5."""
    steps = 200
    positives = jnp.sum(targets, axis=0)
    pos_weight = (targets.shape[0] - positives) / jnp.maximum(positives, 1)
    params = (jnp.zeros((latents.shape[1], targets.shape[1])), jnp.zeros(targets.shape[1]))

    def loss(params):
        w, b = params
        z = latents @ w + b
        log_p, log_not_p = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
        bce = -(pos_weight * targets * log_p + (1 - targets) * log_not_p)
        return jnp.mean(bce) + l1_decay * jnp.mean(jnp.sum(jnp.abs(w), axis=0))

    tx = optax.adamw(optax.exponential_decay(1e-2, steps, 1e-3), weight_decay=1e-6)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params[0]


def main_latents(train_latents, train_letters, test_latents, test_letters, *, max_k: int,
                 f1_jump: float, l1_decay: float = 0.01) -> tuple[list[list[int]], np.ndarray]:
    """Per letter, the latents of its k-sparse probe at the k where F1 stopped jumping by more
    than `f1_jump` (SAEBench's feature splits), and the F1 [26, max_k] of every k."""
    targets = jax.nn.one_hot(jnp.asarray(train_letters), len(LETTERS))
    ranking = np.asarray(_l1_probe(jnp.asarray(train_latents), targets, l1_decay))
    order = np.argsort(-ranking.T, axis=1, kind="stable")[:, :max_k]   # [26, max_k]
    is_letter = np.asarray(train_letters)[None, :] == np.arange(len(LETTERS))[:, None]
    test_is_letter = np.asarray(test_letters)[:, None] == np.arange(len(LETTERS))[None, :]
    f1 = np.zeros((len(LETTERS), max_k))
    train_top = np.moveaxis(np.asarray(train_latents)[:, order], 1, 0)  # [26, n, max_k]
    test_top = np.asarray(test_latents)[:, order]                       # [n, 26, max_k]
    for k in range(1, max_k + 1):
        # The latents past k are zeroed (their weights then stay 0): one compiled solve.
        keep = (np.arange(max_k) < k).astype(np.float32)
        probes = probing.fit_logistic_many(train_top * keep, is_letter, balanced=True)
        logits = np.einsum("npk,pk->np", test_top * keep, np.asarray(probes.weight))
        predicted = logits + np.asarray(probes.bias) > 0
        f1[:, k - 1] = np.diag(probing.f1_scores(predicted, test_is_letter))
    splits = []
    for letter in range(len(LETTERS)):
        best, chosen = -np.inf, []
        for k in range(1, max_k + 1):   # grow k while F1 jumps; stop at the first that does not
            if f1[letter, k - 1] <= best + f1_jump:
                break
            best, chosen = f1[letter, k - 1], [int(i) for i in order[letter, :k]]
        splits.append(chosen)
    return splits, f1


# ------------------------------------------------------------------------------------------
# Absorption on the probe's true positives.
# ------------------------------------------------------------------------------------------
class Thresholds(NamedTuple):
    """SAEBench's (`FeatureAbsorptionCalculator`) thresholds."""

    full_cos: float = 0.025        # the top projecting latent's cosine with the probe, at least
    fraction_cos: float = 0.1      # a candidate absorber's cosine with the probe, at least
    proportion: float = 0.4        # absorbers' share of the probe projection, at least
    max_absorbers: int = 3         # latents that may together make up for the main ones
    eps: float = 1e-8              # a main latent below this is silent


def absorption_scores(latents, activations, decoder, direction, main,
                      thresholds: Thresholds = Thresholds()
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row where the concept is present, SAEBench's calculation: the absorption fraction
    [rows], whether a main latent fires [rows], and whether the top projecting latent carries
    the concept [rows] (full absorption is the last without the second: `evals.absorption_rate`
    counts it). A latent's projection is what it adds at the hook
    along the unit `direction` (activation times its decoder row's dot with it: SAEBench's
    activation times cosine, for unit decoder rows and unscaled inputs).

    Args:
      latents: `[rows, n]` the SAE's latents. activations: `[rows, d]` the raw activations.
      decoder: `[n, d]` decoder rows in raw units. direction: `[d]` the probe direction.
      main: `[k]` the concept's main latents.
    """
    direction = np.asarray(direction, np.float32)
    direction = direction / np.linalg.norm(direction)
    decoder = np.asarray(decoder, np.float32)
    along = decoder @ direction                                      # [n]
    cosines = along / np.maximum(np.linalg.norm(decoder, axis=1), 1e-12)
    latents = np.asarray(latents, np.float32)
    projections = latents * along                                    # [rows, n]
    total = np.asarray(activations, np.float32) @ direction          # [rows]
    is_main = np.zeros(latents.shape[1], bool)
    is_main[np.asarray(main, np.int64)] = True
    main_projection = projections[:, is_main].sum(axis=1)
    candidates = np.where((~is_main & (cosines >= thresholds.fraction_cos))[None]
                          & (projections > 0), projections, 0.0)
    k = min(thresholds.max_absorbers, candidates.shape[1])
    absorbers = -np.sort(-candidates, axis=1)[:, :k].sum(axis=1)
    share = np.divide(absorbers, total, out=np.full_like(total, -np.inf), where=total != 0)
    partial = np.minimum(absorbers, total - main_projection)
    fraction = np.where(
        (main_projection >= total) | (share < thresholds.proportion), 0.0,
        np.where(main_projection <= 0, 1.0,
                 np.clip(partial / np.maximum(partial + main_projection, 1e-30), 0, 1)))
    top = np.argmax(projections, axis=1)
    top_projection = projections[np.arange(len(top)), top]
    carried = ((cosines[top] >= thresholds.full_cos) & (total >= 0)
               & (top_projection >= thresholds.proportion * total))
    main_fires = (latents[:, is_main] >= thresholds.eps).any(axis=1)
    return fraction.astype(np.float32), main_fires, carried


def evaluate(encode, decoder, train: tuple, test: tuple, *, probe: probing.LinearProbe,
             max_k: int = 10, f1_jump: float = 0.03, min_probe_f1: float = 0.6,
             thresholds: Thresholds = Thresholds()) -> dict:
    """SAEBench's absorption metrics of one SAE: per letter the mean absorption fraction and
    the full absorption rate over the probe's true positives, and the number of split
    latents; their means over the letters whose probe reaches `min_probe_f1` on the test
    words.

    Args:
      encode: raw activations [rows, d] -> latents [rows, n]. decoder: [n, d] in raw units.
      train, test: (activations [rows, d], letters [rows]) of the train and test words.
      probe: `letter_probes` of the train activations (one per model and hook, shared).
    """
    (x_train, y_train), (x_test, y_test) = train, test
    z_train, z_test = np.asarray(encode(x_train)), np.asarray(encode(x_test))
    splits, f1_by_k = main_latents(z_train, y_train, z_test, y_test, max_k=max_k,
                                   f1_jump=f1_jump)
    logits = np.asarray(probe.logits(x_test))
    details = []
    for letter, main in enumerate(splits):
        is_letter = y_test == letter
        probe_f1 = probing.f1(logits[:, letter] > 0, is_letter)
        present = is_letter & (logits[:, letter] > 0)
        rows = np.flatnonzero(present)
        fraction, main_fires, carried = absorption_scores(
            z_test[rows], x_test[rows], decoder, np.asarray(probe.weight[letter]), main,
            thresholds)
        details.append({
            "first_letter": LETTERS[letter],
            "mean_absorption_fraction": float(fraction.mean()) if len(rows) else 0.0,
            "full_absorption_rate": float(evals.absorption_rate(
                jnp.ones(len(rows), bool), jnp.asarray(main_fires), jnp.asarray(carried))),
            "num_full_absorption": int(np.sum(~main_fires & carried)),
            "num_probe_true_positives": int(len(rows)),
            "num_split_features": len(main),
            "probe_f1": probe_f1, "split_latents": main,
            "sparse_f1_by_k": [float(v) for v in f1_by_k[letter]]})
    kept = [d for d in details if d["probe_f1"] >= min_probe_f1 and d["num_probe_true_positives"]]
    mean = lambda key: float(np.mean([d[key] for d in kept])) if kept else float("nan")
    std = lambda key: float(np.std([d[key] for d in kept], ddof=1)) if len(kept) > 1 else 0.0
    return {"mean_absorption_fraction_score": mean("mean_absorption_fraction"),
            "mean_full_absorption_score": mean("full_absorption_rate"),
            "mean_num_split_features": mean("num_split_features"),
            "std_dev_absorption_fraction_score": std("mean_absorption_fraction"),
            "std_dev_full_absorption_score": std("full_absorption_rate"),
            "std_dev_num_split_features": std("num_split_features"),
            "letters_evaluated": len(kept), "details": details}


class WordData(NamedTuple):
    """What `evaluate` reads for one model and hook, computed once for every SAE there."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    probe: probing.LinearProbe
    words: tuple[Words, Words]


def word_data(model, tokenizer, *, max_words: int = 4000, n_icl_examples: int = 10,
              batch_size: int = 64, exclude_ids=(), seed: int = 0) -> WordData:
    """The train and test words' activations at `model`'s hook (a `data.lm.LanguageModel`)
    in SAEBench's prompts, and the letter probes on the train ones."""
    from saejax.data import lm  # pylint: disable=import-outside-toplevel
    words = alphabetic_words(tokenizer, exclude_ids=exclude_ids)
    if len(words.token_ids) <= n_icl_examples + 1:
        raise ValueError(f"the tokenizer has only {len(words.token_ids)} alphabetic tokens; "
                         f"lower n_icl_examples={n_icl_examples}.")
    train_words, test_words = split_words(words, max_words=max_words, seed=seed)
    from saejax.models import tokenizer as tokenizers  # pylint: disable=import-outside-toplevel
    bos = tokenizers.window_bos_id(tokenizer, model.config.bos_token_id)  # as it was trained
    forward = lm.activations_fn(model)
    data = []
    for part in (train_words, test_words):
        prompts, position = prompt_token_ids(tokenizer, part, examples=part,
                                             n_icl_examples=n_icl_examples,
                                             bos_token_id=bos, seed=seed)
        data.append((word_activations(forward, model.params, prompts, position,
                                      batch_size=batch_size), part.letters))
    return WordData(data[0], data[1], letter_probes(*data[0]), (train_words, test_words))
