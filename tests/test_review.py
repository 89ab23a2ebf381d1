"""The human review (`python -m saejax.analysis.review`) clicked through in headless Chromium
(chromedriver, tests/webdriver.py): a blind review of a copy of the tiny GPT-2's TopK run
(the `run` fixture of tests/test_analysis.py) with random-direction controls; three pages
rated by click and by keyboard, the name asked once, a reload, the ratings file, a restart
into an open review whose index shows the score and the labels, the static dashboard's index
and the report showing them too, and the controls checked against their projections."""

import dataclasses
import datetime
import os
import shutil
import threading

import numpy as np
import pytest

from saejax.analysis import dashboard, ratings, review, review_server
from saejax.data import store as store_lib
from saejax.evals import interpretability
from test_analysis import run  # noqa: F401  (the fixture)
import webdriver

OPTIONS = dict(top_n=6, max_rows=4096)


def _copy_run(workdir, tmp_path):
    """The run's config and checkpoints, without its analysis/ (other tests write there)."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("analysis", "dashboard",
                                                                   "tensorboard"))
    return str(copy)


class _Serving:
    def __init__(self, the_review):
        self.server = review_server.make_server(the_review, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _ready(browser, url):
    browser.get(url)
    browser.wait_for("return document.body.getAttribute('data-ready') === '1'")


def _visible(browser, element_id):
    return browser.run(f"return !document.getElementById('{element_id}').hidden")


def test_three_pages_rated_blind_survive_a_reload_and_a_restart(run, tmp_path):  # noqa: F811
    webdriver.binaries()
    workdir = _copy_run(run.workdir, tmp_path)
    blind = review.open_review(workdir, blind=True, sample=4, controls=2, seed=3, **OPTIONS)
    assert len(blind.items) == 6 and sum(i.kind == "control" for i in blind.items) == 2
    first_three = blind.items[:3]
    html = blind.page_html("1")
    assert "Page 1 of 6" in html and f"Latent {first_three[0].index}" not in html
    assert "density" not in html.replace("id and density are hidden", "")
    assert "<svg" not in html  # the activation histogram's counts are the density

    serving = _Serving(blind)
    browser = webdriver.Browser(str(tmp_path / "profile"))
    try:
        _ready(browser, serving.url + "/")
        browser.click("a[href='items/1.html']")
        browser.wait_for("return document.body.getAttribute('data-ready') === '1' && "
                         "location.pathname === '/items/1.html'")
        assert _visible(browser, "ask-name") and not _visible(browser, "named")
        browser.type("#rater", "ann")
        browser.type("#label", "first <b>page</b>")
        browser.click("#rate-interpretable")                   # by click
        browser.wait_for("return location.pathname === '/items/2.html' && "
                         "document.body.getAttribute('data-ready') === '1'")
        assert not _visible(browser, "ask-name")              # asked once, remembered
        assert browser.run("return document.getElementById('rater-name').textContent") == "ann"
        browser.press("2")                                    # by keyboard: partly
        browser.wait_for("return location.pathname === '/items/3.html' && "
                         "document.body.getAttribute('data-ready') === '1'")
        browser.press("l")                                    # the label field, by keyboard
        assert browser.run("return document.activeElement.id") == "label"
        browser.type("#label", "third\n")                     # Enter leaves the field
        assert browser.run("return document.activeElement.id") != "label"
        browser.press("3")
        browser.wait_for("return location.pathname === '/items/4.html'")

        _ready(browser, serving.url + "/items/3.html")        # a reload shows the rating
        assert browser.run("return document.getElementById('status').textContent") == (
            "You rated this not.")
        assert browser.run("return document.getElementById('label').value") == "third"
        assert browser.run("return document.querySelector('button.chosen').id") == "rate-not"
        _ready(browser, serving.url + "/")
        assert browser.run("return document.getElementById('progress').textContent") == (
            "ann: 3 of 6 pages rated.")
        serving.stop()

        # The file: who, when, which latent (or control), what.
        records = ratings.read(ratings.ratings_path(workdir))
        assert [r["item"] for r in records] == [i.key for i in first_three]
        assert [r["rating"] for r in records] == ["interpretable", "partly", "not"]
        assert [r["label"] for r in records] == ["first <b>page</b>", "", "third"]
        assert all(r["rater"] == "ann" and r["blind"] for r in records)
        for record, item in zip(records, first_three):
            assert record[item.kind] == item.index and record["kind"] == item.kind
            assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None

        # Restarted, open: the index is the dashboard's, with the score and the labels.
        opened = review.open_review(workdir, blind=False, **OPTIONS)
        serving = _Serving(opened)
        _ready(browser, serving.url + "/")
        score = interpretability.interpretability_score(records)
        shown = browser.run("return document.getElementById('score').textContent")
        for part in (score.latents, score.controls):
            fraction = "-" if part.rated == 0 else f"{100 * part.fraction:.1f}%"
            assert f"{fraction}" in shown
            assert f"{part.interpretable} of {part.rated} rated interpretable" in shown
        labels = browser.run("return document.getElementById('labels').textContent")
        assert "first <b>page</b>" in labels and "third" in labels and "(ann)" in labels
        assert "Rated by ann (3)" in browser.run("return document.body.textContent")
        rated_latent = next(i for i in first_three if i.kind == "latent")
        _ready(browser, serving.url + f"/latents/{rated_latent.index}.html")
        assert browser.run("return document.getElementById('status').textContent").startswith(
            "You rated this")
        assert browser.run("return document.querySelectorAll('.stats .value').length") >= 3
        errors = [e for e in browser.logs() if e.get("level") == "SEVERE"]
        assert errors == [], errors
        serving.stop()
    finally:
        browser.quit()

    # The report and the static dashboard's index show them too, escaped.
    report = open(os.path.join(workdir, review.REPORT_FILE)).read()
    assert (f"latents: {score.latents.interpretable} of {score.latents.rated} rated "
            f"interpretable") in report and "third (ann)" in report
    index = open(dashboard.write_dashboard(
        opened.prepared.top, str(tmp_path / "dashboard"), loaded=opened.loaded,
        latents=[i.index for i in first_three if i.kind == "latent"])).read()
    assert "Interpretability (human validation)" in index
    assert "first &lt;b&gt;page&lt;/b&gt;" in index and "<b>page" not in index

    # The controls: random unit directions (the seed's), through the same pass.
    loaded, top = blind.controls
    directions = loaded.params["W_enc"]
    np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(review.control_sae(blind.loaded, 2, 3).params["W_enc"],
                                  directions)
    x = store_lib.open_store(run.store).read(0, top.n_rows).result()
    projection = np.maximum(
        (x * blind.loaded.input_scale - blind.loaded.params["b_dec"]) @ directions, 0)
    np.testing.assert_allclose(top.values[:, 0], projection.max(0), rtol=1e-4)
    np.testing.assert_array_equal(top.fired, np.sum(projection > 0, axis=0))

    # Ratings of pages the review does not have are refused; a nameless one is kept, not
    # counted.
    with pytest.raises(ValueError, match=r"item '99' is not a page of this review"):
        blind.rate({"item": "99", "rating": "not", "rater": "ann"})
    with pytest.raises(ValueError, match=r"rating 'great': choose one of interpretable"):
        blind.rate({"item": "1", "rating": "great", "rater": "ann"})
    assert blind.rate({"item": "4", "rating": "not"})["ok"]
    after = interpretability.interpretability_score(ratings.read(ratings.ratings_path(workdir)))
    assert after.unnamed == 1 and after == dataclasses.replace(score, unnamed=1)
