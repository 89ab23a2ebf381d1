"""Text input and attention sinks: a folder of .txt files and a JSONL of documents become the
expected sequences with their documents; a long document gets a BOS per window where the
tokenizer says the model expects one; the harvest leaves the first position and the special
tokens out and records every row's (sequence, position); top activations' contexts are the
source text around each example, never across two documents; old stores still trace rows as
r // context, r % context."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import tiny_lm
from saejax import harvest, models, sae
from saejax.analysis import loading, top_activations, top_results
from saejax.data import lm, store
from saejax.errors import ConfigError
from saejax.models import tokenizer as tok

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 16
EOT = 0   # the tiny tokenizer's <|endoftext|>


def _documents(n=5, seed=1):
    rng = np.random.default_rng(seed)
    words = tiny_lm.WORDS
    return [" ".join(words[(int(rng.integers(len(words))) + i) % len(words)]
                     for i in range(int(rng.integers(3, 70)))) for _ in range(n)]


def _write_inputs(root, documents):
    """The same documents as a folder of .txt files, a .jsonl and a .txt (one per line)."""
    folder = root / "docs"
    folder.mkdir()
    for i, text in enumerate(documents):
        (folder / f"doc{i:02d}.txt").write_text(text)
    (folder / "notes.md").write_text("not a document")
    with open(root / "docs.jsonl", "w") as f:
        for text in documents:
            f.write(json.dumps({"text": text, "id": "ignored"}) + "\n")
    (root / "docs.txt").write_text("\n".join(documents) + "\n")
    return str(folder), str(root / "docs.jsonl"), str(root / "docs.txt")


def _checkpoint(root, *, bos_per_window=False):
    """A random 1-layer GPT-2 with the tiny tokenizer; with `bos_per_window`, its tokenizer
    puts <|endoftext|> first on encode (as Gemma's puts <bos>)."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    path = root / ("model_bos" if bos_per_window else "model")
    path.mkdir()
    tokenizer = tiny_lm.write_tokenizer(str(path))
    if bos_per_window:
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", EOT)])
        tokenizer.save(str(path / "tokenizer.json"))
    config = models.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64,
                               n_embd=32, n_layer=1, n_head=2)
    models.save_pretrained(str(path), config,
                           jax.device_get(models.init_params(jax.random.PRNGKey(0), config)))
    return str(path), tokenizer


def test_a_folder_and_a_jsonl_give_the_documents_in_order(tmp_path):
    documents = _documents()
    folder, jsonl, lines = _write_inputs(tmp_path, documents)
    assert tok.read_documents(folder) == documents
    assert tok.read_documents(jsonl) == documents
    checkpoint, tokenizer = _checkpoint(tmp_path)
    ids = [tokenizer.encode(d, add_special_tokens=False).ids for d in documents]
    stream = np.concatenate([[EOT, *t] for t in ids])
    owner = np.concatenate([[d] * (len(t) + 1) for d, t in enumerate(ids)])
    offset = np.concatenate([np.arange(-1, len(t)) for t in ids])
    n = len(stream) // CONTEXT
    for path in (folder, jsonl, lines):
        got = tok.load_token_sequences(path, CONTEXT, tokenizer_path=checkpoint)
        np.testing.assert_array_equal(got.tokens.reshape(-1), stream[:n * CONTEXT])
        np.testing.assert_array_equal(got.documents.reshape(-1), owner[:n * CONTEXT])
        np.testing.assert_array_equal(got.offsets.reshape(-1), offset[:n * CONTEXT])
    # Each token is where its document's offset says.
    got = tok.load_token_sequences(folder, CONTEXT, tokenizer_path=checkpoint)
    for t, d, o in zip(*(a.reshape(-1) for a in got)):
        assert (t == EOT and o == -1) or ids[d][o] == t
    with pytest.raises(ValueError, match=r"docs.jsonl:2: each line .* \"text\" string"):
        (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
        tok.read_documents(jsonl)
    with pytest.raises(ValueError, match="folder without .txt files"):
        tok.read_documents(str(tmp_path / "model"))


def test_a_long_document_gets_a_bos_per_window_where_the_model_expects_one(tmp_path):
    long = " ".join(tiny_lm.WORDS * 4)
    documents = [long, "alpha bravo", long]
    _, plain = _checkpoint(tmp_path)
    _, with_bos = _checkpoint(tmp_path, bos_per_window=True)
    assert tok.window_bos_id(plain, EOT) is None and tok.window_bos_id(with_bos, EOT) == EOT
    got = tok.tokenize_documents(with_bos, documents, CONTEXT)
    assert len(got) > 6
    np.testing.assert_array_equal(got.tokens[:, 0], EOT)
    assert np.all(got.offsets[:, 0] == -1)
    assert not np.any((got.tokens[:, :-1] == EOT) & (got.tokens[:, 1:] == EOT))  # never two
    # Without the BOS, the windows are the document's tokens in order, none lost or repeated.
    ids = with_bos.encode(long, add_special_tokens=False).ids
    first = got.offsets[got.documents == 0]
    np.testing.assert_array_equal(first[first >= 0], np.arange(len(ids)))
    encoded = [with_bos.encode(d, add_special_tokens=False).ids for d in documents]
    body = got.offsets >= 0
    np.testing.assert_array_equal(
        got.tokens[body], [encoded[d][o] for d, o in zip(got.documents[body], got.offsets[body])])
    # A tokenizer that adds no BOS (GPT-2's, SmolLM2's): windows cut the stream as before.
    assert tok.tokenize_documents(plain, documents, CONTEXT).tokens[1, 0] != EOT


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A folder of documents (some longer than a window) harvested with the default exclusion,
    with a model whose tokenizer puts BOS before every window."""
    root = tmp_path_factory.mktemp("text_input")
    documents = _documents(12, seed=3)
    folder, _, _ = _write_inputs(root, documents)
    checkpoint, _ = _checkpoint(root, bos_per_window=True)
    result = harvest.harvest(checkpoint, folder, str(root / "stores"), hooks=[HOOK],
                             context_length=CONTEXT, batch_sequences=4, chunk_rows=64,
                             progress_every_s=1e9)
    sequences = tok.load_token_sequences(folder, CONTEXT, tokenizer_path=checkpoint)
    return store.open_store(result["stores"][HOOK]), sequences, checkpoint


def test_the_harvest_leaves_sinks_out_and_records_each_rows_place(harvested):
    opened, sequences, _ = harvested
    n = opened.n_rows
    where = opened.positions(0, n)
    token_ids = opened.token_ids(0, n)
    assert opened.metadata["exclude_positions"] == [0]
    assert opened.metadata["exclude_token_ids"] == [0, 1]   # <|endoftext|>, <unk>
    assert not np.any(where[:, 1] == 0) and not np.any(token_ids == EOT)
    # Every token that is not a sink is a row, in order, at the place it records.
    keep = (np.arange(CONTEXT) > 0) & (sequences.tokens != EOT)
    assert n == keep.sum() and len(np.unique(where[:, 0])) == len(sequences)
    np.testing.assert_array_equal(where, np.argwhere(keep))
    np.testing.assert_array_equal(token_ids, sequences.tokens[where[:, 0], where[:, 1]])
    np.testing.assert_array_equal(
        opened.documents(0, n), np.stack([sequences.documents, sequences.offsets],
                                         -1)[where[:, 0], where[:, 1]])


def test_bad_exclusion_settings_name_the_flag(harvested, tmp_path):
    _, _, checkpoint = harvested
    folder, _, _ = _write_inputs(tmp_path, _documents())
    with pytest.raises(ConfigError, match=r"--exclude_positions=\[16\]: position 16 is outside"):
        harvest.harvest(checkpoint, folder, str(tmp_path / "s"), hooks=[HOOK],
                        context_length=CONTEXT, exclude_positions=[16])
    with pytest.raises(ConfigError, match=r"--exclude_token_ids='bos': use 'special'"):
        harvest.harvest(checkpoint, folder, str(tmp_path / "s"), hooks=[HOOK],
                        context_length=CONTEXT, exclude_token_ids="bos")
    assert lm.exclude_token_ids_of("", checkpoint, None) == ()
    assert lm.exclude_token_ids_of("5, 3", checkpoint, None) == (3, 5)


def _random_sae(d=32, n_latents=64):
    config = loading.sae_config_for("relu")
    params = jax.tree.map(np.asarray, sae.get("relu").init(jax.random.PRNGKey(1), d, n_latents,
                                                            config))
    params["b_enc"] = params["b_enc"] - 0.05   # a few latents fire on each token, not all
    return loading.LoadedSAE(params=params, input_scale=1.0, architecture=sae.get("relu"),
                             sae_config=config, source="/runs/random", kind="saejax", hook=HOOK,
                             data_source="store")


def test_top_contexts_are_the_source_text_around_each_example(harvested):
    opened, sequences, _ = harvested
    before, after = 5, 2
    top = top_activations.compute_top_activations(_random_sae(), opened.path, top_n=4,
                                                  context_before=before, context_after=after)
    assert top.n_rows == opened.n_rows
    keep = (np.arange(CONTEXT) > 0) & (sequences.tokens != EOT)
    checked = 0
    for latent in range(top.n_latents):
        for example in top.examples(latent):
            s, p = example["sequence"], example["position"]
            assert (s, p) == opened.sequence_position(example["row"])
            # The rows of the example's sequence and document: the text it reads.
            same = np.flatnonzero(keep[s] & (sequences.documents[s] == sequences.documents[s, p]))
            k = int(np.flatnonzero(same == p)[0])
            window = same[max(0, k - before):k + after + 1]
            assert example["context_token_ids"] == sequences.tokens[s, window].tolist()
            assert example["token_index"] == k - max(0, k - before)
            checked += 1
    assert checked > 50


def test_an_old_store_without_positions_still_traces_rows(tmp_path):
    rng = np.random.default_rng(0)
    n = 12 * CONTEXT
    writer = store.ActivationStoreWriter.create_or_open(
        str(tmp_path / "old"), d=32, dtype="float32", context_length=CONTEXT, n_tokens=n,
        chunk_rows=64)
    token_ids = rng.integers(2, 100, n).astype(np.int32)
    writer.write(0, rng.standard_normal((n, 32)).astype(np.float32), token_ids)
    opened = store.open_store(str(tmp_path / "old"))
    assert not opened.has_positions and "positions" not in opened.metadata
    assert opened.sequence_position(37) == (2, 5)
    np.testing.assert_array_equal(opened.positions(30, 34), [[1, 14], [1, 15], [2, 0], [2, 1]])
    top = top_activations.compute_top_activations(_random_sae(), opened.path, top_n=3,
                                                  context_before=4, context_after=1)
    for latent in range(8):
        for example in top.examples(latent):
            s, p = divmod(example["row"], CONTEXT)
            assert (example["sequence"], example["position"]) == (s, p)
            lo, hi = max(0, p - 4), min(CONTEXT, p + 2)
            assert example["context_token_ids"] == token_ids[s * CONTEXT + lo:
                                                             s * CONTEXT + hi].tolist()
    # A result written before positions were kept reads them back from its rows.
    directory = top_results.write(top, str(tmp_path / "top"))
    shutil.rmtree(os.path.join(directory, "positions"))
    summary_path = os.path.join(directory, "summary.json")
    with open(summary_path) as f:
        summary = json.load(f)
    summary["format_version"] = 1
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    again = top_results.read(directory)
    np.testing.assert_array_equal(again.positions, top.positions)
    assert again.examples(0) == top.examples(0)
