"""Tests run on CPU with 8 fake devices, set before JAX starts, so every sharded path runs."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices"


def toy_config(arg="smoke", **overrides):
    """The toy experiment config, unlocked, with `{"sae.k": 4, ...}` style overrides."""
    from experiments import toy  # pylint: disable=import-outside-toplevel
    from saejax import configs  # pylint: disable=import-outside-toplevel
    return configs.apply_overrides(toy.get_config(arg), overrides)


def asset(*parts: str, what: str) -> str:
    """The path of a fetched real model or text under `SAEJAX_ASSETS` (`python -m
    saejax.models.fetch --out=DIR`). Missing, the test is skipped locally and fails in CI
    (CI=true), where .ci/run fetches them."""
    root = os.environ.get("SAEJAX_ASSETS")
    path = os.path.join(root or "", *parts)
    if not root or not os.path.exists(path):
        why = (f"{what} is not fetched (SAEJAX_ASSETS={root!r}); run "
               "`python -m saejax.models.fetch --out=DIR` and set SAEJAX_ASSETS=DIR")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path
