"""A `tokenizer.json` rebuilt from what a GGUF file carries.

A GGUF has no tokenizer.json: it stores the vocabulary, the merges (byte-level BPE) or the pieces
and scores (SentencePiece), each token's type and the special token ids as metadata, under
llama.cpp's key names. `tokenizer_json` builds the `tokenizers` library's JSON for them, the same
tokenizer transformers builds from that file (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), so both give the same ids: byte-level BPE with the file's merges (GPT-2, SmolLM2,
Llama 3, Qwen); SentencePiece BPE with byte fallback for Llama 2 / Mistral and Gemma, the merges
recovered from the vocabulary (Gemma's in file order, others' by score).
"""

from saejax.models.gguf import GGUFError, field

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex its merges were learned with (others: GPT-2's).
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
           "deepseek-r1-qwen": _QWEN2_SPLIT}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the byte-level BPE alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_json(reader) -> dict:
    """The tokenizers-library JSON (a dict) of the tokenizer this GGUF describes."""
    model = field(reader, "tokenizer.ggml.model")
    arch = field(reader, "general.architecture")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
    if model == "gpt2":
        spec = _byte_level(reader, tokens)
    elif model == "llama":
        spec = _sentencepiece(reader, tokens, gemma=arch.startswith("gemma"))
    else:
        raise GGUFError(
            f"the GGUF tokenizer is {model!r}; saejax rebuilds 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece) tokenizers. Convert with --no_tokenizer and bring the "
            "model's own tokenizer.json")
    vocab = spec["model"]["vocab"]
    specials = _special_ids(reader, tokens)
    byte_level = model == "gpt2"
    alphabet = set(bytes_to_unicode().values())
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        spelled = tok if not byte_level else _byte_spelling(tok, alphabet)
        if kind == _CONTROL and byte_level and set(tok) - alphabet:
            continue  # llama.cpp mislabels these; transformers skips them too
        if kind == _CONTROL or i in specials.values() or (
                not byte_level and tok == "<mask>" and arch.startswith("gemma")):
            added.append(_added(vocab.get(spelled, i), tok, special=True))
        elif kind == _USER_DEFINED and spelled in vocab:
            added.append(_added(vocab[spelled], tok, special=False))
    spec["added_tokens"] = added
    spec["post_processor"] = _post_processor(reader, tokens, specials)
    return {"version": "1.0", "truncation": None, "padding": None, **spec}


def special_tokens(reader) -> dict[str, str]:
    """bos/eos/unk/pad token strings, for tokenizer_config.json."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    return {f"{k}_token": tokens[i] for k, i in _special_ids(reader, tokens).items()}


def add_bos(reader) -> bool:
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    default = field(reader, "tokenizer.ggml.model") == "llama"
    return bool(field(reader, "tokenizer.ggml.add_bos_token", default))


def _special_ids(reader, tokens) -> dict[str, int]:
    out = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        i = field(reader, f"tokenizer.ggml.{key}", None)
        if i is not None and 0 <= i < len(tokens):
            out[name] = i
    return out


def _added(i: int, content: str, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special}


def _byte_spelling(tok: str, alphabet: set) -> str:
    if set(tok) <= alphabet:
        return tok
    spell = bytes_to_unicode()
    return "".join(spell[b] for b in tok.encode("utf-8"))


def _byte_level(reader, tokens) -> dict:
    alphabet = set(bytes_to_unicode().values())
    vocab = {_byte_spelling(t, alphabet): i for i, t in enumerate(tokens)}
    merges = field(reader, "tokenizer.ggml.merges", None)
    if merges is None:
        raise GGUFError("the GGUF's byte-level BPE tokenizer has no tokenizer.ggml.merges")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    split = _SPLITS.get(field(reader, "tokenizer.ggml.pre", None))
    pre = byte_level if split is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
        dict(byte_level, use_regex=False)]}
    return {
        "normalizer": None,
        "pre_tokenizer": pre,
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in merges]},
    }


def _sentencepiece(reader, tokens, gemma: bool) -> dict:
    if gemma:
        # Gemma stores tokens of two or more spaces as spaces; its vocabulary spells them "▁".
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-i for i in range(len(tokens))]  # Gemma's merge order is the file's order
    else:
        scores = field(reader, "tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_vocab(vocab, dict(zip(tokens, scores)))
    unk = field(reader, "tokenizer.ggml.unknown_token_id", None)
    replace = {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}
    decoders = [replace, {"type": "ByteFallback"}, {"type": "Fuse"}]
    if gemma:
        normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        pre = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
               "invert": False}
    else:  # Llama 2 / Mistral: a prefix space before the first word
        normalizer = None
        pre = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
               "split": False}
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two
    pieces, best score first (then longer left, longer right, then vocabulary order), as
    transformers' `generate_merges` orders them, so both tokenizers merge alike."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _post_processor(reader, tokens, specials) -> dict:
    """BOS (and EOS) around each sequence, as the file's add_bos_token / add_eos_token say."""
    bos = specials.get("bos") if add_bos(reader) else None
    eos = specials.get("eos") if field(reader, "tokenizer.ggml.add_eos_token", False) else None

    def wrap(sequence, type_id):
        ids = [{"Sequence": {"id": sequence, "type_id": type_id}}]
        if bos is not None:
            ids.insert(0, {"SpecialToken": {"id": tokens[bos], "type_id": type_id}})
        if eos is not None:
            ids.append({"SpecialToken": {"id": tokens[eos], "type_id": type_id}})
        return ids

    special = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]}
               for i in (bos, eos) if i is not None}
    return {"type": "TemplateProcessing", "single": wrap("A", 0),
            "pair": wrap("A", 0) + wrap("B", 1), "special_tokens": special}
