"""MNIST and the pair draws (stages mnist and pairs).

A folder per concern, so dvc.yaml can name each stage's code as one or two folders."""
