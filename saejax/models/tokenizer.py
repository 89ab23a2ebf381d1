"""Text and token ids into the fixed-length sequences a language model is run on.

Documents are concatenated into one stream, each preceded by the separator (GPT-2's
`<|endoftext|>`), and cut into full `context_length` windows; the remainder is dropped so
every sequence is a full window. Pre-tokenised corpora come in as `.npy` token ids.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from `path/tokenizer.json` (or from `path` if it is the file)."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path!r}; a fast tokenizer's "
                                f"save_pretrained(dir) (or tokenizers.Tokenizer.save) writes one.")
    return tokenizers.Tokenizer.from_file(file)


def tokenize_texts(tokenizer, texts: Iterable[str], context_length: int, *,
                   bos_token_id: int | None = None) -> np.ndarray:
    """Token ids int32 [n_sequences, context_length] from a list of documents.

    Each document is preceded by `bos_token_id` (default: the tokenizer's `<|endoftext|>`),
    so that no sequence runs from one document into the next without a marker, as in GPT-2's
    training data. Holds the whole stream in memory: for large corpora, tokenise once and use
    `load_token_ids`.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one string.")
    if bos_token_id is None:
        bos_token_id = tokenizer.token_to_id(END_OF_TEXT)
        if bos_token_id is None:
            raise ValueError(f"the tokenizer has no {END_OF_TEXT!r} token to separate documents; "
                             f"pass bos_token_id= (e.g. the model's BOS or EOS id).")
    # add_special_tokens=False: the separator is ours; a post-processor's CLS/SEP is not wanted.
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    stream = np.concatenate([np.asarray([bos_token_id] + e.ids, np.int32) for e in encodings]
                            or [np.zeros((0,), np.int32)])
    n_sequences = len(stream) // context_length
    if n_sequences == 0:
        raise ValueError(f"the texts give {len(stream)} tokens (separators included), fewer than "
                         f"one sequence of context_length={context_length}.")
    return stream[:n_sequences * context_length].reshape(n_sequences, context_length)


def load_token_ids(path: str | os.PathLike, context_length: int, *,
                   vocab_size: int | None = None) -> np.ndarray:
    """Pre-tokenised ids from a `.npy` file as int32 [n_sequences, context_length].

    A 2-D array [n_sequences, context_length] is used as is; a 1-D stream of ids is cut into
    full sequences (the remainder dropped). With `vocab_size`, every id is checked to be below
    it, since an out-of-range id would silently read a clamped embedding row under jit.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token id file at {path!r}.")
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"{path} is not a single .npy array of token ids.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path} holds {ids.dtype} values; token ids must be integers "
                         f"(save them as int32, int64 or uint16).")
    if ids.ndim == 2:
        if ids.shape[1] != context_length:
            raise ValueError(f"{path} holds sequences of length {ids.shape[1]} but "
                             f"context_length={context_length}; set context_length="
                             f"{ids.shape[1]}, or save the ids flat (ids.reshape(-1)) to re-cut.")
        sequences = ids
    elif ids.ndim == 1:
        n_sequences = ids.shape[0] // context_length
        sequences = ids[:n_sequences * context_length].reshape(n_sequences, context_length)
    else:
        raise ValueError(f"{path} holds an array of shape {ids.shape}; expected a flat stream "
                         f"[n_tokens] or sequences [n_sequences, context_length].")
    if sequences.shape[0] == 0:
        raise ValueError(f"{path} holds {ids.size} tokens, fewer than one sequence of "
                         f"context_length={context_length}.")
    low, high = int(sequences.min()), int(sequences.max())
    if low < 0:
        raise ValueError(f"{path} holds a negative token id ({low}).")
    limit = np.iinfo(np.int32).max if vocab_size is None else vocab_size - 1
    if high > limit:
        what = "int32" if vocab_size is None else f"vocab_size={vocab_size}"
        raise ValueError(f"{path} holds token id {high}, out of range for {what}.")
    return np.asarray(sequences, np.int32)


def load_sequences(path: str | os.PathLike, context_length: int, *,
                   tokenizer_path: str | os.PathLike | None = None,
                   vocab_size: int | None = None,
                   bos_token_id: int | None = None) -> np.ndarray:
    """Token sequences int32 [n_sequences, context_length] from what a user brings: a `.npy`
    of token ids (see `load_token_ids`), or a text file with one document per line, tokenised
    with the `tokenizer.json` in `tokenizer_path` (the model's checkpoint directory), each
    document after `bos_token_id` (the model's BOS; default the tokenizer's <|endoftext|>)."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        return load_token_ids(path, context_length, vocab_size=vocab_size)
    if tokenizer_path is None:
        raise ValueError(f"{path!r} is not a .npy of token ids, so it is read as text; text "
                         f"needs the checkpoint's tokenizer.json (tokenizer_path).")
    with open(path, encoding="utf-8") as f:
        documents = [line.rstrip("\n") for line in f if line.strip()]
    sequences = tokenize_texts(load_tokenizer(tokenizer_path), documents, context_length,
                               bos_token_id=bos_token_id)
    if vocab_size is not None and sequences.max() >= vocab_size:
        raise ValueError(f"{path!r}: the tokenizer at {tokenizer_path!r} produces id "
                         f"{int(sequences.max())}, outside the model's vocab_size={vocab_size}.")
    return sequences
