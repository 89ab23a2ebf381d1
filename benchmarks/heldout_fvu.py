"""FVU of trained SAEs on a store's held-out rows, over all of them and by group: each row's
position in its sequence, and the rows of massive norm (above `--outlier_factor` times the
median row norm: attention sinks and their like) against the rest. What an SAE trained with
or without some positions does on the ordinary tokens.

    python benchmarks/heldout_fvu.py --store=$RUN/stores/blocks.15.hook_resid_post \
        --rows=16384 $WORKDIR_A $WORKDIR_B

The rows are the store's last `--rows` (the trainer's held-out rows when data.eval_tokens is
that many). FVU = summed squared error / summed squared deviation from the group's own mean.
Prints one JSON line per SAE.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from saejax.analysis import loading
from saejax.data import store


def grouped_fvu(x: np.ndarray, x_hat: np.ndarray, groups: dict[str, np.ndarray]) -> dict:
    out = {}
    for name, rows in groups.items():
        if rows.sum() < 2:  # no variance about the group's own mean
            continue
        xs, err = x[rows], x[rows] - x_hat[rows]
        out[name] = {"rows": int(rows.sum()),
                     "fvu": float((err ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="trained runs (or SAELens directories)")
    parser.add_argument("--store", required=True)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--outlier_factor", type=float, default=10.0)
    args = parser.parse_args(argv)

    opened = store.open_store(args.store)
    start = max(0, opened.n_rows - args.rows)
    x = opened.read(start, opened.n_rows).result().astype(np.float32)
    norms = np.linalg.norm(x, axis=-1)
    massive = norms > args.outlier_factor * np.median(norms)
    position = opened.positions(start, opened.n_rows)[:, 1]
    groups = {"all": np.ones(len(x), bool), "ordinary": ~massive, "massive": massive,
              "position_1": position == 1, "positions_2_on": position >= 2}
    for workdir in args.workdirs:
        sae = loading.load_sae(workdir)
        x_hat = np.concatenate([np.asarray(sae.reconstruct(x[i:i + 2048]))
                                for i in range(0, len(x), 2048)])
        print(json.dumps({"workdir": workdir, "store": args.store,
                          "massive_share_of_squared_norm":
                              float((norms[massive] ** 2).sum() / (norms ** 2).sum()),
                          **grouped_fvu(x, x_hat, groups)}))


if __name__ == "__main__":
    main()
