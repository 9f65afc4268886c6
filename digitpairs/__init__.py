"""Paired-MNIST comparison study: data draws, models, training and evaluation.

Importing the package pins the numeric libraries' code paths before torch computes anything
(:mod:`digitpairs.core.numerics`), in every process that imports it: stages, pool and Ray workers, tests.
"""

from digitpairs.core import numerics as _numerics

_numerics.pin()
