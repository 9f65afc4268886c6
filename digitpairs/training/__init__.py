"""What a training is (semantics), the two engines that compute it (train: the per-model loop; lockstep),
models, executors and the study's experiments (the training stages cv, loss_weights, grad_norms, recipe,
controls, train, and evaluate).

A folder per concern, so dvc.yaml can name each stage's code as one or two folders."""
