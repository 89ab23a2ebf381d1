"""The probing evaluations registered with the suite (`python -m saejax.evals WORKDIR
--evals=absorption_first_letter,sparse_probing,meta_sae,kpis`):

- "absorption_first_letter": SAEBench's feature absorption (`first_letter`), on the run's LM
  and its tokenizer alone;
- "sparse_probing": SAEBench's sparse probing on the plays' genres and on Shakespeare against
  Milton, split by work (`sparse_probing`; the plays from `--texts`, default
  `$SAEJAX_ASSETS/shakespeare`, Milton from a `milton` folder beside it);
- "meta_sae": the decoder-structure evaluation (`meta_sae`), the decoder alone; it trains a
  meta-SAE, so it runs only when named (`--evals=...,meta_sae`);
- "kpis": feature sparsity and concept coverage of the first letters and the genres (`kpis`).

What depends only on the model and the hook (the words' and windows' activations, the letter
probes, the probes on the model's own activations) is computed once per process and shared by
every run of a sweep.
"""

from __future__ import annotations

import os
import time

import numpy as np

from saejax.evals import first_letter, kpis, meta_sae, sparse_probing, suite

_SHARED: dict = {}  # (what, checkpoint, hook, options) -> (the model-side data, seconds)


def _shared(context: suite.Context, what: str, build):
    key = (what, str(context.config.lm.checkpoint), context.lm.hook,
           tuple(sorted((k, str(v)) for k, v in context.options.items())))
    if key not in _SHARED:
        start = time.perf_counter()
        _SHARED[key] = build(), time.perf_counter() - start
    return _SHARED[key][0]


def shared_seconds() -> dict[str, float]:
    """Seconds each model-side piece took to build (once per process, shared by the runs)."""
    return {key[0]: seconds for key, (_, seconds) in _SHARED.items()}


def _tokenizer(context: suite.Context):
    from saejax import models  # pylint: disable=import-outside-toplevel
    return models.load_tokenizer(str(context.config.lm.checkpoint))


def _excluded(context: suite.Context) -> tuple[int, ...]:
    from saejax.data import lm  # pylint: disable=import-outside-toplevel
    return lm.exclusion(context.config.lm, context.lm)[1]


def word_data(context: suite.Context) -> first_letter.WordData:
    return _shared(context, "words", lambda: first_letter.word_data(
        context.lm, _tokenizer(context), exclude_ids=_excluded(context),
        max_words=int(context.options.get("max_words", 4000)),
        n_icl_examples=int(context.options.get("icl_examples", 10))))


def _encode(context: suite.Context):
    return lambda x: np.asarray(context.loaded.encode(x))


@suite.register("absorption_first_letter", needs=("lm",),
                description="SAEBench feature absorption: first-letter probes on the model's "
                "vocabulary, k-sparse main latents, absorption fraction and full absorption")
def absorption(context: suite.Context) -> dict:
    data = word_data(context)
    result = first_letter.evaluate(_encode(context), context.loaded.decoder_directions(),
                                   data.train, data.test, probe=data.probe)
    details = result.pop("details")
    saebench_fields = ("first_letter", "mean_absorption_fraction", "full_absorption_rate",
                       "num_full_absorption", "num_probe_true_positives", "num_split_features")
    return {"eval_config": {"model_name": str(context.config.lm.checkpoint),
                            "prompt_template": first_letter.TEMPLATE, "max_k_value": 10,
                            "f1_jump_threshold": 0.03, "min_GT_probe_f1": 0.6,
                            "n_words": int(len(data.train[1]) + len(data.test[1]))},
            "eval_result_metrics": {"mean": {k: v for k, v in result.items()
                                             if k != "letters_evaluated"}},
            "eval_result_details": [{k: d[k] for k in saebench_fields} for d in details],
            "eval_result_unstructured": {"letters_evaluated": result["letters_evaluated"],
                                         "details": details,
                                         "model_side_seconds": shared_seconds()}}


def datasets(context: suite.Context) -> dict[str, tuple]:
    """The labelled sets here: {name: (folders, classes)}. The genres of the plays in
    `--texts` (default `$SAEJAX_ASSETS/shakespeare`); Shakespeare against Milton when a
    `milton` folder sits beside it (`python -m saejax.models.fetch --only=milton`)."""
    folder = context.texts_folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sparse_probing reads the plays from --texts={folder!r}, "
                                "which is not a folder; python -m saejax.models.fetch "
                                "--only=shakespeare --out=DIR writes DIR/shakespeare.")
    found = {"shakespeare_genre": (folder, sparse_probing.GENRES)}
    milton = os.path.join(os.path.dirname(os.path.abspath(folder)), "milton")
    if os.path.isdir(milton):
        found["shakespeare_milton"] = ({"shakespeare": folder, "milton": milton},
                                       sparse_probing.AUTHORS)
    return found


def context_length(context: suite.Context) -> int:
    """SAEBench's 128 tokens a window, or the model's positions if it has fewer."""
    return min(128, int(context.lm.config.max_positions))


def _all_windows(context: suite.Context) -> tuple[dict[str, int], sparse_probing.Examples]:
    """Every work of every data set run through the model once (the plays belong to both):
    {path: work index} and the windows' `Examples`, labelled by work index."""
    def build():
        from saejax.data import lm  # pylint: disable=import-outside-toplevel
        from saejax.models import tokenizer as tokenizers  # pylint: disable=import-outside-toplevel
        tokenizer = _tokenizer(context)
        bos = tokenizers.window_bos_id(tokenizer, context.lm.config.bos_token_id)
        texts = {}
        for folders, classes in datasets(context).values():
            for work in sparse_probing.labelled_works(folders, classes):
                texts.setdefault(_path(folders, classes, work), work.text)
        index = {path: i for i, path in enumerate(sorted(texts))}
        works = [sparse_probing.Work(path, i, texts[path]) for path, i in index.items()]
        windows, work_of = sparse_probing.work_windows(
            tokenizer, works, context_length=context_length(context), bos_token_id=bos,
            windows_per_work=int(context.options.get("windows_per_work", 24)))
        positions = lm.exclusion(context.config.lm, context.lm)[0] or (0,)
        return index, sparse_probing.examples(lm.activations_fn(context.lm), context.lm.params,
                                              windows, work_of, exclude_positions=positions)
    return _shared(context, "windows", build)


def _path(folders, classes, work: sparse_probing.Work) -> str:
    folder = folders if isinstance(folders, str) else folders[list(classes)[work.label]]
    return os.path.join(folder, work.name + ".txt")


def dataset_examples(context: suite.Context, name: str):
    """(train, test) `sparse_probing.Examples` of dataset `name` at the run's hook (split by
    work), and the LLM's own probe accuracies."""
    folders, classes = datasets(context)[name]

    def build():
        index, windows = _all_windows(context)
        parts = []
        for part in sparse_probing.split_by_work(sparse_probing.labelled_works(folders, classes)):
            label_of = {index[_path(folders, classes, w)]: w.label for w in part}
            rows = np.flatnonzero(np.isin(windows.labels, list(label_of)))
            parts.append(sparse_probing.Examples(
                windows.activations[rows], np.array([label_of[i] for i in windows.labels[rows]]),
                windows.kept))
        return parts, sparse_probing.llm_results(*parts, classes=tuple(classes))
    return _shared(context, name, build)


@suite.register("sparse_probing", needs=("lm", "texts"),
                description="SAEBench sparse probing (k = 1, 2, 5) on the plays' genres and "
                "Shakespeare against Milton, split by work, against probes on the model's "
                "activations")
def sparse_probing_eval(context: suite.Context) -> dict:
    details, unstructured, sizes = [], {}, {}
    for name, (_, classes) in datasets(context).items():
        (train, test), (llm, llm_per_class) = dataset_examples(context, name)
        sae, sae_per_class = sparse_probing.evaluate(_encode(context), train, test,
                                                     classes=tuple(classes))
        details.append({"dataset_name": f"{name}_results", **llm, **sae})
        unstructured[f"{name}_results"] = {**llm_per_class, **sae_per_class}
        sizes[name] = {"train_windows": int(len(train.labels)),
                       "test_windows": int(len(test.labels))}
    means = {k: float(np.mean([d[k] for d in details])) for k in details[0]
             if k != "dataset_name"}   # SAEBench: the mean over the data sets
    return {"eval_config": {"model_name": str(context.config.lm.checkpoint),
                            "dataset_names": list(sizes), "k_values": [1, 2, 5],
                            "context_length": context_length(context), "split": "by work",
                            "windows": sizes},
            "eval_result_metrics": {"llm": {k: v for k, v in means.items()
                                            if k.startswith("llm_")},
                                    "sae": {k: v for k, v in means.items()
                                            if k.startswith("sae_")}},
            "eval_result_details": details,
            "eval_result_unstructured": {**unstructured,
                                         "model_side_seconds": shared_seconds()}}


@suite.register("meta_sae", by_default=False,
                description="A BatchTopK meta-SAE (k = 4, d meta-latents) trained on the unit "
                "decoder rows: its FVU, L0 and the fraction of latents that decompose")
def meta_sae_eval(context: suite.Context) -> dict:
    steps = int(context.options.get("meta_steps", 2000))
    folder = os.path.join(context.workdir, "analysis", "meta_sae")
    result = meta_sae.evaluate(context.loaded.decoder_directions(), folder, steps=steps)
    return {"eval_config": {"k": result["k"], "n_meta_latents": result["n_meta_latents"],
                            "steps": steps, "min_explained": result["min_explained"]},
            "eval_result_metrics": {"meta_sae": {k: result[k] for k in
                                                 ("meta_fvu", "meta_l0",
                                                  "decomposed_fraction")}}}


@suite.register("kpis", needs=("lm", "texts"), description="Feature sparsity ratio, alive fraction, "
                "and concept coverage (first letters, genres) at F1 >= 0.5")
def kpis_eval(context: suite.Context) -> dict:
    encode = _encode(context)
    words = word_data(context)
    (_, test), _ = dataset_examples(context, "shakespeare_genre")
    x = test.activations[:, test.kept].reshape(-1, test.activations.shape[-1])
    token_latents = encode(x)
    token_genres = np.repeat(test.labels, int(test.kept.sum()))
    letters = kpis.concept_coverage(encode(words.test[0]), words.test[1],
                                    list(first_letter.LETTERS))
    genres = kpis.concept_coverage(token_latents, token_genres, list(sparse_probing.GENRES))
    concepts = letters["concepts"] + genres["concepts"]
    return {"eval_config": {"min_f1": letters["min_f1"], "concept_rows": {
                "first_letters": "test words", "genres": "tokens of the test works"}},
            "eval_result_metrics": {
                "sparsity": kpis.feature_sparsity(token_latents),
                "coverage": {"concept_coverage": float(np.mean([c["covered"] for c in concepts])),
                             "first_letter_coverage": letters["coverage"],
                             "genre_coverage": genres["coverage"]}},
            "eval_result_details": concepts}
