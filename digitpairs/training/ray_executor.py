"""Run jobs as Ray tasks on the cluster named by RAY_ADDRESS, or on a local Ray instance.

Results equal the local executor's bit for bit: a task runs the same function with the same torch
thread count, and each trial's randomness comes from its own key, not from where it runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Iterator


def _call(fn: Callable, threads: int, job: list, keys: list, *values: object):
    """A Ray task: ``fn(job, shared)`` with the run's torch thread count (Ray reserves that many CPUs)."""
    import torch

    torch.set_num_threads(threads)
    return fn(job, dict(zip(keys, values, strict=True))) if keys else fn(job)


def _start(cpus: int) -> bool:
    """Connect to RAY_ADDRESS, or start a local instance with ``cpus`` CPUs, quietly and without a
    dashboard. Returns whether this call started Ray (and so must shut it down)."""
    import ray

    from digitpairs.core import numerics

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        import digitpairs

        # Cluster nodes need this package's code (torch and the rest must be installed there) and
        # the numeric pins in their workers' environment before torch loads.
        ray.init(address=address, runtime_env={"py_modules": [digitpairs], "env_vars": numerics.env()}, **quiet)
    else:
        ray.init(num_cpus=cpus, runtime_env={"env_vars": numerics.env()}, **quiet)
    return True


def ray_map(
    fn: Callable,
    jobs: list,
    *,
    threads: int = 1,
    gpus: float = 0,
    cpus: int = 1,
    shared: dict[Hashable, object] | None = None,
    needs: Callable[[list], list] | None = None,
) -> Iterator:
    """Submit every job as a Ray task and yield results as tasks finish.

    Order is not kept: callers match results to trials by key, so scheduling never changes a
    result. ``shared`` values (the draws) go to the object store once; a task receives those that
    ``needs(job)`` names as ``fn(job, {key: value})``, so workers need no access to local files.
    A local Ray instance (no RAY_ADDRESS) gets ``cpus`` CPUs; the caller knows how many this
    process may use (it is passed in, so this module imports nothing from the runner: no cycle).
    Ray is shut down at the end, or on an interrupt, if this call started it.
    """
    if not jobs:  # everything resumed from a checkpoint: no need to start or reach a cluster
        return
    import ray

    started = _start(cpus)
    pending: list = []
    try:
        refs = {k: ray.put(v) for k, v in (shared or {}).items()}
        task = ray.remote(num_cpus=threads, num_gpus=gpus)(_call)
        fn_ref = ray.put(fn)
        for job in jobs:
            keys = list(needs(job)) if needs and refs else []
            pending.append(task.remote(fn_ref, threads, job, keys, *(refs[k] for k in keys)))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)  # queued work nobody will read
        raise
    finally:
        if started:
            ray.shutdown()
