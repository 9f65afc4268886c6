"""Run jobs as Ray tasks on the cluster named by RAY_ADDRESS, or on a local Ray instance.

Results equal the local executor's bit for bit: a task runs the same function with the same torch
thread count, and each trial's randomness comes from its own key, not from where it runs. A task
refuses to compute on a node whose numeric settings (pins, library versions, instruction set:
:func:`numerics.fingerprint`) differ from the driver's, since the checkpoint key the driver writes
names the driver's settings.

Failures a cluster user meets end the stage with one line (:class:`StageError`): an address where
nothing accepts connections (within :data:`CONNECT_TIMEOUT_S`) or nothing answers as a Ray head (within
:data:`ANSWER_TIMEOUT_S`), a cluster that asks for an authentication token the driver lacks, and a
cluster lost mid-run (the head gone), with the number of trials checkpointed.
A lost worker node is Ray's business: its tasks are retried elsewhere (:data:`MAX_RETRIES`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

from digitpairs.core.io import StageError

# Seconds to reach RAY_ADDRESS before the stage gives up (Ray itself retries for minutes, or for
# ever when it rewrites a loopback address to another interface).
CONNECT_TIMEOUT_S = 10.0
# Seconds a server at RAY_ADDRESS that accepted the connection has to answer the opening of a gRPC
# connection, as a Ray head (its GCS, its Ray Client server) does at once. Ray itself waits for ever on
# one that stays silent (a wrong service, a stopped head, a proxy), printing a warning every 30 s.
ANSWER_TIMEOUT_S = 30.0
# What a gRPC client sends first (HTTP/2's connection preface and an empty SETTINGS frame); a gRPC server
# answers with its own SETTINGS frame before anything else.
_GRPC_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
# Ray's switch for a cluster on loopback only (read when ray is imported): without it Ray replaces a
# loopback RAY_ADDRESS, and the address the driver advertises, by this machine's network address.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Retries of a task whose worker or node died (Ray's default, stated): trials are pure functions
# of their key, so rerunning one elsewhere gives the same bits.
MAX_RETRIES = 3
# While it waits for results the driver checks, about every WATCH_S seconds, that the head still
# accepts connections; LOST_AFTER failed checks in a row mean the cluster is gone. Without the head
# Ray can neither retry a lost task nor place a new one, and ends the driver itself after 60 s
# without a word; stopping first gives one line and keeps every finished trial checkpointed.
WATCH_S = 1.0
LOST_AFTER = 2


class NodeRefused(RuntimeError):
    """A task found its node's numeric settings differ from the driver's (raised on the node)."""


class ClusterLost(StageError):
    """The Ray cluster went away mid-run (head node down, driver disconnected)."""


def runtime_env(cluster: bool) -> dict:
    """The workers' runtime environment: the numeric pins, set by Ray in the worker's environment
    before its Python starts (so before torch loads), whatever the node's own environment holds;
    on a cluster also this package (``py_modules``), so nodes need only the pinned requirements."""
    from digitpairs.core import numerics

    env = numerics.env()
    env.setdefault(numerics.UNPINNED_ENV, "0")  # a node's own DIGITPAIRS_UNPINNED=1 must not leak in
    out: dict = {"env_vars": env}
    if cluster:
        import digitpairs

        out["py_modules"] = [str(Path(digitpairs.__file__).parent)]
        out["excludes"] = ["__pycache__"]
    return out


def _call(fn: Callable, threads: int, expect: str, device: str, job: list, keys: list, *values: object):
    """A Ray task: ``fn(job, shared)`` with the run's torch thread count (Ray reserves that many CPUs).

    Refuses a node whose numeric fingerprint differs from the driver's ``expect``. Returns the node's
    id with the result, so the driver can say where its trials ran.
    """
    from digitpairs.core import numerics

    import ray
    import torch

    if numerics.digest(device) != expect:
        raise NodeRefused(
            f"node {ray.get_runtime_context().get_node_id()} computes with other numeric settings than the "
            f"driver ({numerics.fingerprint(device)}): install the pinned requirements.txt on every node."
        )
    torch.set_num_threads(threads)
    out = fn(job, dict(zip(keys, values, strict=True))) if keys else fn(job)
    return ray.get_runtime_context().get_node_id(), out


def _hostport(address: str) -> tuple[str, int] | None:
    """``host:port`` of an explicit address (``ray://`` included); None for ``auto``/``local``."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _reachable(address: str, timeout: float, answer_timeout: float = ANSWER_TIMEOUT_S) -> None:
    """Raise StageError unless something accepts a TCP connection at ``address`` within ``timeout`` s
    and answers there as a gRPC server (as a Ray head does) within ``answer_timeout`` s.

    Ray retries an address where nothing listens for minutes, and waits for ever on one that accepts
    and stays silent; this check connects to the address exactly as written, bounded in time.
    """
    hp = _hostport(address)
    if hp is None:
        return
    deadline, err = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(hp, timeout=min(5.0, max(0.1, deadline - time.monotonic()))) as sock:
                if not _answers(sock, answer_timeout):
                    raise StageError(
                        f"RAY_ADDRESS={address}: {hp[0]}:{hp[1]} accepts connections but nothing there answers as a "
                        f"Ray head (no gRPC reply within {answer_timeout:.0f} s: another service, or a head that "
                        "hangs); point RAY_ADDRESS at the head's GCS port (`ray start --head` prints it) or "
                        "ray://<head>:10001, restart the head, or unset RAY_ADDRESS for a local instance."
                    )
                return
        except OSError as e:
            err = e
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise StageError(
        f"RAY_ADDRESS={address}: nothing answers at {hp[0]}:{hp[1]} within {timeout:.0f} s ({err}); "
        "start the cluster (`ray start --head`) or fix the address, or unset RAY_ADDRESS for a local instance."
    )


def _answers(sock: socket.socket, timeout: float) -> bool:
    """Whether the server on ``sock`` replies at all (any bytes, or closing: a TLS head refusing cleartext
    answers too) within ``timeout`` s of the opening of a gRPC connection; False if it stays silent."""
    sock.sendall(_GRPC_HELLO)
    sock.settimeout(timeout)
    try:
        sock.recv(1)
    except TimeoutError:
        return False
    except OSError:  # reset by the peer: it answered, if only to refuse
        pass
    return True


def _keep_loopback(address: str) -> None:
    """Keep a driver told a loopback address (127.0.0.1, ::1, localhost) on loopback: Ray replaces such an
    address by this machine's network address, both the head's (unreachable where the head listens on
    loopback only) and the one the driver advertises, unless :data:`LOOPBACK_ENV` is off when ray is
    imported. Other addresses are left to Ray."""
    hp = _hostport(address)
    if hp is None:
        return
    try:
        loopback = hp[0] == "localhost" or ipaddress.ip_address(hp[0]).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        os.environ[LOOPBACK_ENV] = "0"


def connect(address: str, env: dict, **kwargs: object) -> None:
    """``ray.init(address)`` whose workers see only ``env``'s code.

    Ray adds the driver's working directory to every worker's ``sys.path``, ahead of ``py_modules``:
    a node holding a folder at that path (a shared home, an old clone in the same place) would run
    its own copy of digitpairs under this driver's checkpoint keys. An empty ``working_dir`` turns
    that off (Ray skips the driver's folders when a job has one); it is uploaded once, at connect.
    """
    import tempfile

    import ray

    with tempfile.TemporaryDirectory(prefix="digitpairs-ray-") as empty:
        Path(empty, "README").write_text("An empty working directory: digitpairs travels as py_modules.\n")
        ray.init(address=address, runtime_env={**env, "working_dir": empty}, **kwargs)


def _start(cpus: int) -> bool:
    """Connect to RAY_ADDRESS, or start a local instance with ``cpus`` CPUs, quietly and without a
    dashboard. Returns whether this call started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    address = os.environ.get("RAY_ADDRESS") or None
    if not address:
        ray.init(num_cpus=cpus, runtime_env=runtime_env(cluster=False), **quiet)
        return True
    _reachable(address, CONNECT_TIMEOUT_S)
    try:
        connect(address, runtime_env(cluster=True), **quiet)
    except ray.exceptions.AuthenticationError as err:
        raise StageError(
            f"RAY_ADDRESS={address}: the cluster refused this driver's authentication token ({err.message.strip()}); "
            "give the driver the head's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<a copy of the "
            "head's ~/.ray/auth_token> (or RAY_AUTH_TOKEN=<token>)."
        ) from None
    except ConnectionError as err:
        raise StageError(f"RAY_ADDRESS={address}: could not connect to the Ray cluster: {err}") from None
    return True


def _head_answers(address: str) -> bool:
    """Whether the head at ``address`` accepts a TCP connection (True for ``auto``: nothing to check)."""
    hp = _hostport(address)
    if hp is None:
        return True
    try:
        with socket.create_connection(hp, timeout=2.0):
            return True
    except OSError:
        return False


def _gather(pending: list, nodes: Counter) -> Iterator:
    """The results of the ``pending`` tasks as they finish, removing each from the list (what is left
    there is what an interrupt cancels) and counting its node in ``nodes``; with a cluster
    (``RAY_ADDRESS``), :class:`ClusterLost` once its head stops answering."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    failed, checked = 0, time.monotonic()
    while pending:
        done, pending[:] = ray.wait(list(pending), num_returns=1, timeout=WATCH_S)
        if address and time.monotonic() - checked >= WATCH_S:
            checked = time.monotonic()
            failed = 0 if _head_answers(address) else failed + 1
            if failed >= LOST_AFTER:
                raise ClusterLost(
                    f"lost the Ray cluster: its head at {address} stopped answering "
                    f"({len(pending) + len(done)} jobs unfinished)"
                )
        if done:
            try:
                node, result = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, NodeRefused):  # a node without the pins or versions: one line
                    raise StageError(str(err.cause)) from None
                raise
            nodes[node] += 1
            yield result


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
    Ray is shut down at the end, or on an interrupt, if this call started it. At the end, one line
    on stderr says how many jobs ran on which nodes. A cluster lost mid-run raises :class:`ClusterLost`.
    """
    if not jobs:  # everything resumed from a checkpoint: no need to start or reach a cluster
        return
    _keep_loopback(os.environ.get("RAY_ADDRESS", ""))
    from digitpairs.core import numerics

    import ray

    device = "cuda" if gpus else "cpu"
    expect = numerics.digest(device)
    started = _start(cpus)
    pending: list = []
    nodes: Counter = Counter()
    try:
        refs = {k: ray.put(v) for k, v in (shared or {}).items()}
        task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=MAX_RETRIES)(_call)
        fn_ref = ray.put(fn)
        for job in jobs:
            keys = list(needs(job)) if needs and refs else []
            pending.append(task.remote(fn_ref, threads, expect, device, job, keys, *(refs[k] for k in keys)))
        yield from _gather(pending, nodes)
        print(
            f"ray: {sum(nodes.values())} jobs ran on {len(nodes)} node(s): "
            + ", ".join(f"{n} ({c})" for n, c in sorted(nodes.items())),
            file=sys.stderr,
        )
    except ClusterLost:
        raise  # nothing to cancel: the cluster is gone (ray.shutdown only disconnects)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)  # queued work nobody will read
        raise
    finally:
        if started:
            ray.shutdown()
