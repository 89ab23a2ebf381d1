"""Text and token ids into the fixed-length sequences a language model is run on.

Text comes as documents: a `.txt` file with one document per line, a folder of `.txt` files (a
document per file, in sorted file-name order) or a `.jsonl` file (`{"text": ...}` per line).
Each document is tokenised without the tokenizer's own special tokens, preceded by the
document separator (the model's BOS; GPT-2's `<|endoftext|>`), and the documents are packed
into one stream cut into full `context_length` windows (the remainder dropped). Where the model
expects a BOS at the start of every sequence, each window starts with one, so a long document
is split into windows that each begin with BOS (a separator that would fall at a window's
start is that BOS, never a second one). Whether the model expects one is read from its
tokenizer: a `tokenizer.json` whose post-processor adds BOS on encode (Gemma's) was trained with
it; one that adds none (GPT-2's, SmolLM2's) was not.

`TokenSequences` keeps, for every token, its document and its index in that document's tokens,
so what is traced back to text never runs across two documents. Pre-tokenised corpora come in
as `.npy` token ids (documents unknown: -1).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, NamedTuple

import numpy as np

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
NO_DOCUMENT = -1   # documents[] of a token whose document is unknown (.npy input)
INSERTED = -1      # offsets[] of a separator or window BOS saejax inserted


class TokenSequences(NamedTuple):
    """Token sequences with their documents, each int32 [n_sequences, context_length]."""

    tokens: np.ndarray
    documents: np.ndarray  # the document of each token (NO_DOCUMENT: unknown)
    offsets: np.ndarray    # its index in the document's tokens (INSERTED: a BOS/separator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return TokenSequences(*(a[index] for a in self))


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from `path/tokenizer.json` (or from `path` if it is the file)."""
    import tokenizers  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path!r}; a fast tokenizer's "
                                f"save_pretrained(dir) (or tokenizers.Tokenizer.save) writes one.")
    return tokenizers.Tokenizer.from_file(file)


def window_bos_id(tokenizer, bos_token_id: int | None) -> int | None:
    """`bos_token_id` if the tokenizer puts it first on encode (the model was trained with a BOS
    at the start of every sequence, as Gemma was), else None (GPT-2, SmolLM2)."""
    if bos_token_id is None:
        return None
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    return bos_token_id if ids and ids[0] == bos_token_id else None


def special_token_ids(tokenizer) -> list[int]:
    """The ids of the tokenizer's special tokens (BOS, EOS, padding, control tokens)."""
    return sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text input: a folder of `.txt` files (one document per file, sorted
    by name), a `.jsonl` file (one `{"text": ...}` object per line) or a text file (one
    document per non-blank line)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
        if not names:
            raise ValueError(f"{path!r} is a folder without .txt files; a text folder holds one "
                             f"document per .txt file.")
        documents = []
        for name in names:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                documents.append(f.read())
        return documents
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no text file or folder at {path!r}.")
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            return [line.rstrip("\n") for line in f if line.strip()]
        documents = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number} is not a JSON object ({e}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each line of a .jsonl of documents is an "
                                 f'object with a "text" string, e.g. {{"text": "..."}}.')
            documents.append(record["text"])
        return documents


def _separator_id(tokenizer, bos_token_id):
    if bos_token_id is not None:
        return bos_token_id
    separator = tokenizer.token_to_id(END_OF_TEXT)
    if separator is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT!r} token to separate documents; "
                         f"pass bos_token_id= (e.g. the model's BOS or EOS id).")
    return separator


def pack_documents(token_lists: list[list[int]], context_length: int, *, separator_id: int,
                   window_bos: int | None) -> TokenSequences:
    """Documents' token ids packed into full windows (see the module docstring)."""
    ids = [np.asarray([separator_id, *t], np.int32) for t in token_lists]
    stream = np.concatenate(ids or [np.zeros((0,), np.int32)])
    documents = np.concatenate([np.full(len(t), d, np.int32) for d, t in enumerate(ids)]
                               or [np.zeros((0,), np.int32)])
    offsets = np.concatenate([np.arange(-1, len(t) - 1, dtype=np.int32) for t in ids]
                             or [np.zeros((0,), np.int32)])
    if window_bos is None:
        n = len(stream) // context_length
        if n == 0:
            raise ValueError(f"the texts give {len(stream)} tokens (separators included), "
                             f"fewer than one sequence of context_length={context_length}.")
        return TokenSequences(*(a[:n * context_length].reshape(n, context_length)
                                for a in (stream, documents, offsets)))
    # Every window is BOS + context_length - 1 stream tokens; a separator at a window's start
    # is dropped, the window's BOS standing for it.
    windows, start, body = [], 0, context_length - 1
    while True:
        if start < len(stream) and offsets[start] == INSERTED:
            start += 1
        if start + body > len(stream):
            break
        windows.append(start)
        start += body
    if not windows:
        raise ValueError(f"the texts give {len(stream)} tokens (separators included), fewer "
                         f"than one sequence of context_length={context_length}.")
    index = np.asarray(windows)[:, None] + np.arange(body)
    return TokenSequences(
        np.concatenate([np.full((len(windows), 1), window_bos, np.int32), stream[index]], 1),
        np.concatenate([documents[index[:, :1]], documents[index]], 1),
        np.concatenate([np.full((len(windows), 1), INSERTED, np.int32), offsets[index]], 1))


def tokenize_documents(tokenizer, texts: Iterable[str], context_length: int, *,
                       bos_token_id: int | None = None) -> TokenSequences:
    """The documents `texts` tokenised and packed into windows with their document ids.

    `bos_token_id` (default: the tokenizer's `<|endoftext|>`) separates documents, and starts
    every window where the tokenizer puts it first on encode (`window_bos_id`). Holds the whole stream
    in memory: for large corpora, tokenise once and use `load_token_ids`.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one string.")
    separator = _separator_id(tokenizer, bos_token_id)
    # add_special_tokens=False: the separator and BOS are ours (Gemma's tokenizer would add a
    # second <bos>; a post-processor's CLS/SEP is not wanted).
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return pack_documents([e.ids for e in encodings], context_length, separator_id=separator,
                          window_bos=window_bos_id(tokenizer, separator))


def tokenize_texts(tokenizer, texts: Iterable[str], context_length: int, *,
                   bos_token_id: int | None = None) -> np.ndarray:
    """Token ids int32 [n_sequences, context_length] from a list of documents
    (`tokenize_documents` without the document ids)."""
    return tokenize_documents(tokenizer, texts, context_length, bos_token_id=bos_token_id).tokens


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


def is_text_input(path: str | os.PathLike) -> bool:
    """Whether `path` is read as text (anything but a `.npy` of token ids)."""
    return not os.fspath(path).endswith(".npy")


def load_token_sequences(path: str | os.PathLike, context_length: int, *,
                         tokenizer_path: str | os.PathLike | None = None,
                         vocab_size: int | None = None,
                         bos_token_id: int | None = None) -> TokenSequences:
    """Token sequences with their documents from what a user brings: a `.npy` of token ids (see
    `load_token_ids`; documents unknown), or text (`read_documents`: a .txt with one document
    per line, a folder of .txt files, a .jsonl) tokenised with the `tokenizer.json` in
    `tokenizer_path` (the model's checkpoint directory) and packed by `tokenize_documents`."""
    path = os.fspath(path)
    if not is_text_input(path):
        tokens = load_token_ids(path, context_length, vocab_size=vocab_size)
        unknown = np.full(tokens.shape, NO_DOCUMENT, np.int32)
        return TokenSequences(tokens, unknown, unknown.copy())
    if tokenizer_path is None:
        raise ValueError(f"{path!r} is not a .npy of token ids, so it is read as text; text "
                         f"needs the checkpoint's tokenizer.json (tokenizer_path).")
    sequences = tokenize_documents(load_tokenizer(tokenizer_path), read_documents(path),
                                   context_length, bos_token_id=bos_token_id)
    if vocab_size is not None and sequences.tokens.max() >= vocab_size:
        raise ValueError(f"{path!r}: the tokenizer at {tokenizer_path!r} produces id "
                         f"{int(sequences.tokens.max())}, outside the model's "
                         f"vocab_size={vocab_size}.")
    return sequences


def load_sequences(path: str | os.PathLike, context_length: int, *,
                   tokenizer_path: str | os.PathLike | None = None,
                   vocab_size: int | None = None,
                   bos_token_id: int | None = None) -> np.ndarray:
    """The token ids int32 [n_sequences, context_length] of `load_token_sequences`."""
    return load_token_sequences(path, context_length, tokenizer_path=tokenizer_path,
                                vocab_size=vocab_size, bos_token_id=bos_token_id).tokens
