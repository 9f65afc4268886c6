"""Stage pairs: data.n_draws pair draws into data/pairs/, one safetensors file each."""

import shutil

from digitpairs.core.io import run_stage
from digitpairs.core.paths import MNIST_DIR, PAIRS_DIR
from digitpairs.data import mnist
from digitpairs.data.pairs import write_draws


def main(p: dict) -> None:
    data = p["data"]
    splits = (*mnist.load(MNIST_DIR, train=True), *mnist.load(MNIST_DIR, train=False))
    shutil.rmtree(PAIRS_DIR, ignore_errors=True)
    write_draws(splits, PAIRS_DIR, data["n_draws"], data["seed"], data["n_pairs"])


if __name__ == "__main__":
    run_stage(main)
