"""What a run's folder holds and how its parts are named: the resolved config (and the refusal
to resume it with another one), `metrics.jsonl`, JSON files, and the readable names of sweep
points and group members. Training, the sweep runner and the analysis tools all read and write
workdirs through here, so none of them imports another for it. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from saejax import paths
from saejax.errors import ConfigError

# Config fields that may change when resuming a workdir (they do not change what is trained;
# train.steps does change the learning-rate decay, so it is allowed with a warning, to extend a
# run); anything else must match what the workdir was started with.
RESUMABLE_CHANGES = ("mesh.", "sharding_rules", "train.log_every",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.steps",
                     "evals.eval_batches", "evals.density_window_tokens", "evals.dense_threshold",
                     "evals.loss_recovered_sequences", "data.prefetch_windows",
                     "lm.batch_sequences", "group.member_workdirs",
                     "train.preemption_check_every", "logging.")
CONFIG_FILE = "config.json"
MEMBERS_DIR = "members"


# ------------------------------------------------------------------------------------------
# The resolved config.
# ------------------------------------------------------------------------------------------
def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A config as JSON (nested dicts) -> {"sae.l1_coefficient": 0.6, ...}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], dict, dict]:
    """(the changed fields that a run cannot resume with, flattened old, flattened new), and
    the resumable changes logged. A field added to the schema after `old` was written, at its
    default, is no change: the run it describes trains the same way. Nor is a field the schema
    no longer has: nothing reads it."""
    from saejax import configs  # pylint: disable=import-outside-toplevel
    old_flat, new_flat = flatten_config(old), flatten_config(new)
    for old_name, new_name in configs.ALIASES.items():  # written before a rename
        if new_name not in old_flat and old_name in old_flat:
            old_flat[new_name] = old_flat[old_name]
    for key, before in configs.BEFORE_FIELD_EXISTED.items():  # ran as `before` back then
        old_flat.setdefault(key, json.loads(json.dumps(before)))
    defaults = flatten_config(json.loads(configs.base_config().to_json_best_effort()))
    changed = sorted(k for k in set(old_flat) | set(new_flat)
                     if old_flat.get(k) != new_flat.get(k)
                     and not (k not in old_flat and k in defaults
                              and new_flat[k] == defaults[k])
                     and not (k not in new_flat and k not in defaults))
    resumable = [k for k in changed if k.startswith(RESUMABLE_CHANGES)]
    resumable += _unread_by_the_architecture(changed, old_flat, new_flat)
    if resumable:
        logging.warning("Changed since the run started (allowed): %s.", ", ".join(resumable))
    return [k for k in changed if k not in resumable], old_flat, new_flat


def _unread_by_the_architecture(changed: list[str], old_flat: dict, new_flat: dict) -> list[str]:
    """The changed `sae.<field>`s of other architectures than the run's (a TopK run's
    `sae.l1_coefficient`): nothing the run trains reads them."""
    from saejax import sae  # pylint: disable=import-outside-toplevel
    name = old_flat.get("sae.architecture")
    if name != new_flat.get("sae.architecture") or name not in sae.ARCHITECTURES:
        return []
    own, every = sae.get(name).config_fields, sae.config_fields()
    return [k for k in changed if k.startswith("sae.") and k[4:] in every and k[4:] not in own]


def check_resumable(workdir: str, config) -> None:
    """Refuses a workdir that holds a run started with another config (one that changes what
    is trained); a workdir without config.json is new and passes. A workdir written before a
    field of `configs.BEFORE_FIELD_EXISTED` existed resumes as it trained: that field, left at
    today's default in `config`, takes the value the old run had."""
    stored = read_json(paths.join(workdir, CONFIG_FILE))
    if stored is None:
        return
    _adopt_older_behaviour(config, stored, workdir)
    fixed, old_flat, new_flat = config_changes(stored, json.loads(config.to_json_best_effort()))
    if fixed:
        raise ConfigError(
            f"{workdir} holds a run started with another config: "
            + ", ".join(f"{k}={old_flat.get(k)!r} there, {new_flat.get(k)!r} now"
                        for k in fixed)
            + ". Use a new --workdir, or pass the original values to resume.")


def _adopt_older_behaviour(config, stored: dict, workdir: str) -> None:
    from saejax import configs  # pylint: disable=import-outside-toplevel
    old_flat = flatten_config(stored)
    defaults = configs.base_config()
    for key, before in configs.BEFORE_FIELD_EXISTED.items():
        section, leaf = key.split(".")
        if key in old_flat or config[section][leaf] != defaults[section][leaf]:
            continue
        logging.warning("%s predates %s; resuming with %s=%r, as it was trained.", workdir,
                        key, key, before)
        config[section][leaf] = before


def write_config(config, workdir: str) -> None:
    """Writes the resolved config, after `check_resumable`."""
    check_resumable(workdir, config)
    write_json(paths.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()),
               sort_keys=True)


# ------------------------------------------------------------------------------------------
# JSON files and metrics.jsonl.
# ------------------------------------------------------------------------------------------
def write_json(path: str, value, **options) -> None:
    if jax.process_index() == 0:
        paths.write_json(path, value, indent=2, **options)


def read_json(path: str) -> Any:
    """The file's JSON, or None when it is missing or cut short (a writer killed mid-file)."""
    try:
        return paths.read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def jsonable(value: np.ndarray):
    """A metric as JSON: lists for arrays, None for NaN (e.g. a density before its window)."""
    value = np.asarray(value).tolist()
    return None if isinstance(value, float) and math.isnan(value) else value


def last_record(path: str) -> dict | None:
    """The last complete line of a metrics.jsonl (a running trainer may be mid-line)."""
    try:
        lines = paths.read_text(path).splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


class MetricsLog:
    """`metrics.jsonl`: one JSON line per logging step. On resume, lines from steps after the
    restored checkpoint (which will be trained again) are dropped so each step appears once.
    A bucket cannot append, so there the whole file is rewritten at each logging step.

    It is also the one place the records reach their mirrors (`saejax.tracking`: TensorBoard,
    W&B), which `open_mirrors()` opens, called on process 0 only; `close` gives them the final
    evaluations (summary.json's) and closes them."""

    def __init__(self, path: str, resume_step: int,
                 open_mirrors: Callable[[], list] | None = None):
        self.path = path
        self.enabled = jax.process_index() == 0
        self._lines: list[str] = []
        self._mirrors = (list(open_mirrors())
                         if self.enabled and open_mirrors is not None else [])
        if self.enabled and paths.exists(path):
            for line in paths.read_text(path).splitlines(keepends=True):
                try:
                    if json.loads(line)["step"] <= resume_step:
                        self._lines.append(line)
                except (ValueError, KeyError):  # a line cut short by a kill
                    continue
            paths.write_text(path, "".join(self._lines))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self._lines.append(line)
        if paths.is_remote(self.path):
            paths.write_text(self.path, "".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for mirror in self._mirrors:
            mirror.write(record)

    def close(self, summary: dict | None = None) -> None:
        """Closes the mirrors, after giving them `summary` (the final evaluations) if any."""
        mirrors, self._mirrors = self._mirrors, []
        for mirror in mirrors:
            if summary is not None:
                mirror.write_summary(summary, int(summary["step"]))
            mirror.close()


# ------------------------------------------------------------------------------------------
# Names: a sweep point's folder (x32_l1-3e-4) and a group member's (l1-0.3) are one scheme.
# ------------------------------------------------------------------------------------------
# Short forms of common override keys in names: x32_l1-3e-4, topk_x8_k16.
ABBREVIATIONS = {"sae.expansion_factor": "x", "sae.l1_coefficient": "l1-",
                 "sae.l0_coefficient": "l0-", "sae.k": "k", "sae.architecture": "",
                 "data.d": "d", "train.steps": "steps-", "optim.learning_rate": "lr-"}


def format_value(value: Any) -> str:
    """A config value as it appears in a name: 3e-4, 0.6, 32, topk."""
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, _, exponent = f"{value:.6e}".partition("e")
        short = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return short if len(short) < len(plain) else plain
    if isinstance(value, (tuple, list)):
        return "+".join(format_value(v) for v in value)
    text = str(value)
    return "".join(c if c.isalnum() or c in ".+-" else "-" for c in text)


def name_part(key: str, value: Any) -> str:
    """One override in a name: ("sae.l1_coefficient", 0.3) -> "l1-0.3"."""
    prefix = ABBREVIATIONS.get(key, key.rsplit(".", 1)[-1] + "-")
    return prefix + format_value(value)


def run_name(overrides: dict[str, Any]) -> str:
    """A folder name from overrides, in their order: x32_l1-3e-4; "base" for none."""
    return "_".join(name_part(k, v) for k, v in overrides.items()) or "base"


def member_name(coefficient_name: str, value: float) -> str:
    """A group member's name, as the sweep names a point of that coefficient: l1-0.3."""
    return name_part(f"sae.{coefficient_name}", float(value))


def member_folder(workdir: str, coefficient_name: str, value: float) -> str:
    """<workdir>/members/<member_name>/, or the folder a run before the names were shared
    wrote (members/l1_coefficient-0.3/) when only that one is there, so it resumes."""
    folder = paths.join(workdir, MEMBERS_DIR, member_name(coefficient_name, value))
    legacy = paths.join(workdir, MEMBERS_DIR, f"{coefficient_name}-{float(value):g}")
    if not paths.exists(folder) and paths.exists(legacy):
        return legacy
    return folder
