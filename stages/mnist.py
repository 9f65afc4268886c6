"""Stage mnist: torchvision's MNIST download into data/mnist (MNIST_MIRROR overrides the mirrors)."""

from digitpairs import mnist
from digitpairs.io import run_stage
from digitpairs.paths import MNIST_DIR

if __name__ == "__main__":
    run_stage(lambda p: mnist.download(MNIST_DIR))
