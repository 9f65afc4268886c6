"""Models, training, the lockstep engine, executors and the study's experiments (the training
stages cv, loss_weights, grad_norms, train, and evaluate).

A folder per concern, so dvc.yaml can name each stage's code as one or two folders."""
