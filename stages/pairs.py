"""Stage pairs: data.n_draws pair draws into data/pairs/, one safetensors file each."""

import shutil

from digitpairs.core.io import run_stage
from digitpairs.core.paths import MNIST_DIR, PAIRS_DIR
from digitpairs.data import mnist
from digitpairs.data.pairs import draw_path, make_draw, save_draw


def main(p: dict) -> None:
    data = p["data"]
    splits = (*mnist.load(MNIST_DIR, train=True), *mnist.load(MNIST_DIR, train=False))
    shutil.rmtree(PAIRS_DIR, ignore_errors=True)
    for draw in range(data["n_draws"]):
        tensors, meta = make_draw(*splits, seed=data["seed"], draw=draw, n_pairs=data["n_pairs"])
        save_draw(tensors, meta, draw_path(PAIRS_DIR, draw))


if __name__ == "__main__":
    run_stage(main)
