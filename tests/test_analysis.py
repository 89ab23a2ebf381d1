"""Reading features of an SAE trained on a tiny GPT-2: top activations (sharded against a
single-device reference and a brute-force one), the dashboard CLI checked in a real headless
browser, its templates (escaping, charts, packaging), steering and ablation (function and CLI),
and the errors a user meets."""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import ast

import jax
import numpy as np
import pytest

from conftest import ROOT
import tiny_lm
from saejax import harvest, models, sae, sharding, train
from saejax.analysis import (charts, dashboard, dashboard_data, loading, pages, saelens,
                             steer, top_activations)
from saejax.analysis.loading import AnalysisError, LoadedSAE
from saejax.data import store as store_lib

HOOK = "blocks.1.hook_resid_post"


def _build(root):
    checkpoint, text, _ = tiny_lm.make_tiny_lm(str(root), steps=60, n_documents=300)
    stores = harvest.harvest(checkpoint, text, str(root / "stores"), hooks=[HOOK],
                             context_length=tiny_lm.CONTEXT, batch_sequences=16,
                             chunk_rows=256, progress_every_s=1e9,
                             # Every token a row, so row r is r // 32, r % 32 (the tests
                             # below count on it; tests/test_text_input.py covers exclusion).
                             exclude_positions=(), exclude_token_ids="")["stores"]
    from experiments import gpt2_small  # pylint: disable=import-outside-toplevel
    config = gpt2_small.get_config("tiny")
    config.lm.checkpoint, config.lm.tokens, config.lm.hook = checkpoint, text, HOOK
    config.data.path = stores[HOOK]
    config.evals.loss_recovered_sequences = 0
    config.train.steps = 30
    train.train_and_evaluate(config, str(root / "run"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny GPT-2, its activation store at HOOK, and a TopK SAE trained on it. Built once per
    session, also when pytest-xdist runs these tests on several workers (a file lock)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "analysis_run"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            _build(root)
            (root / "done").write_text("ok")
    return SimpleNamespace(checkpoint=str(root / "model"), store=str(root / "stores" / HOOK),
                           workdir=str(root / "run"))


def _cli(module, *args, timeout=300, check=True):
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


# ------------------------------------------------------------------------------------------
# Top activations.
# ------------------------------------------------------------------------------------------
def test_top_activations_sharded_equal_single_device_and_brute_force(run):
    loaded = loading.load_sae(run.workdir)
    assert loaded.architecture.name == "topk" and loaded.n_latents == 256
    kwargs = dict(top_n=6, context_before=5, context_after=2, batch_sequences=8, max_rows=2400)
    sharded = top_activations.compute_top_activations(
        loaded, run.store, mesh=top_activations.default_mesh(256, model=4), flush_every=3,
        **kwargs)
    single = top_activations.compute_top_activations(
        loaded, run.store, mesh=top_activations.default_mesh(256, jax.devices()[:1]), **kwargs)
    assert sharded.info["mesh"] == {"data": 2, "model": 4}
    n_rows = sharded.n_rows
    assert n_rows == 2400 // 32 * 32  # whole sequences; the last batch is partial
    np.testing.assert_array_equal(sharded.rows, single.rows)
    np.testing.assert_allclose(sharded.values, single.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sharded.context_tokens, single.context_tokens)
    np.testing.assert_array_equal(sharded.fired, single.fired)
    np.testing.assert_array_equal(sharded.histogram, single.histogram)

    # Against encoding every row and sorting each latent's column.
    store = store_lib.open_store(run.store)
    latents = np.asarray(loaded.encode(store.read(0, n_rows).result()))
    token_ids = store.token_ids(0, n_rows)
    np.testing.assert_array_equal(sharded.fired, np.sum(latents > 0, axis=0))
    np.testing.assert_allclose(sharded.activation_sum, latents.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(sharded.histogram.sum(1), sharded.fired)
    peak = latents.max(0)
    upper = sharded.histogram_max
    assert np.all((upper >= peak) & ((upper < 2 * peak) | (peak == 0)))
    assert np.all(np.log2(upper[peak > 0]) == np.round(np.log2(upper[peak > 0])))
    for i in np.flatnonzero(peak):
        expected, _ = np.histogram(latents[latents[:, i] > 0, i],
                                   bins=np.linspace(0, upper[i], sharded.histogram.shape[1] + 1))
        np.testing.assert_array_equal(sharded.histogram[i], expected)
    for i in range(loaded.n_latents):
        order = np.argsort(-latents[:, i], kind="stable")[:6]
        order = order[latents[order, i] > 0]
        np.testing.assert_array_equal(sharded.rows[i, :len(order)], order)
        assert np.all(sharded.rows[i, len(order):] == -1)
    alive = np.flatnonzero(sharded.fired)
    assert len(alive) > 20
    document = store.documents(0, n_rows)[:, 0]  # a context stops where its document does
    for i in alive[:20]:
        for example in sharded.examples(int(i)):
            sequence, position = divmod(example["row"], 32)
            assert (example["sequence"], example["position"]) == (sequence, position)
            same = document[sequence * 32:(sequence + 1) * 32] == document[example["row"]]
            lo = max(0, position - 5)
            while not same[lo]:
                lo += 1
            hi = min(32, position + 3)
            while not same[hi - 1]:
                hi -= 1
            window = slice(sequence * 32 + lo, sequence * 32 + hi)
            assert example["context_token_ids"] == token_ids[window].tolist()
            np.testing.assert_allclose(example["context_activations"], latents[window, i],
                                       rtol=1e-5, atol=1e-5)
            assert example["token_index"] == position - lo

    # The running state is split over latents: each device holds its block only.
    mesh = top_activations.default_mesh(256, model=4)
    state = jax.jit(lambda: top_activations.init_state(256, 6, 8, 2), out_shardings=(
        sharding.named_shardings(mesh, top_activations.STATE_AXES, sharding.DEFAULT_RULES)))()
    assert state.values.addressable_shards[0].data.shape == (64, 6)
    assert state.context_tokens.addressable_shards[0].data.shape == (64, 6, 8)
    assert state.histogram.addressable_shards[0].data.shape == (1, 64, 64)


def test_histogram_rebinning_merges_neighbouring_bins():
    counts = np.arange(1, 9)[None, None, :]
    for xp in (np, jax.numpy):
        merged = np.asarray(top_activations.rebin(xp.asarray(counts), xp.asarray([1]), xp=xp))
        np.testing.assert_array_equal(merged[0, 0], [3, 7, 11, 15, 0, 0, 0, 0])
        merged = np.asarray(top_activations.rebin(xp.asarray(counts), xp.asarray([2]), xp=xp))
        np.testing.assert_array_equal(merged[0, 0], [10, 26, 0, 0, 0, 0, 0, 0])
        merged = np.asarray(top_activations.rebin(xp.asarray(counts), xp.asarray([40]), xp=xp))
        np.testing.assert_array_equal(merged[0, 0], [36, 0, 0, 0, 0, 0, 0, 0])


# ------------------------------------------------------------------------------------------
# The dashboard, in a real browser.
# ------------------------------------------------------------------------------------------
def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("CI is set but no chromium is installed to check the dashboard in; "
                    "install it (apt-get install -y chromium).")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test.")


def _open(browser, url, profile, *, screenshot=None):
    """Loads `url` headless; returns (stdout: the DOM without `screenshot`, console lines)."""
    action = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--window-size=1200,900", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={profile}", *action, url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # Page console output (console.log/error, uncaught exceptions) is logged as CONSOLE lines.
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return out.stdout, console


def _screenshot_has_content(png):
    import matplotlib.image  # pylint: disable=import-outside-toplevel
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (900, 1200)
    rgb = image[..., :3]
    not_white = np.mean(np.any(rgb < 0.9, axis=-1))
    return not_white > 0.01 and rgb.std() > 0.02


def test_dashboard_cli_renders_in_a_headless_browser(run, tmp_path):
    out = tmp_path / "dashboard"
    printed = _cli("saejax.analysis.dashboard", run.workdir, "--latents=0:24", "--top_n=8",
                   f"--out={out}").stdout
    assert f"Dashboard: {out / 'index.html'}" in printed
    top = top_activations.read(os.path.join(run.workdir, "analysis", "top_activations"))
    assert top.info["n_rows"] > 10_000 and top.info["top_n"] == 8
    with open(os.path.join(run.workdir, "analysis", "top_activations", "latents.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 256 and "context_tokens" in records[int(np.argmax(top.fired))][
        "examples"][0]

    index = (out / "index.html").read_text()
    pages = sorted(os.listdir(out / "latents"))
    assert len(pages) == 24
    linked = [int(i) for i in re.findall(r'href="latents/(\d+)\.html"', index)]
    assert sorted(linked) == list(range(24))
    density = top.density
    assert all(density[a] >= density[b] for a, b in zip(linked, linked[1:])), "not by density"
    for html in [index, *((out / "latents" / p).read_text() for p in pages)]:
        # Self-contained: nothing to fetch.
        assert not re.search(r"https?:|<link|src=|@import|url\(", html)
    busiest = int(np.argmax(top.fired[:24]))
    page = (out / "latents" / f"{busiest}.html").read_text()
    assert 'class="tok top"' in page and "<svg" in page and "promoted" in page
    # Both histograms say what their axes count; the shading says what it means.
    for text in ("activation when firing", ">tokens</text>", "Shading:", "its maximum"):
        assert text in page, text
    for text in ("density: fraction of tokens", ">latents</text>", "Shading:", "never fired"):
        assert text in index, text

    browser = _browser()
    for name, url in (("index", out / "index.html"), ("latent", out / "latents" /
                                                      f"{busiest}.html")):
        png = tmp_path / f"{name}.png"
        _, console = _open(browser, f"file://{url}", tmp_path / "profile", screenshot=png)
        assert console == [], console
        assert _screenshot_has_content(png), f"{name} rendered blank"
    dom, console = _open(browser, f"file://{out / 'index.html'}", tmp_path / "profile")
    assert console == [] and 'data-ready="1"' in dom  # the page's script ran
    # The console check does catch a failing page.
    (tmp_path / "broken.html").write_text("<p>x</p><script>console.error('no');nope();</script>")
    _, console = _open(browser, f"file://{tmp_path / 'broken.html'}", tmp_path / "profile")
    assert any("Uncaught" in line for line in console) and any("no" in l for l in console)

    # A second dashboard of other latents reuses the computed top activations.
    summary = os.path.join(run.workdir, "analysis", "top_activations", "summary.json")
    before = os.path.getmtime(summary)
    index_path = dashboard.run(run.workdir, latents="3,5", top_n=8, out=str(tmp_path / "again"))
    assert os.path.getmtime(summary) == before
    assert sorted(os.listdir(tmp_path / "again" / "latents")) == ["3.html", "5.html"]
    assert os.path.exists(index_path)


class _HostileTokenizer:
    """Token texts that would break a page not escaped: markup, entities, quotes, newlines."""

    TEXTS = ["<script>alert(1)</script>", "a & b", '"q" \'x\'', "</span><b>bold", "line\n"]

    def decode(self, ids, skip_special_tokens=False):
        return self.TEXTS[ids[0] % len(self.TEXTS)]

    def id_to_token(self, token_id):
        return None


def _hand_made_top(n_latents=64):
    """Top activations written by hand: latent 0 has two examples over tokens 0..3."""
    top_n, window = 2, 4
    values = np.zeros((n_latents, top_n), np.float32)
    rows = np.full((n_latents, top_n), -1, np.int64)
    context_tokens = np.full((n_latents, top_n, window), -1, np.int32)
    context_activations = np.zeros((n_latents, top_n, window), np.float32)
    values[0], rows[0] = [2.0, 1.0], [6, 13]
    context_tokens[0] = [[0, 1, 2, 3], [4, 3, 2, 1]]
    context_activations[0] = [[0.0, 0.5, 2.0, 0.25], [0.0, 0.0, 1.0, 0.0]]
    fired = np.zeros(n_latents, np.int64)
    fired[0] = 3
    histogram = np.zeros((n_latents, 64), np.int64)
    histogram[0, [8, 16, 63]] = 1
    return top_activations.TopActivations(
        values=values, rows=rows, context_tokens=context_tokens,
        context_activations=context_activations, fired=fired,
        activation_sum=fired * 1.0, histogram=histogram,
        histogram_max=np.where(fired > 0, 2.0, 0.0).astype(np.float32),
        info={"n_rows": 64, "context_length": 8, "context_before": 2, "hook": HOOK,
              "store": "/stores/<b>&amp;"})


def test_token_text_with_markup_is_escaped_on_every_page(tmp_path):
    loaded = _narrow_sae()._replace(source="/runs/a&b<i>")
    unembedding = np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32)
    index = dashboard.write_dashboard(_hand_made_top(), str(tmp_path), loaded=loaded,
                                      latents=[0, 1], tokenizer=_HostileTokenizer(),
                                      unembedding=unembedding)
    latent = (tmp_path / "latents" / "0.html").read_text()
    index_html = open(index).read()
    for html in (latent, index_html):
        assert "<script>alert" not in html and "<b>" not in html and "<i>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "a &amp; b" in html and "&lt;/span&gt;&lt;b&gt;bold" in html
        assert "/runs/a&amp;b&lt;i&gt;" in html and "/stores/&lt;b&gt;&amp;amp;" in html
    assert "line\u21b5" in latent                  # a newline token stays visible
    assert latent.count("<script") == 0 and index_html.count("<script") == 1  # the filter's
    # The example's token is boxed and shaded fully; the others by activation / max (2.0).
    assert re.search(r'class="tok top" style="background:rgba\(249,115,22,1.00\)"', latent)
    assert 'style="background:rgba(249,115,22,0.25)"' in latent   # 0.5 / 2.0

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # what the browser parsed: text, not elements
        dom, console = _open(browser, f"file://{tmp_path / 'latents' / '0.html'}",
                             tmp_path / "profile")
        assert console == [] and "<script" not in dom and "<b>" not in dom
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_a_page_extending_the_latent_template_replaces_its_blocks():
    """What a review page builds on: the latent page's view and blocks (a rating panel added,
    the id and density hidden as in a blind review), rendered with the same environment."""
    top, loaded = _hand_made_top(), _narrow_sae()
    view = dashboard_data.latent_view(top, 0, loaded=loaded,
                                      token_text=top_activations.TokenText(_HostileTokenizer()))
    child = pages.environment().from_string(
        '{% extends "latent.html" %}{% block title %}Latent ?{% endblock %}'
        '{% block nav %}{% endblock %}{% block heading %}<h1>A latent</h1>{% endblock %}'
        '{% block stats %}{% endblock %}'
        '{% block panel %}<form id="rating">{{ view.examples|length }}</form>{% endblock %}')
    html = child.render(view=view)
    assert '<form id="rating">2</form>' in html and "<h1>A latent</h1>" in html
    assert "Latent 0" not in html and "density" not in html and "4.69%" not in html
    assert 'class="tok top"' in html and "<svg" in html   # the shared partials still render
    assert "&lt;script&gt;" in html


def test_histogram_charts_scale_bars_to_a_labelled_count_axis():
    chart = charts.activation_histogram(np.array([0, 3, 6, 0, 0, 0, 0, 0]), 4.0)
    assert len(chart.bars) == 3                    # up to the last non-empty bin
    heights = [bar.height for bar in chart.bars]
    assert heights[0] == 0 and heights[2] == pytest.approx(2 * heights[1])
    top_tick = int(chart.y_ticks[-1].label)
    assert top_tick >= 6 and chart.y_ticks[0].label == "0"
    assert chart.bars[2].height == pytest.approx(chart.plot_height * 6 / top_tick)
    assert chart.y_ticks[-1].position == pytest.approx(chart.top)
    assert chart.x_ticks[0].label == "0" and chart.x_label.startswith("activation")
    assert charts.activation_histogram(np.zeros(8), 0.0) is None

    density = np.array([0, 0, 1e-3, 0.05, 1.0, 1e-12])
    chart = charts.density_histogram(density)
    dead, *alive = chart.bars
    assert dead.label == "2" and chart.x_ticks[0].label == "never"
    assert sum(int(bar.label) for bar in alive if bar.label) == 4  # 1e-12: the rarest bin
    assert alive[0].label == "1" and alive[-1].label == "1"        # 1e-12 and 1.0
    assert [t.label for t in chart.x_ticks[1:]] == [f"1e-{e}" for e in range(8, 0, -1)] + ["1"]


def test_every_template_is_package_data():
    """`pip install .` ships what the pages are rendered from: every file under templates/
    matches a package_data pattern of setup.py, and every page template compiles."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords
                                         if k.arg == "package_data"))
    patterns = package_data["saejax.analysis"]
    folder = os.path.join(ROOT, "saejax", "analysis", "templates")
    found = [os.path.relpath(os.path.join(d, f), os.path.dirname(folder))
             for d, _, files in os.walk(folder) for f in files]
    assert {"templates/base.html", "templates/latent.html", "templates/index.html"} <= set(found)
    import fnmatch  # pylint: disable=import-outside-toplevel
    for path in found:
        assert any(fnmatch.fnmatch(path, p) and path.count("/") == p.count("/")
                   for p in patterns), f"{path} is not in setup.py's package_data"
    env = pages.environment()
    assert env.autoescape is True
    for name in env.list_templates(extensions=["html"]):
        env.get_template(name)


# ------------------------------------------------------------------------------------------
# Steering and ablation.
# ------------------------------------------------------------------------------------------
def test_steering_and_ablation(run):
    loaded = loading.load_sae(run.workdir)
    model = loading.load_language_model(loaded)
    tokenizer = loading.load_tokenizer(loaded)
    tokens = steer.encode_prompt(tokenizer, "alpha bravo charlie delta echo")
    assert tokens[0] == tokenizer.token_to_id("<|endoftext|>")
    # One jitted forward on one shape serves the clean activations and a greedy reference
    # (causal: the positions after the prompt do not change the prompt's activations).
    forward = models.make_forward(model.config, hooks=(HOOK,))
    sequence = np.zeros((1, len(tokens) + 5), np.int32)
    sequence[0, :len(tokens)] = tokens
    x = np.asarray(forward(model.params, sequence)[1][HOOK])[:, :len(tokens)]
    f = np.asarray(loaded.encode(x))[0]
    latent = int(np.argmax(f[-1]))
    assert f[-1, latent] > 0

    # Adding nothing changes nothing; the clean continuation is the greedy one.
    same = steer.steer(model, loaded, tokens, latent, "add", 0.0, n_new_tokens=5)
    assert same.kl_last == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(same.clean_tokens, same.steered_tokens)
    np.testing.assert_allclose(same.latent_activation[0], f[:, latent], rtol=1e-5, atol=1e-5)
    for t in range(len(tokens), sequence.shape[1]):
        sequence[0, t] = np.argmax(forward(model.params, sequence)[0][0, t - 1])
    np.testing.assert_array_equal(same.clean_tokens, sequence[:, len(tokens):])

    # The interventions at the hook are the documented formulas.
    direction = loaded.decoder_directions()[latent]
    apply = steer.make_intervention(loaded)
    for mode, value, delta in (("ablate", 0.0, -f[:, latent]),
                               ("clamp", 3.0, 3.0 - f[:, latent]),
                               ("add", 2.0, np.full(len(tokens), 2.0))):
        moved = apply(steer.intervention_args(loaded, latent, mode, value), x)
        np.testing.assert_allclose(moved[0] - x[0], delta[:, None] * direction, rtol=1e-4,
                                   atol=1e-4)

    ablated = steer.steer(model, loaded, tokens, latent, "ablate", n_new_tokens=5)
    assert ablated.kl_last > 0
    pushed = steer.steer(model, loaded, tokens, latent, "add", 30 * float(f[-1, latent]),
                         n_new_tokens=5)
    assert pushed.kl_last > ablated.kl_last
    assert not np.array_equal(pushed.steered_tokens, pushed.clean_tokens)
    increases = [d for _, d in pushed.top_increased]
    assert increases == sorted(increases, reverse=True) and increases[0] > 0
    assert pushed.top_decreased[0][1] < 0
    # The tokens the latent promotes are the dashboard's logit view; adding the latent raises
    # the probability the model puts on them over the same text, adding nothing leaves it.
    up_ids = dashboard.promoted_tokens(
        loaded, np.asarray(models.unembedding(model.params, model.config)), [latent], k=10)[0]
    assert pushed.promoted == [int(i) for i in up_ids[0]] and len(pushed.promoted) == 10
    assert pushed.promoted_log_prob_steered > pushed.promoted_log_prob_clean + 0.1
    assert same.promoted_log_prob_steered == pytest.approx(same.promoted_log_prob_clean,
                                                           abs=1e-6)
    assert pushed.promoted_generated_clean == same.promoted_generated_steered
    assert pushed.promoted_log_prob_clean == pytest.approx(same.promoted_log_prob_clean,
                                                           abs=1e-6)

    # Named tokens instead of the logit lens's: the measurement is over those.
    named = steer.steer(model, loaded, tokens, latent, "add", 30 * float(f[-1, latent]),
                        n_new_tokens=5, promoted=pushed.promoted[:2])
    assert named.promoted == pushed.promoted[:2]
    assert named.promoted_log_prob_steered < pushed.promoted_log_prob_steered  # a subset
    with pytest.raises(AnalysisError, match=r"promoted token ids must be some of"):
        steer.steer(model, loaded, tokens, latent, "add", 1.0, promoted=[10**6])

    with pytest.raises(AnalysisError, match=r"latent 256 is out of range: .* latents 0..255"):
        steer.steer(model, loaded, tokens, 256, "add", 1.0)
    with pytest.raises(AnalysisError, match=r"mode='add' needs a finite value"):
        steer.steer(model, loaded, tokens, latent, "add")
    with pytest.raises(AnalysisError, match=r"mode='boost': choose one of"):
        steer.steer(model, loaded, tokens, latent, "boost", 1.0)


def test_steer_cli_prints_both_generations_and_the_logit_changes(run):
    loaded = loading.load_sae(run.workdir)
    printed = _cli("saejax.analysis.steer", run.workdir, "--latent=7", "--mode=add",
                   "--value=40", "--prompt=alpha bravo charlie", "--new_tokens=4").stdout
    for expected in ("Latent 7 (add 40) at blocks.1.hook_resid_post", "Clean:", "Steered:",
                     "KL(clean || steered) at the last prompt token", "up:", "down:",
                     "Tokens the latent promotes", "log P(next token is one of them)"):
        assert expected in printed, printed
    failed = _cli("saejax.analysis.steer", run.workdir, f"--latent={loaded.n_latents}",
                  "--prompt=alpha", check=False)
    assert failed.returncode != 0
    assert "latent 256 is out of range" in failed.stderr


# ------------------------------------------------------------------------------------------
# SAELens round trip of a trained run.
# ------------------------------------------------------------------------------------------
def test_a_trained_run_exports_to_saelens_and_its_import_drives_the_tools(run, tmp_path):
    loaded = loading.load_sae(run.workdir)
    assert loaded.input_scale != 1.0  # gpt2_small.py normalises inputs: the export folds it
    out = saelens.export_saelens(run.workdir, str(tmp_path / "sae"))
    with open(os.path.join(out, "cfg.json")) as f:
        cfg = json.load(f)
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 8, 64, 256)
    meta = cfg["metadata"]  # SAEMetadata, where SAEConfig.to_dict writes it
    assert (meta["hook_name"], meta["hook_layer"], meta["context_size"], meta["model_name"]) == (
        HOOK, 1, 32, "model")
    assert meta["dataset_path"].endswith("text.txt")

    imported = loading.load_sae(out)
    assert (imported.kind, imported.lm_checkpoint, imported.store) == (
        "saelens", run.checkpoint, run.store)
    x = store_lib.open_store(run.store).read(0, 512).result()
    np.testing.assert_allclose(imported.encode(x), loaded.encode(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(imported.reconstruct(x), loaded.reconstruct(x), rtol=1e-4,
                               atol=1e-4)
    # The dashboard reads it like a run (its store and model from the export's provenance).
    index = dashboard.run(out, latents="0:4", top_n=4, max_rows=2048)
    assert index == os.path.join(out, "dashboard", "index.html")
    assert sorted(os.listdir(os.path.join(out, "dashboard", "latents"))) == [
        f"{i}.html" for i in range(4)]


# ------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------
def _narrow_sae(d=32):
    config = loading.sae_config_for("relu")
    params = jax.tree.map(np.asarray, sae.get("relu").init(jax.random.PRNGKey(0), d, 64, config))
    return LoadedSAE(params=params, input_scale=1.0, architecture=sae.get("relu"),
                     sae_config=config, source="/runs/narrow", kind="saejax", hook=HOOK,
                     data_source="synthetic")


def test_an_sae_of_another_width_is_refused_with_the_fix(run):
    narrow = _narrow_sae()
    with pytest.raises(AnalysisError, match=r"reads activations of width d=32, but "
                                            r"blocks.1.hook_resid_post of .* has width 64\. "
                                            r"The SAE was trained on another model"):
        loading.load_language_model(narrow, checkpoint=run.checkpoint)
    with pytest.raises(AnalysisError, match=r"d=32, but the activation store .* has width 64\. "
                                            r"Use the store of the hook"):
        top_activations.compute_top_activations(narrow, run.store)
    with pytest.raises(AnalysisError, match=r"trained on synthetic activations, which have no "
                                            r"text.*python -m saejax.harvest"):
        dashboard.resolve_store(narrow, None)
    with pytest.raises(AnalysisError, match=r"latent 300 is out of range: the SAE has latents "
                                            r"0..255"):
        dashboard.run(run.workdir, latents="300,")


def test_stores_without_token_ids_are_refused_with_the_fix(tmp_path):
    narrow = _narrow_sae()
    np.save(tmp_path / "acts.npy", np.zeros((64, 32), np.float32))
    with pytest.raises(AnalysisError, match=r"acts.npy is an array of activations without token "
                                            r"ids; top contexts need .*python -m saejax.harvest"):
        top_activations.compute_top_activations(narrow, str(tmp_path / "acts.npy"))
    writer = store_lib.ActivationStoreWriter.create_or_open(
        str(tmp_path / "store"), d=32, dtype="float32", context_length=8, n_tokens=64,
        chunk_rows=32)
    writer.write(0, np.zeros((64, 32), np.float32), np.zeros((64,), np.int32))
    shutil.rmtree(tmp_path / "store" / "token_ids")
    with pytest.raises(AnalysisError, match=r"the store has no token_ids array"):
        top_activations.compute_top_activations(narrow, str(tmp_path / "store"))


def test_a_group_run_points_at_its_members(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "members" / "l1_coefficient-0.5").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(
        {"group": {"sparsity_coefficients": [0.5, 1.0]}, "sae": {"architecture": "relu"}}))
    with pytest.raises(AnalysisError, match=r"trained a group of 2 SAEs .*: one of "
                                            r"\['.*/members/l1_coefficient-0.5'\]"):
        loading.load_sae(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(
        {"group": {"sparsity_coefficients": [0.5, 1.0], "member_workdirs": ["/s/a", "/s/b"]},
         "sae": {"architecture": "relu"}}))
    with pytest.raises(AnalysisError, match=r"one of \['/s/a', '/s/b'\]"):
        loading.load_sae(str(tmp_path))
    with pytest.raises(AnalysisError, match=r"is not an integer index"):
        loading.check_latent(_narrow_sae(), 2.5)
