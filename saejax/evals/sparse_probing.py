"""Sparse probing (SAEBench's `sparse_probing`, Gurnee et al. 2023's k-sparse probes) on the
labelled text here: which genre of Shakespeare play a window of text comes from (comedy,
tragedy or history, as the First Folio files them), and whether it is Shakespeare's or
Milton's, with the works split into train and test works so that the names of a work's
characters cannot give its label away.

Each example is one window of `context_length` tokens; its features are the mean over the
window's tokens (the excluded positions left out) of the activations at the hook, or of the
SAE's latents. Per class, SAEBench's balanced one-vs-rest set; a logistic probe on the k
latents whose means differ most between the classes (k = 1, 2, 5), against a probe on every
activation dimension and one on every latent. Accuracy on the test works, averaged over the
classes, under SAEBench's names (`llm_test_accuracy`, `sae_top_1_test_accuracy`, ...).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from saejax.evals import probing

# The First Folio's catalogue (1623) of the plays in the `shakespeare` package, by file name;
# Pericles (not in the Folio) and Troilus and Cressida (filed between the histories and the
# tragedies) are left out.
GENRES = {
    "comedy": ("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor",
               "measure_for_measure", "comedy_of_errors", "much_ado_about_nothing",
               "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
               "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
                "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_iii",
                "henry_viii"),
    "tragedy": ("coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello",
                "antony_and_cleopatra", "cymbeline"),
}


# Shakespeare's plays against Milton's works (`python -m saejax.models.fetch --only=milton`):
# the four that overlap no other (Comus is inside the L'Allegro volume, the poetical works
# hold them all; the Latin Poemata would make the task a language test).
MILTON = ("paradise_lost_(no_introduction)", "paradise_regained", "areopagitica",
          "lallegro_il_penseroso_comus_and_lycidas")
AUTHORS = {"shakespeare": sum(GENRES.values(), ()), "milton": MILTON}


class Work(NamedTuple):
    name: str
    label: int
    text: str


def labelled_works(folders: str | dict[str, str],
                   classes: dict[str, Sequence[str]] = GENRES) -> list[Work]:
    """The works of `classes` (class name -> file stems) found as `<folder>/<stem>.txt`, the
    folder one for all or one per class."""
    works = []
    for label, (name, stems) in enumerate(classes.items()):
        folder = folders if isinstance(folders, str) else folders[name]
        for stem in stems:
            path = os.path.join(folder, stem + ".txt")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    works.append(Work(stem, label, f.read()))
    missing = [name for i, name in enumerate(classes) if not any(w.label == i for w in works)]
    if missing:
        raise FileNotFoundError(f"{folders}: no work of class {missing}; expected files such "
                                f"as {classes[missing[0]][0]}.txt (python -m "
                                "saejax.models.fetch --only=shakespeare,milton writes them).")
    return works


def split_by_work(works: Sequence[Work], *, test_fraction: float = 0.3, seed: int = 0
                  ) -> tuple[list[Work], list[Work]]:
    """(train, test) works: per class, a `test_fraction` of its works (at least one, and at
    least one left to train on) is held out whole."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted({w.label for w in works}):
        mine = [works[i] for i in rng.permutation([i for i, w in enumerate(works)
                                                   if w.label == label])]
        if len(mine) < 2:
            raise ValueError(f"class {label} has {len(mine)} work; splitting by work needs "
                             "at least two per class.")
        n_test = min(max(1, round(len(mine) * test_fraction)), len(mine) - 1)
        test += mine[:n_test]
        train += mine[n_test:]
    return train, test


def work_windows(tokenizer, works: Sequence[Work], *, context_length: int,
                 windows_per_work: int, bos_token_id: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Up to `windows_per_work` windows [n, context_length] of each work's tokens, spread
    evenly over it (after `bos_token_id` when the model expects one), and their labels [n]."""
    body = context_length - (bos_token_id is not None)
    windows, labels = [], []
    for work in works:
        ids = np.asarray(tokenizer.encode(work.text, add_special_tokens=False).ids, np.int32)
        n = len(ids) // body
        for start in np.linspace(0, n - 1, min(n, windows_per_work)).astype(int) * body:
            window = ids[start:start + body]
            if bos_token_id is not None:
                window = np.concatenate([[bos_token_id], window]).astype(np.int32)
            windows.append(window)
            labels.append(work.label)
    return np.stack(windows), np.asarray(labels, np.int32)


class Examples(NamedTuple):
    """Per-token activations [n, context, d] of the windows, their labels [n], and the
    positions that count in the means (bool [context])."""

    activations: np.ndarray
    labels: np.ndarray
    kept: np.ndarray

    def mean(self, encode=None) -> np.ndarray:
        """[n, d] mean activations over the kept positions, or of `encode`'s latents."""
        x = self.activations[:, self.kept]
        if encode is None:
            return x.mean(axis=1)
        flat = np.asarray(encode(x.reshape(-1, x.shape[-1])))
        return flat.reshape(x.shape[0], x.shape[1], -1).mean(axis=1)


def examples(activations_fn, params, windows, labels, *, exclude_positions=(0,),
             batch_size: int = 16) -> Examples:
    """The windows run through the model to the hook (`data.lm.activations_fn`)."""
    out = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        pad = batch_size - len(batch)
        full = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)]) if pad else batch
        out.append(np.asarray(activations_fn(params, jnp.asarray(full)))[:len(batch)])
    kept = np.ones(windows.shape[1], bool)
    kept[list(exclude_positions)] = False
    return Examples(np.concatenate(out).astype(np.float32), np.asarray(labels), kept)


def probe_accuracies(train_x, train_labels, test_x, test_labels, *, ks: Sequence[int] = (),
                     seed: int = 0) -> dict[str, dict[int, float]]:
    """Per class (one vs the rest, SAEBench's balanced sets), the test accuracy of a logistic
    probe on every feature (`"all"`) and on the top k by mean difference (`k`). The classes'
    probes are fitted together, their sets padded to one size."""
    rng = np.random.default_rng(seed)
    classes = [int(c) for c in np.unique(train_labels)]
    train_sets = [probing.balanced_one_vs_rest(train_labels, c, rng) for c in classes]
    test_sets = [probing.balanced_one_vs_rest(test_labels, c, rng) for c in classes]
    width = max(len(rows) for rows, _ in train_sets)
    padded = lambda a: np.pad(a, (0, width - len(a)))
    index = np.stack([padded(rows) for rows, _ in train_sets])            # [classes, width]
    y = np.stack([padded(labels) for _, labels in train_sets])
    valid = np.stack([padded(np.ones(len(rows), bool)) for rows, _ in train_sets])
    x = np.asarray(train_x, np.float32)[index]                            # [classes, width, d]
    results = {}
    for key in ("all", *ks):
        features = [np.arange(x.shape[-1]) if key == "all" else probing.top_k_mean_difference(
            x[i][valid[i]], y[i][valid[i]], key) for i in range(len(classes))]
        # Zero columns up to the largest k (their weights stay 0): one compiled solve for all k.
        pad = 0 if key == "all" else max(ks) - key
        chosen = np.pad(np.stack([x[i][:, f] for i, f in enumerate(features)]),
                        ((0, 0), (0, 0), (0, pad)))
        probes = probing.fit_logistic_many(chosen, y, rows=valid)
        results[key] = {}
        for i, (c, (rows, labels)) in enumerate(zip(classes, test_sets)):
            probe = probing.LinearProbe(probes.weight[i, :len(features[i])], probes.bias[i])
            results[key][c] = probing.accuracy(
                probe.logits(np.asarray(test_x, np.float32)[rows][:, features[i]]), labels)
    return results


def _named(prefix: str, accuracies: dict, classes: Sequence[str]) -> tuple[dict, dict]:
    means, per_class = {}, {}
    for key, by_class in accuracies.items():
        name = f"{prefix}_test_accuracy" if key == "all" else f"{prefix}_top_{key}_test_accuracy"
        means[name] = float(np.mean(list(by_class.values())))
        per_class[name] = {classes[c]: v for c, v in by_class.items()}
    return means, per_class


def llm_results(train: Examples, test: Examples, *, ks=(1, 2, 5),
                classes: Sequence[str] = tuple(GENRES), seed: int = 0) -> tuple[dict, dict]:
    """The probes on the model's own mean activations (the same for every SAE at the hook)."""
    return _named("llm", probe_accuracies(train.mean(), train.labels, test.mean(),
                                          test.labels, ks=ks, seed=seed), classes)


def evaluate(encode, train: Examples, test: Examples, *, ks=(1, 2, 5),
             classes: Sequence[str] = tuple(GENRES), seed: int = 0) -> tuple[dict, dict]:
    """The probes on the SAE's mean latents: (SAEBench's `sae_*` means, per class)."""
    return _named("sae", probe_accuracies(train.mean(encode), train.labels, test.mean(encode),
                                          test.labels, ks=ks, seed=seed), classes)
