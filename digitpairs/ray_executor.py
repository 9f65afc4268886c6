"""Run jobs as Ray tasks on the cluster named by RAY_ADDRESS, or on a local Ray instance."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator


def _call(fn: Callable, job: list):
    import torch

    torch.set_num_threads(1)  # one Ray CPU per task: let Ray, not torch, use the cores
    return fn(job)


def ray_map(fn: Callable, jobs: list) -> Iterator:
    """Submit every job as a Ray task and yield results as tasks finish (order is not kept;
    callers match results to trials by key, so scheduling never changes a result)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    task = ray.remote(num_cpus=1)(_call)
    fn_ref = ray.put(fn)
    pending = [task.remote(fn_ref, job) for job in jobs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
