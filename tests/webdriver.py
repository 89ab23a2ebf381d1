"""Headless Chromium driven through chromedriver's W3C WebDriver protocol (JSON over HTTP, so
the standard library's urllib is the whole client): open a page, click, type, press keys, run
a script, wait for a condition. Debian's `chromium` and `chromium-driver` packages; a test
that needs them skips without them locally and fails in CI (CI=true)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def binaries() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip (a failure in CI) naming the packages."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser")
                    if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    why = ("chromium and chromedriver are needed to click through the review "
           "(apt-get install -y chromium chromium-driver)")
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {why}.")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session (a fresh profile in `profile`)."""

    def __init__(self, profile: str, *, timeout: float = 60.0):
        browser, driver = binaries()
        port = _free_port()
        self._driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._base = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                self._driver.kill()
                raise TimeoutError("chromedriver did not start")
            time.sleep(0.1)
        options = {"binary": browser, "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
            "--no-first-run", f"--user-data-dir={profile}"]}
        answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})
        self._session = f"/session/{answer['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read().decode()}") from None

    def _session_call(self, method: str, path: str, body: dict | None = None):
        return self._call(method, self._session + path, body)

    def get(self, url: str) -> None:
        self._session_call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        found = self._session_call("POST", "/element", {"using": "css selector", "value": css})
        return found[ELEMENT]

    def click(self, css: str) -> None:
        self._session_call("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self._session_call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def press(self, key: str) -> None:
        """A key pressed and released where the focus is (the page, when nothing is)."""
        self._session_call("POST", "/actions", {"actions": [{
            "type": "key", "id": "keyboard",
            "actions": [{"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]})

    def run(self, script: str, *args):
        return self._session_call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, *, timeout: float = 30.0):
        """Polls `script` (a JS expression's body: `return ...`) until it is truthy."""
        deadline = time.time() + timeout
        while True:
            value = self.run(script)
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for: {script}")
            time.sleep(0.05)

    def url(self) -> str:
        return self._session_call("GET", "/url")

    def logs(self) -> list:
        """The page's console errors since the last call (chromedriver's 'browser' log)."""
        try:
            return self._session_call("POST", "/se/log", {"type": "browser"})
        except AssertionError:
            return []

    def quit(self) -> None:
        try:
            self._session_call("DELETE", "")
        finally:
            self._driver.terminate()
            self._driver.wait(timeout=30)
