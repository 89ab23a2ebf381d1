"""The GPT-2 model against Hugging Face transformers, its checkpoints, hooks and tokenisation.

Every checkpoint and tokenizer is built here, tiny; nothing is downloaded.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import models
from saejax.models import gpt2, tokenizer as tok

TINY = gpt2.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def tiny_params():
    return models.init_params(jax.random.key(0), TINY)


def _tokens(config, batch=3, seq=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, config.vocab_size, jnp.int32)


# ------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved as safetensors, and its logits and hook activations."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=301,
                                        n_positions=64, bos_token_id=300, eos_token_id=300)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    path = str(tmp_path_factory.mktemp("hf_gpt2"))
    model.save_pretrained(path, safe_serialization=True)

    tokens = np.random.default_rng(0).integers(0, 301, (3, 20)).astype(np.int32)
    first = lambda out: out[0] if isinstance(out, tuple) else out
    captured = {}
    handles = []
    for i, block in enumerate(model.transformer.h):
        for name, module in (("hook_attn_out", block.attn), ("hook_mlp_out", block.mlp),
                             ("hook_resid_post", block), ("ln2.hook_normalized", block.ln_2)):
            hook = lambda mod, args, out, key=f"blocks.{i}.{name}": captured.__setitem__(
                key, first(out).detach().numpy())
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    for i in range(hf_config.n_layer):
        # hidden_states[i] is block i's input; the last entry is after ln_f, so not used.
        captured[f"blocks.{i}.hook_resid_pre"] = out.hidden_states[i].numpy()
        captured[f"blocks.{i}.hook_resid_mid"] = (captured[f"blocks.{i}.hook_resid_pre"]
                                                  + captured[f"blocks.{i}.hook_attn_out"])
        captured[f"blocks.{i}.hook_mlp_in"] = captured[f"blocks.{i}.hook_resid_mid"]
    return path, tokens, out.logits.numpy(), captured


def test_matches_transformers(hf_reference):
    path, tokens, logits, captured = hf_reference
    config, params = models.load_pretrained(path)
    assert config == gpt2.GPT2Config(vocab_size=301, n_positions=64, n_embd=64, n_layer=2,
                                     n_head=4)
    names = models.hook_names(config)
    assert sorted(captured) == sorted(names)
    ours, cache = models.make_forward(config, hooks=names)(params, tokens)
    np.testing.assert_allclose(ours, logits, atol=1e-4, rtol=0)
    for name in names:
        np.testing.assert_allclose(cache[name], captured[name], atol=1e-4, rtol=0, err_msg=name)


def test_transformers_reads_saved_checkpoint(hf_reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    path, tokens, logits, _ = hf_reference
    config, params = models.load_pretrained(path)
    gpt2.save_pretrained(tmp_path, config, params)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded = model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(reloaded, logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def test_save_load_round_trip(tiny_params, tmp_path):
    gpt2.save_pretrained(tmp_path, TINY, tiny_params)
    with open(tmp_path / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["model_type"] == "gpt2"
    assert hf_config["architectures"] == ["GPT2LMHeadModel"]
    config, params = models.load_pretrained(tmp_path)
    assert config == TINY
    assert jax.tree.structure(params) == jax.tree.structure(tiny_params)
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)


def test_init_is_gpt2s(tiny_params):
    assert isinstance(tiny_params, dict)
    std = lambda x: float(np.std(np.asarray(x)))
    assert std(tiny_params["embed"]) == pytest.approx(0.02, rel=0.1)
    # Residual projections are scaled by 1/sqrt(2 * n_layer).
    assert std(tiny_params["blocks"]["mlp"]["down"][0]) == pytest.approx(0.01, rel=0.1)
    np.testing.assert_array_equal(tiny_params["blocks"]["ln2"]["scale"][1], 1.0)


def _write_checkpoint(path, tensors, config=TINY, hf_overrides=None):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_hf_dict(), **(hf_overrides or {})}, f)
    save_file(tensors, os.path.join(path, "model.safetensors"))


def test_checkpoint_errors_are_clear(tiny_params, tmp_path):
    gpt2.save_pretrained(tmp_path / "good", TINY, tiny_params)
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    tensors = load_file(str(tmp_path / "good" / "model.safetensors"))

    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        models.load_pretrained(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_pretrained(tmp_path / "empty")
    os.remove(tmp_path / "good" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load_pretrained(tmp_path / "good")

    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    _write_checkpoint(tmp_path / "missing", missing)
    with pytest.raises(KeyError, match=r"'h\.1\.mlp\.c_fc\.bias' is missing"):
        models.load_pretrained(tmp_path / "missing")

    wrong = dict(tensors, **{"transformer.h.0.attn.c_attn.weight": np.zeros((96, 32), np.float32)})
    _write_checkpoint(tmp_path / "wrong", wrong)
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight'.*\(96, 32\).*\(32, 96\)"):
        models.load_pretrained(tmp_path / "wrong")

    extra = dict(tensors, **{"transformer.h.0.attn.bias": np.zeros((1, 1, 16, 16), np.float32),
                             "lm_head.weight": tensors["transformer.wte.weight"]})
    _write_checkpoint(tmp_path / "buffers", extra)
    models.load_pretrained(tmp_path / "buffers")  # mask buffers and a tied lm_head are fine
    _write_checkpoint(tmp_path / "deeper", dict(tensors, **{"h.2.ln_1.weight": np.ones(32)}))
    with pytest.raises(ValueError, match=r"does not have: \['h\.2\.ln_1\.weight'\]"):
        models.load_pretrained(tmp_path / "deeper")

    _write_checkpoint(tmp_path / "relu", tensors, hf_overrides={"activation_function": "relu"})
    with pytest.raises(ValueError, match="activation_function='relu'"):
        models.load_pretrained(tmp_path / "relu")
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        gpt2.GPT2Config.from_hf_dict({"scale_attn_by_inverse_layer_idx": True})


# ------------------------------------------------------------------------------------------------
# Hooks, interventions, stop_at_layer
# ------------------------------------------------------------------------------------------------

def test_hook_names():
    names = models.hook_names(TINY)
    assert len(names) == 7 * TINY.n_layer
    assert names[0] == "blocks.0.hook_resid_pre" and names[-1] == "blocks.1.hook_resid_post"
    assert "blocks.0.hook_mlp_in" in names and "blocks.1.ln2.hook_normalized" in names
    assert models.hook_layer("blocks.1.hook_mlp_out") == 1
    assert models.hook_layer("blocks.1.ln2.hook_normalized") == 1
    with pytest.raises(ValueError, match="not a hook name"):
        models.hook_layer("resid_post")


def test_unknown_hook_name_lists_valid_ones(tiny_params):
    tokens = _tokens(TINY)
    with pytest.raises(ValueError, match=r"blocks\.7\.hook_resid_post.*\(2 layers\)"):
        models.forward(tiny_params, tokens, TINY, hooks=["blocks.7.hook_resid_post"])
    with pytest.raises(ValueError, match="unknown hook name"):
        models.make_forward(TINY, interventions={"resid": lambda x: x})
    with pytest.raises(ValueError, match="stop_at_layer=1"):
        models.make_forward(TINY, hooks=["blocks.1.hook_resid_pre"], stop_at_layer=1)


def test_interventions(tiny_params):
    tokens = _tokens(TINY)
    hook = "blocks.0.hook_attn_out"
    logits, _ = models.make_forward(TINY)(tiny_params, tokens)
    same, _ = models.make_forward(TINY, interventions={hook: lambda x: x})(tiny_params, tokens)
    # Not bit-equal: without hooks the blocks run as one scanned body, which XLA fuses
    # differently from the unrolled blocks around a hook.
    np.testing.assert_allclose(same, logits, atol=1e-6, rtol=0)
    ablated, cache = models.make_forward(TINY, hooks=[hook, "blocks.0.hook_resid_mid",
                                                    "blocks.0.hook_resid_pre"],
                                       interventions={hook: jnp.zeros_like})(tiny_params, tokens)
    assert np.max(np.abs(ablated - logits)) > 1e-3
    # The cache holds what the model saw downstream: the ablated value.
    np.testing.assert_array_equal(cache[hook], 0.0)
    np.testing.assert_array_equal(cache["blocks.0.hook_resid_mid"],
                                  cache["blocks.0.hook_resid_pre"])

    # An intervention that closes over a traced value (here a steering vector) inside jit.
    @jax.jit
    def steered(params, direction):
        add = {"blocks.1.hook_resid_post": lambda x: x + direction}
        return models.forward(params, tokens, TINY, interventions=add)[0]
    np.testing.assert_allclose(steered(tiny_params, jnp.zeros(TINY.n_embd)), logits, atol=1e-6)
    # Not a constant vector: ln_f would subtract it away again.
    direction = jax.random.normal(jax.random.key(1), (TINY.n_embd,))
    assert np.max(np.abs(steered(tiny_params, direction) - logits)) > 1e-3


def test_stop_at_layer_matches_full_forward(tiny_params):
    tokens = _tokens(TINY)
    hooks = models.hook_names(TINY)[:7]  # all of block 0
    _, full = models.make_forward(TINY, hooks=hooks)(tiny_params, tokens)
    logits, early = models.make_forward(TINY, hooks=hooks, stop_at_layer=1)(tiny_params, tokens)
    assert logits is None
    assert sorted(early) == sorted(hooks)
    for name in hooks:
        assert early[name].shape == (3, 12, TINY.n_embd)
        np.testing.assert_allclose(early[name], full[name], atol=1e-6, err_msg=name)


def test_bfloat16_activations(tiny_params):
    tokens = _tokens(TINY)
    hook = "blocks.1.hook_resid_post"
    logits, cache = models.make_forward(TINY, hooks=[hook])(tiny_params, tokens)
    logits16, cache16 = models.make_forward(TINY, hooks=[hook], dtype=jnp.bfloat16)(tiny_params,
                                                                                  tokens)
    assert cache16[hook].dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    np.testing.assert_allclose(cache16[hook].astype(jnp.float32), cache[hook], atol=0.05)
    np.testing.assert_allclose(logits16, logits, atol=0.05)


# ------------------------------------------------------------------------------------------------
# Tokenisation
# ------------------------------------------------------------------------------------------------

TEXTS = ["The cat sat on the mat.", "A dog ran in the park and the cat watched.",
         "Sparse autoencoders find features in the residual stream."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=[tok.END_OF_TEXT], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 4, trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_tokenize_texts(tokenizer_dir):
    tokenizer = tok.load_tokenizer(tokenizer_dir)
    eot = tokenizer.token_to_id(tok.END_OF_TEXT)
    stream = np.concatenate([[eot] + tokenizer.encode(t).ids for t in TEXTS])
    sequences = tok.tokenize_texts(tokenizer, TEXTS, 8)
    assert sequences.dtype == np.int32
    assert sequences.shape == (len(stream) // 8, 8)
    np.testing.assert_array_equal(sequences.reshape(-1), stream[:sequences.size])
    assert sequences[0, 0] == eot
    assert tokenizer.decode(sequences[0, 1:].tolist()).startswith("The cat")
    assert tok.tokenize_texts(tokenizer, TEXTS, 8, bos_token_id=5)[0, 0] == 5
    with pytest.raises(ValueError, match="fewer than one sequence"):
        tok.tokenize_texts(tokenizer, TEXTS[:1], 1000)
    with pytest.raises(TypeError, match="list of documents"):
        tok.tokenize_texts(tokenizer, TEXTS[0], 8)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tok.load_tokenizer(tokenizer_dir / "nowhere")


def test_load_token_ids(tmp_path):
    def saved(name, array):
        np.save(tmp_path / name, array)
        return tmp_path / name

    flat = saved("flat.npy", np.arange(50, dtype=np.uint16))
    sequences = tok.load_token_ids(flat, 16)
    assert sequences.dtype == np.int32 and sequences.shape == (3, 16)
    np.testing.assert_array_equal(sequences.reshape(-1), np.arange(48))
    grid = saved("grid.npy", np.arange(48, dtype=np.int64).reshape(3, 16))
    np.testing.assert_array_equal(tok.load_token_ids(grid, 16), sequences)

    with pytest.raises(ValueError, match="length 16 but context_length=8"):
        tok.load_token_ids(grid, 8)
    with pytest.raises(ValueError, match="float32 values"):
        tok.load_token_ids(saved("float.npy", np.zeros(64, np.float32)), 16)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 16\)"):
        tok.load_token_ids(saved("cube.npy", np.zeros((2, 2, 16), np.int32)), 16)
    with pytest.raises(ValueError, match="50 tokens, fewer than one sequence"):
        tok.load_token_ids(flat, 64)
    with pytest.raises(ValueError, match="token id 47, out of range for vocab_size=40"):
        tok.load_token_ids(grid, 16, vocab_size=40)
    with pytest.raises(FileNotFoundError):
        tok.load_token_ids(tmp_path / "nowhere.npy", 16)
