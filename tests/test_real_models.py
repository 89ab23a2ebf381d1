"""saejax's own forward on the real SmolLM2-135M and Gemma 3 270M (their GGUFs converted by
`python -m saejax.models.fetch`) against transformers' own loading of the same GGUF files, on
real sentences: token ids, logits (1e-3), greedy tokens and a middle layer's residual stream.
The tiny variant of experiments/smollm2.py runs end to end on the real SmolLM2.

The assets come from SAEJAX_ASSETS (see tests/test_gguf.py): without it these tests skip, and
under CI=true they fail. Each model and its reference load once for the module.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import asset  # noqa: E402
from saejax import models  # noqa: E402
from saejax.models import convert, fetch  # noqa: E402

SENTENCES = [
    "To be, or not to be, that is the question:",
    "The quick brown fox jumps over the lazy dog, and 1234 dogs bark back.",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
]
REAL = {"smollm2": (fetch.SMOLLM2_GGUF, 15), "gemma3": (fetch.GEMMA3_GGUF, 9)}
NEW_TOKENS = 4


class Real:
    """One real model: saejax's (config, params) from the converted directory, transformers'
    model and tokenizer from the GGUF, and both models' outputs on SENTENCES, run as one batch
    padded at the end to one length (a causal model's earlier positions do not see the
    padding), so saejax compiles one program for every test."""

    def __init__(self, name, tmp_path):
        file, self.layer = REAL[name]
        path = asset("gguf", file, what=f"{name}'s GGUF")
        self.dir = os.path.join(os.environ["SAEJAX_ASSETS"], name)
        if not convert.is_converted(path, self.dir):  # converted by an older converter
            self.dir = convert.convert(path, str(tmp_path / name))
        self.config, self.params = models.load(self.dir)
        folder = os.path.dirname(path)
        # transformers' tokenizer of the converted directory: tests/test_gguf.py checks that it
        # gives the ids of transformers' tokenizer rebuilt from the GGUF (slow for
        # Gemma's 262k pieces, so paid there only).
        self.ref_tokenizer = transformers.AutoTokenizer.from_pretrained(self.dir)
        self.ref = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=torch.float32).eval()
        self.hook = f"blocks.{self.layer}.hook_resid_post"
        self.ids = [self.ref_tokenizer(s).input_ids for s in SENTENCES]
        self.tokens = np.zeros((len(SENTENCES), max(map(len, self.ids)) + NEW_TOKENS), np.int32)
        for row, ids in zip(self.tokens, self.ids):
            row[:len(ids)] = ids
        self.forward = jax.jit(functools.partial(models.forward, config=self.config,
                                                 hooks=(self.hook,)))
        logits, cache = self.forward(self.params, jnp.asarray(self.tokens))
        self.logits, self.resid = np.asarray(logits), np.asarray(cache[self.hook])
        with torch.no_grad():
            self.ref_out = self.ref(torch.from_numpy(self.tokens).long(),
                                    output_hidden_states=True)


@pytest.fixture(scope="module", params=sorted(REAL))
def real(request, tmp_path_factory):
    # transformers' GGUF loading opens the file twice and rebuilds gguf's tensor-name map for
    # every module (most of its load time); both are pure, so they are cached while it loads.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map",
                      functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=2)(gguf.GGUFReader))
        yield Real(request.param, tmp_path_factory.mktemp(request.param))


def test_token_ids_match_transformers_tokenizer(real):
    """saejax's tokenizer (models.load_tokenizer) gives transformers' tokenizer's ids, and the
    harvest's text path (models.tokenize_texts: the model's BOS, then the text) the same ids
    after one BOS."""
    tokenizer = models.load_tokenizer(real.dir)
    bos = real.config.bos_token_id
    for s, ids in zip(SENTENCES, real.ids):
        assert tokenizer.encode(s).ids == ids, s
        text_ids = ids[1:] if ids[0] == bos else ids
        harvested = models.tokenize_texts(tokenizer, [s], 1 + len(text_ids), bos_token_id=bos)
        assert harvested.tolist() == [[bos, *text_ids]], s


def test_logits_match_transformers_gguf_loading(real):
    want = real.ref_out.logits.numpy()
    for i, ids in enumerate(real.ids):
        got, ref = real.logits[i, :len(ids)], want[i, :len(ids)]
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0, err_msg=SENTENCES[i])
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_the_converted_directory_loads_in_transformers_as_the_gguf(real):
    """What `python -m saejax.models.convert` writes, loaded by transformers itself, gives the
    logits (1e-3) and argmax of transformers' own loading of the GGUF (the same reference
    model as saejax's forward is compared with above)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(real.dir,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(real.tokens).long()).logits.numpy()
    want = real.ref_out.logits.numpy()
    for i, ids in enumerate(real.ids):
        np.testing.assert_allclose(got[i, :len(ids)], want[i, :len(ids)], atol=1e-3, rtol=0,
                                   err_msg=SENTENCES[i])
        np.testing.assert_array_equal(got[i, :len(ids)].argmax(-1),
                                      want[i, :len(ids)].argmax(-1))


def test_middle_layer_resid_post_matches_transformers_hidden_states(real):
    """blocks.L.hook_resid_post is transformers' hidden_states[L + 1], the first (attention
    sink) position of huge norm included."""
    want = real.ref_out.hidden_states[real.layer + 1].numpy()
    for i, ids in enumerate(real.ids):
        got, ref = real.resid[i, :len(ids)], want[i, :len(ids)]
        scale = np.abs(ref).max(axis=-1, keepdims=True)  # per position: the sink is huge
        assert np.all(np.abs(got - ref) <= 1e-4 * scale + 1e-4), (
            np.abs(got - ref).max(), real.hook, SENTENCES[i])


def test_greedy_tokens_match_transformers_generate(real):
    """NEW_TOKENS greedy tokens per sentence from saejax's forward (the fixture's padded
    batch, each row's next token written over its padding) are transformers' generate's."""
    tokens, logits = real.tokens.copy(), real.logits
    for step in range(NEW_TOKENS):
        if step:
            logits = np.asarray(real.forward(real.params, jnp.asarray(tokens))[0])
        for i, ids in enumerate(real.ids):
            t = len(ids) + step
            tokens[i, t] = logits[i, t - 1].argmax()
    with torch.no_grad():
        for i, ids in enumerate(real.ids):
            want = real.ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, pad_token_id=0)
            assert tokens[i, :len(ids) + NEW_TOKENS].tolist() == want[0].tolist(), SENTENCES[i]


def test_gemma3_experiment_fits_the_real_model():
    """experiments/gemma3.py reads the real Gemma 3: its width, a hook the model has, and a
    valid config (the end-to-end run is SmolLM2's below: Gemma's 262k-token vocabulary makes
    it several times slower)."""
    from experiments import gemma3  # pylint: disable=import-outside-toplevel
    from saejax import validation  # pylint: disable=import-outside-toplevel
    checkpoint = asset("gemma3", what="Gemma 3")
    model_config = models.config_from_hf_dict(models.hf.read_config(checkpoint))
    for arg in (None, "tiny"):
        config = gemma3.get_config(arg)
        assert config.data.d == model_config.hidden_size
        models.check_hook(model_config, config.lm.hook, "gemma3.HOOK", AssertionError)
        config.data.path = checkpoint  # any existing path: the store is checked when opened
        config.lm.checkpoint, config.lm.tokens = checkpoint, checkpoint
        validation.validate(config, 8)


@pytest.mark.parametrize("name", ["smollm2"])
def test_tiny_experiment_harvests_and_trains_end_to_end(name, tmp_path):
    """experiments/<name>.py:tiny on the real model: a few Shakespeare lines harvested at the
    experiment's hook by saejax.harvest, a TopK SAE trained from the store, and its summary's
    metrics (loss recovered and KL with the real model spliced) finite."""
    import importlib  # pylint: disable=import-outside-toplevel
    import json  # pylint: disable=import-outside-toplevel
    from saejax import harvest, train  # pylint: disable=import-outside-toplevel
    experiment = importlib.import_module(f"experiments.{name}")
    checkpoint = asset(name, what=name)
    root = os.environ["SAEJAX_ASSETS"]
    with open(os.path.join(root, "shakespeare", "hamlet.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()][200:300]
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")

    config = experiment.get_config("tiny")
    holdout = config.evals.loss_recovered_sequences
    result = harvest.harvest(checkpoint, str(text), str(tmp_path / "stores"),
                             hooks=[experiment.HOOK], context_length=config.lm.context_length,
                             batch_sequences=config.lm.batch_sequences,
                             holdout_sequences=holdout, chunk_rows=64,
                             exclude_positions=tuple(config.lm.exclude_positions))
    assert result["tokens_written"] >= 8 * config.train.batch_size
    config.data.path = result["stores"][experiment.HOOK]
    config.lm.checkpoint, config.lm.tokens = checkpoint, str(text)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    d = models.config_from_hf_dict(models.hf.read_config(checkpoint)).hidden_size
    assert summary["step"] == config.train.steps and summary["d"] == d == config.data.d
    for key in ("fvu", "l0", "loss_recovered", "kl_sae"):
        assert np.isfinite(summary[key]), (key, summary)
    assert 0 < summary["l0"] <= config.sae.k
    assert summary["ce_clean"] < summary["ce_zero_ablation"]


def test_smollm2_sweep_is_topk_and_relu_at_expansion_8_and_32():
    from experiments import smollm2  # pylint: disable=import-outside-toplevel
    sweep = smollm2.get_sweep()
    assert sorted({(p["sae.architecture"], p["sae.expansion_factor"]) for p in sweep}) == [
        ("relu", 8), ("relu", 32), ("topk", 8), ("topk", 32)]
    levels = {p["sae.l1_coefficient"] / p["sae.expansion_factor"] for p in sweep
              if p["sae.architecture"] == "relu"}
    assert sorted(levels) == pytest.approx(sorted(smollm2.RELU_L1_LEVELS))
    assert all(p["sae.k"] == 32 for p in sweep if p["sae.architecture"] == "topk")
