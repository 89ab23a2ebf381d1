"""Trains one SAE: `python -m saejax.main --config=experiments/toy.py --workdir=DIR`.

Overrides go through `--config.x=y` (the config is locked, so a misspelt key is an error).
"""

from absl import flags
from ml_collections import config_flags
import jax

from saejax import cli, train


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.")
    cli.define_device_flags(join_cluster=True)
    flags.mark_flags_as_required(["config", "workdir"])


def _print_summary(summary: dict, workdir: str) -> None:
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
    print(f"Summary: {workdir}/summary.json")


def main(argv):
    cli.positional(argv, 0, "python -m saejax.main --config=FILE.py[:arg] --workdir=DIR "
                            "[--config.x=y ...]")
    cli.setup_from_flags()
    values = flags.FLAGS
    summary = train.train_and_evaluate(values.config, values.workdir)
    if jax.process_index() == 0:
        _print_summary(summary, values.workdir)


if __name__ == "__main__":
    cli.run(main, _define_flags)
