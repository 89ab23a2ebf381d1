"""Runs in a SAELens environment (benchmarks/setup_saelens.sh), never importing saejax: the
SAELens side of tests/test_saelens_interop.py.

    python tests/saelens_peer.py REQUEST.json

REQUEST.json holds two lists. "load": SAELens directories saejax exported, each with the
activations to run (.npy); `SAE.load_from_disk` reads each and its `encode` and `forward` are
written next to the activations. "build": SAELens configs; for each, SAELens builds the SAE
(an inference class, or the training class saved as its inference form, as BatchTopK is),
draws every tensor at random, saves it with its own save function into the given directory,
and writes what the saved SAE (read back with `load_from_disk`) encodes and reconstructs.
Prints one JSON line: the versions and what it did.
"""

import json
import sys

import numpy as np
import torch

import sae_lens
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import SAE_CLASS_REGISTRY


def _outputs(sae, x_path: str, prefix: str) -> None:
    """`prefix`.latents.npy and `prefix`.reconstruction.npy of the activations at x_path."""
    sae.eval()
    x = torch.from_numpy(np.load(x_path))
    with torch.no_grad():
        np.save(prefix + ".latents.npy", sae.encode(x).numpy())
        np.save(prefix + ".reconstruction.npy", sae(x).numpy())


def _randomise(module, generator: torch.Generator) -> None:
    """Every parameter and buffer drawn at random: matrices at 1/sqrt(fan-in), biases around
    zero, thresholds positive (they compare with the ReLU's input), scalars in (0.2, 0.8)."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            shape = tuple(tensor.shape)
            if len(shape) == 2:
                fan_in = shape[1] if name.endswith("W_skip") else shape[0]
                value = torch.randn(shape, generator=generator) / fan_in ** 0.5
            elif len(shape) == 0:
                value = 0.2 + 0.6 * torch.rand((), generator=generator)
            elif "threshold" in name:
                value = 0.6 * torch.rand(shape, generator=generator)
            else:
                value = 0.4 * torch.randn(shape, generator=generator)
            tensor.copy_(value.to(tensor.dtype))


def build(cfg: dict, out_dir: str, generator: torch.Generator) -> str:
    """SAELens' own SAE of `cfg`, random, saved to out_dir; returns the class it built."""
    if cfg["architecture"] in SAE_CLASS_REGISTRY:
        sae = SAE.from_dict(cfg)
        _randomise(sae, generator)
        sae.save_model(out_dir)
    else:  # a training-only architecture: SAELens saves it as its inference form
        sae = TrainingSAE.from_dict(cfg)
        _randomise(sae, generator)
        sae.save_inference_model(out_dir)
    return type(sae).__name__


def main(request_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    generator = torch.Generator().manual_seed(0)
    done = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "loaded": {},
            "built": {}}
    for case in request["load"]:
        sae = SAE.load_from_disk(case["dir"])
        _outputs(sae, case["x"], case["out"])
        done["loaded"][case["name"]] = type(sae).__name__
    for case in request["build"]:
        built = build(case["cfg"], case["dir"], generator)
        _outputs(SAE.load_from_disk(case["dir"]), case["x"], case["out"])
        done["built"][case["name"]] = built
    print(json.dumps(done))


if __name__ == "__main__":
    main(sys.argv[1])
