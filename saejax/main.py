"""Trains one SAE: `python -m saejax.main --config=experiments/toy.py --workdir=DIR`.

Overrides go through `--config.x=y` (the config is locked, so a misspelt key is an error).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags
import jax

from saejax import cli, train

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "On CPU, simulate this many devices (to try mesh.model > 1).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process JAX cluster (jax.distributed.initialize); "
    "launchers set SAEJAX_DISTRIBUTED=1 instead. See saejax/distributed.py.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.setup(num_cpu_devices=_NUM_CPU_DEVICES.value, join_cluster=_DISTRIBUTED.value)
    try:
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except train.Preempted as e:
        logging.warning("%s", e)
        sys.exit(train.SIGTERM_EXIT_CODE)
    except (train.ConfigError, FloatingPointError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    if jax.process_index() != 0:
        return
    for name, result in summary.get("members", {"": summary}).items():
        quality = (f"FVU {result['fvu']:.4f}, L0 {result['l0']:.2f}, "
                   f"dead_fraction {result['dead_fraction']:.3f}, step {result['step']}")
        if "loss_recovered" in result:
            quality += (f", loss recovered {result['loss_recovered']:.4f} (CE clean "
                        f"{result['ce_clean']:.4f}, with the SAE {result['ce_sae']:.4f}, "
                        f"zero-ablated {result['ce_zero_ablation']:.4f})")
        prefix = f"{name}: " if name else ""
        if "mmcs" in result:
            print(f"{prefix}Recovered the true features: MMCS {result['mmcs']:.4f} ({quality}).")
        else:
            print(f"{prefix}Finished: {quality}.")
    print(f"Summary: {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
    app.run(main)
