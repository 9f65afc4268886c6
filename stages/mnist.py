"""Stage mnist: torchvision's MNIST download into data/mnist (MNIST_MIRROR overrides the mirrors)."""

from digitpairs.core.io import run_stage
from digitpairs.core.paths import MNIST_DIR
from digitpairs.data import mnist

if __name__ == "__main__":
    run_stage(lambda p: mnist.download(MNIST_DIR))
