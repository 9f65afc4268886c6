"""Paired-MNIST comparison study: data draws, models, training and evaluation."""
