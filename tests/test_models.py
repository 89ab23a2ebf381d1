"""Every LM family against Hugging Face transformers: a tiny random model built and saved by
transformers itself, read by saejax, compared at every hook and at the logits (float32, 1e-4) on
a sequence longer than the sliding window; plus the interface every caller relies on (hook
names, their errors, config checks, sharded checkpoints, the chunked losses)."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import models
from saejax.evals import downstream

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ, WINDOW, VOCAB = 12, 4, 101
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama": ("LlamaConfig", dict(_SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(_SMALL, num_key_value_heads=2, rope_parameters=_LLAMA3)),
    "mistral": ("MistralConfig", dict(_SMALL, num_key_value_heads=2, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(_SMALL, num_key_value_heads=2, use_sliding_window=True,
                                  sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(_SMALL, num_key_value_heads=2, head_dim=8,
                                  tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(_SMALL, num_key_value_heads=2, head_dim=8,
                                    query_pre_attn_scalar=16, sliding_window=WINDOW,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        _SMALL, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=16,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6}})),
    "gpt_neox": ("GPTNeoXConfig", dict(_SMALL, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(_SMALL, use_parallel_residual=False)),
}


def _hf_modules(model, case):
    """Per layer: (layer, the module whose output is attn_out, the norm the MLP reads, the
    module whose output is mlp_out)."""
    if case.startswith("gpt_neox"):
        return [(l, l.attention, l.post_attention_layernorm, l.mlp)
                for l in model.gpt_neox.layers]
    if case.startswith("gemma"):
        return [(l, l.post_attention_layernorm, l.pre_feedforward_layernorm,
                 l.post_feedforward_layernorm) for l in model.model.layers]
    return [(l, l.self_attn, l.post_attention_layernorm, l.mlp) for l in model.model.layers]


def _capture(model, case, tokens):
    """Logits and every hook's activation from transformers' forward, by module hooks."""
    first = lambda out: (out[0] if isinstance(out, tuple) else out).detach().numpy()
    captured, handles = {}, []

    def put(key, value):
        captured[key] = value

    for i, (layer, attn, norm2, mlp) in enumerate(_hf_modules(model, case)):
        b = f"blocks.{i}."
        handles += [
            layer.register_forward_pre_hook(
                lambda m, args, kwargs, b=b: put(b + "hook_resid_pre", first(
                    args[0] if args else kwargs["hidden_states"])), with_kwargs=True),
            layer.register_forward_hook(lambda m, a, out, b=b: put(b + "hook_resid_post",
                                                                   first(out))),
            attn.register_forward_hook(lambda m, a, out, b=b: put(b + "hook_attn_out",
                                                                  first(out))),
            norm2.register_forward_pre_hook(lambda m, args, b=b: put(b + "hook_mlp_in",
                                                                     first(args[0]))),
            norm2.register_forward_hook(lambda m, a, out, b=b: put(b + "ln2.hook_normalized",
                                                                   first(out))),
            mlp.register_forward_hook(lambda m, a, out, b=b: put(b + "hook_mlp_out", first(out))),
        ]
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long()).logits.numpy()
    for handle in handles:
        handle.remove()
    parallel = case == "gpt_neox"
    for i in range(len(_hf_modules(model, case))):
        if not parallel:
            captured[f"blocks.{i}.hook_resid_mid"] = captured[f"blocks.{i}.hook_mlp_in"]
    return logits, captured


def _build(case, path):
    class_name, kwargs = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random everything, norms too, so a w vs (1 + w) slip shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_models")
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    out = {}
    for case in CASES:
        path = str(root / case)
        model = _build(case, path)
        out[case] = (path, *_capture(model, case, tokens))
    return tokens, out


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(checkpoints, case):
    tokens, built = checkpoints
    path, logits, captured = built[case]
    lm = models.load(path)
    names = models.hook_names(lm.config)
    assert sorted(names) == sorted(captured)
    ours, cache = models.make_forward(lm.config, hooks=names)(lm.params, tokens)
    for name in names:
        np.testing.assert_allclose(cache[name], captured[name], atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(ours, logits, atol=1e-4, rtol=0)
    # Without hooks, alike blocks run as one scanned body.
    scanned, _ = models.make_forward(lm.config)(lm.params, tokens)
    np.testing.assert_allclose(scanned, logits, atol=1e-4, rtol=0)


def test_families_read_what_sets_them_apart(checkpoints):
    _, built = checkpoints
    configs = {case: models.load(path).config for case, (path, *_) in built.items()}
    assert configs["mistral"].layer_windows == (WINDOW, WINDOW)
    assert configs["qwen2"].layer_windows == (None, WINDOW) and configs["qwen2"].qkv_bias
    assert configs["qwen3"].qk_norm and configs["qwen3"].tie_word_embeddings
    assert configs["llama3_rope"].rope.rope_type == "llama3"
    assert configs["gemma2"].layer_windows == (WINDOW, None)
    assert configs["gemma2"].final_logit_softcapping == 1.5
    g3 = configs["gemma3_text"]
    assert g3.qk_norm and (g3.rope_local.theta, g3.rope_global.factor) == (10000.0, 2.0)
    assert configs["gpt_neox"].rope.partial_rotary_factor == 0.5


def test_parallel_block_has_no_resid_mid(checkpoints):
    tokens, built = checkpoints
    lm = models.load(built["gpt_neox"][0])
    assert "blocks.0.hook_resid_mid" not in models.hook_names(lm.config)
    assert "blocks.0.hook_mlp_in" in models.hook_names(lm.config)
    with pytest.raises(ValueError, match="no 'hook_resid_mid'"):
        models.make_forward(lm.config, hooks=["blocks.0.hook_resid_mid"])
    with pytest.raises(ValueError, match=r"\(2 layers\)"):
        models.check_hook(lm.config, "blocks.2.hook_resid_post")
    assert models.hook_error(lm.config, "blocks.1.ln2.hook_normalized") is None


def test_mlp_in_intervention_changes_only_the_mlp_input(checkpoints):
    tokens, built = checkpoints
    lm = models.load(built["llama"][0])
    hooks = ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    _, clean = models.make_forward(lm.config, hooks=hooks, stop_at_layer=1)(lm.params, tokens)
    _, cut = models.make_forward(lm.config, hooks=hooks, stop_at_layer=1, interventions={
        "blocks.0.hook_mlp_in": jnp.zeros_like})(lm.params, tokens)
    np.testing.assert_array_equal(cut["blocks.0.hook_resid_mid"], clean["blocks.0.hook_resid_mid"])
    np.testing.assert_allclose(cut["blocks.0.hook_resid_post"] - cut["blocks.0.hook_mlp_out"],
                               clean["blocks.0.hook_resid_mid"], atol=1e-6)
    assert np.max(np.abs(cut["blocks.0.hook_mlp_out"] - clean["blocks.0.hook_mlp_out"])) > 1e-3


def test_sharded_checkpoint_loads_the_same(checkpoints, tmp_path):
    _, built = checkpoints
    path = built["gemma3_text"][0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert not os.path.isfile(tmp_path / "model.safetensors")
    whole, sharded = models.load(path), models.load(tmp_path)
    assert whole.config == sharded.config
    jax.tree.map(np.testing.assert_array_equal, whole.params, sharded.params)


def test_sharded_load_reads_the_same_params_for_every_family(checkpoints):
    # Each device's block read alone from the file (models/lazy.py) equals the whole read.
    from saejax import sharding  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(types.SimpleNamespace(data=2, model=4))
    for case, (path, _, _) in checkpoints[1].items():
        whole, split = models.load(path), models.load(path, mesh=mesh)
        jax.tree.map(np.testing.assert_array_equal, whole.params, split.params)
        q = split.params["blocks"]["attn"]["q"]
        assert q.sharding.shard_shape(q.shape)[2] == 1, case


def test_config_fields_are_checked(checkpoints, tmp_path):
    _, built = checkpoints
    with open(os.path.join(built["qwen3"][0], "config.json")) as f:
        d = json.load(f)
    models.config_from_hf_dict(d)
    with pytest.raises(ValueError, match="model_type='mamba'"):
        models.config_from_hf_dict(dict(d, model_type="mamba"))
    with pytest.raises(ValueError, match="mystery_setting=3"):
        models.config_from_hf_dict(dict(d, mystery_setting=3))
    models.config_from_hf_dict(dict(d, mystery_setting=None))  # off is harmless
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        models.config_from_hf_dict(dict(d, rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with open(os.path.join(built["gemma2"][0], "config.json")) as f:
        g = json.load(f)
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        models.config_from_hf_dict(dict(g, use_bidirectional_attention=True))


def test_chunked_losses_equal_full_logits(checkpoints):
    tokens, built = checkpoints
    lm = models.load(built["gemma2"][0])  # soft-capped final logits
    cfg = lm.config
    w_u, cap = models.unembedding(lm.params, cfg), cfg.final_logit_softcapping
    ablate = {"blocks.1.hook_resid_pre": jnp.zeros_like}

    @jax.jit
    def both(params):
        full = lambda **kw: models.forward(params, tokens, cfg, **kw)[0]
        logits, ablated_logits = full(), full(interventions=ablate)
        log_p, log_q = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(ablated_logits, -1)
        ce = -jnp.take_along_axis(log_p[:, :-1], tokens[:, 1:, None], -1)[..., 0]
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
        hidden, ablated = full(unembed=False), full(unembed=False, interventions=ablate)
        # A shifted last chunk (101 = 6 x 16 + 5), and one chunk larger than the vocabulary.
        chunked = [(models.vocab.next_token_losses(hidden, tokens, w_u, softcap=cap, chunk=c),
                    models.vocab.kl_divergences(hidden, ablated, w_u, softcap=cap, chunk=c))
                   for c in (16, 4096)]
        return ce, kl, chunked

    ce, kl, chunked = both(lm.params)
    for chunked_ce, chunked_kl in chunked:
        np.testing.assert_allclose(chunked_ce, ce, atol=1e-5)
        np.testing.assert_allclose(chunked_kl, kl, atol=1e-5)


def test_init_params_match_specs_for_every_family(checkpoints):
    _, built = checkpoints
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    for case, (path, *_) in built.items():
        lm = models.load(path)
        params = jax.eval_shape(lambda k, c=lm.config: models.init_params(k, c), jax.random.key(0))
        assert shapes(params) == shapes(lm.params), case
        axes = models.param_axes(lm.config)
        jax.tree.map(lambda x, a: len(a) == x.ndim or pytest.fail(case), params, axes,
                     is_leaf=lambda a: isinstance(a, tuple))
        assert axes["blocks"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
    gemma = models.param_specs(models.load(built["gemma3_text"][0]).config)
    assert gemma["blocks"]["ln1"].value == 0.0  # (1 + w) norms start at w = 0
    assert gemma["embed"].std == 0.02


def test_harvest_and_loss_recovered_read_any_family(checkpoints, tmp_path):
    from saejax import harvest  # pylint: disable=import-outside-toplevel
    from saejax.data import lm, store  # pylint: disable=import-outside-toplevel
    _, built = checkpoints
    path = built["gemma3_text"][0]
    sequences = np.random.default_rng(1).integers(0, VOCAB, (6, SEQ)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", sequences)
    hook = "blocks.1.ln2.hook_normalized"
    result = harvest.harvest(path, str(tmp_path / "tokens.npy"), str(tmp_path / "stores"),
                             hooks=[hook], context_length=SEQ, batch_sequences=2,
                             chunk_rows=SEQ * 2, progress_every_s=1e9)
    model = lm.from_checkpoint(path, hook)
    expected = lm.activations_fn(model)(model.params, sequences)
    # The first position and the special tokens are left out; every other row is where the
    # store says it is.
    opened = store.open_store(result["stores"][hook])
    where = opened.positions(0, opened.n_rows)
    assert 0 < opened.n_rows < 6 * SEQ and not np.any(where[:, 1] == 0)
    np.testing.assert_allclose(opened.read(0, opened.n_rows).result(),
                               np.asarray(expected)[where[:, 0], where[:, 1]], atol=1e-5)

    # Splicing in a perfect reconstruction recovers all the loss, and the chunked CE is the CE
    # of the full logits.
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    metrics, = downstream.evaluate(model, sequences, batch_sequences=3, mesh=mesh,
                                   reconstruct=lambda p, x: x * p, sae_params=[1.0])
    logits, _ = models.make_forward(model.config)(model.params, sequences)
    log_p = jax.nn.log_softmax(logits, -1)
    ce = -jnp.take_along_axis(log_p[:, :-1], sequences[:, 1:, None], -1)[..., 0]
    assert metrics["ce_clean"] == pytest.approx(float(jnp.mean(ce)), abs=1e-5)
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_clean"], abs=1e-6)
    assert metrics["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_zero_ablation"] > 1e-3
    assert models.unembedding(model.params, model.config).shape == (32, VOCAB)


def test_hub_configs_parse():
    """config.json as the hub holds it (older transformers: rope_theta, rope_scaling,
    rope_local_base_freq), for SmolLM2-135M and Gemma 3 270M."""
    smollm2 = models.config_from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
        "use_cache": True, "vocab_size": 49152})
    assert (smollm2.head_dim, smollm2.rope.theta, smollm2.bos_token_id) == (64, 100000.0, 1)
    gemma3 = models.config_from_hf_dict({
        "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False, "attn_logit_softcapping": None, "bos_token_id": 2,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation":
        "gelu_pytorch_tanh", "hidden_size": 640, "intermediate_size": 2048,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
        + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": 512, "use_bidirectional_attention": False,
        "vocab_size": 262144})
    assert gemma3.layer_windows[4:7] == (512, None, 512)
    assert (gemma3.rope_global.theta, gemma3.rope_local.theta) == (1e6, 1e4)
    with pytest.raises(ValueError, match="rope_interleaved=True"):
        models.config_from_hf_dict({"model_type": "llama", "rope_interleaved": True})


def test_bfloat16_activations(checkpoints):
    tokens, built = checkpoints
    lm = models.load(built["gemma3_text"][0])
    hook = "blocks.1.hook_resid_post"
    logits, cache = models.make_forward(lm.config, hooks=[hook])(lm.params, tokens)
    logits16, cache16 = models.make_forward(lm.config, hooks=[hook], dtype=jnp.bfloat16)(
        lm.params, tokens)
    assert cache16[hook].dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(cache[hook])))
    np.testing.assert_allclose(cache16[hook].astype(jnp.float32), cache[hook], atol=0.03 * scale)
    np.testing.assert_allclose(logits16, logits, atol=0.05)
