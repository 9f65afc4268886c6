"""A real multi-node Ray cluster on loopback, the cv@pair stage against it, and its failures.

Run by tests/test_ray_cluster.py INSIDE a network and PID namespace it creates (``unshare --net
--pid``), whose only interface is loopback: no process here can bind or reach another address, and
when this script ends the kernel ends every process it started. Usage::

    python tests/ray_cluster.py REPO WORK REPORT.json

REPO is a clone whose pair draws are made; cv@pair runs there with ``executor: local`` (the
reference), then with ``executor: ray`` against the cluster. Nodes run a Python environment in
which ``digitpairs`` is not importable (only ``py_modules`` brings it), in their own working
folders, with token authentication (one token file for every node and the driver, none in the
user's home). Every step's findings go
to REPORT.json. ``python tests/ray_cluster.py probe ADDRESS N`` is the short-lived driver that waits
for N worker nodes and reports them (and, with N > 0, what a task sees on each).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

OUTS = ("data/cv/pair.csv", "data/cv/pair_selected.json")
CKPT = "data/checkpoints/cv-pair.jsonl"
# digitpairs.core.numerics's PIN_VARS and UNPINNED_ENV (not imported here: node_env imports torch first)
PINS = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "CUBLAS_WORKSPACE_CONFIG", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
PINS += ("OPENBLAS_NUM_THREADS", "DIGITPAIRS_UNPINNED")


def node_env(work: Path) -> dict:
    """The nodes' environment: no numeric pins, no path to digitpairs, a temporary home and token."""
    env = {k: v for k, v in os.environ.items() if k not in PINS and k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(
        HOME=str(work / "home"),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(work / "auth_token"),
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def node_python(work: Path) -> str:
    """A virtual environment that sees the test venv's packages but not its .pth files, so the
    editable install of digitpairs is invisible to the nodes."""
    import sysconfig

    root = work / "nodeenv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    (next(root.glob("lib/python*/site-packages")) / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(root / "bin" / "python")


class Cluster:
    """Ray nodes as ``ray start --block`` processes, each the leader of its own process group."""

    def __init__(self, work: Path, port: int) -> None:
        self.work, self.port, self.py = work, port, node_python(work) if not (work / "nodeenv").exists() else ""
        self.py = self.py or str(work / "nodeenv" / "bin" / "python")
        self.nodes: dict[str, subprocess.Popen] = {}
        self.address = f"127.0.0.1:{port}"

    def _start(self, name: str, base: int, *args: str) -> None:
        """Start a node with every port of its own (nodes share one address), and wait (90 s at
        most) until ``ray start`` says it runs: nodes started at once race for ports."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        ports = ["node-manager", "object-manager", "runtime-env-agent", "metrics-export"]
        ports += ["dashboard-agent-grpc", "dashboard-agent-listen"]
        cmd = [self.py, "-c", "from ray.scripts.scripts import main; main()", "start", "--block"]
        cmd += ["--node-ip-address=127.0.0.1", *args, *(f"--{p}-port={base + i}" for i, p in enumerate(ports, 2))]
        cmd += [f"--min-worker-port={base + 10}", f"--max-worker-port={base + 49}"]
        log = folder / "ray-start.log"
        with open(log, "w") as out:
            self.nodes[name] = subprocess.Popen(
                cmd, cwd=folder, env=node_env(self.work), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if time.monotonic() > deadline or self.nodes[name].poll() is not None:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def head(self) -> None:
        p = self.port
        self._start(
            f"head-{p}",
            p + 50,
            "--head",
            f"--port={p}",
            "--num-cpus=0",  # trials run on the worker nodes only
            "--include-dashboard=false",
            f"--temp-dir={self.work / 'ray'}",
            f"--ray-client-server-port={p + 1}",
        )

    def worker(self, i: int) -> None:
        self._start(f"worker{i}", self.port + 50 * (i + 1) + 50, f"--address={self.address}", "--num-cpus=1")

    def members(self, name: str) -> list[int]:
        """Every process of node ``name``: its session (Ray puts each worker in a process group of
        its own, within the session of the node's ``ray start``)."""
        sid, out = self.nodes[name].pid, []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.getsid(int(proc.name)) == sid:
                    out.append(int(proc.name))
            except OSError:
                continue
        return out

    def busy(self, name: str) -> bool:
        """Whether a process of node ``name`` runs a trial (Ray names a busy worker ``ray::_call``)."""
        for pid in self.members(name):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_call"):
                    return True
            except OSError:
                continue
        return False

    def pause(self, *names: str) -> None:
        """SIGSTOP every process of the nodes ``names`` (SIGKILL still ends them)."""
        for pid in [pid for name in names for pid in self.members(name)]:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass

    def kill(self, name: str) -> float:
        """SIGKILL a node: its ``ray start`` process, raylet, agents and workers (one session)."""
        pids = self.members(name)
        t = time.monotonic()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.pop(name).wait()
        return t

    def start(self) -> Cluster:
        """The test's layout: a head without CPUs (it schedules, stores the draws) and two 1-CPU workers."""
        self.head()
        self.worker(1)
        self.worker(2)
        return self

    def stop(self) -> None:
        for name in list(self.nodes):
            self.kill(name)


def sees() -> dict:
    """What a task sees on its node: torch's instruction set (imported first, so as the worker's
    environment alone sets it), the pins, where digitpairs comes from and its fingerprint."""
    import importlib.util
    import os
    import sys

    import ray
    import torch

    out = {
        "node": ray.get_runtime_context().get_node_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pins": {k: os.environ.get(k) for k in PINS},
        "cwd": os.getcwd(),
        "python": sys.executable,
    }
    spec = importlib.util.find_spec("digitpairs")
    out["digitpairs"] = spec.origin if spec else None
    try:
        from digitpairs.core import numerics  # pins, then refuses a torch that already dispatched unpinned

        out["digest"] = numerics.digest()
    except RuntimeError as err:
        out["refused"] = str(err)
    return out


def probe(address: str, workers: int, env: str) -> dict:
    """Wait (60 s at most) for ``workers`` live worker nodes, then report the nodes and what a task
    sees on each worker node, in the stage's runtime environment (``env`` "stage") or with the
    package but without the pins ("unpinned")."""
    from digitpairs.core import numerics
    from digitpairs.training.ray_executor import connect, runtime_env

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    renv = runtime_env(cluster=True)
    if env == "unpinned":
        del renv["env_vars"]
    connect(address, renv, log_to_driver=False, include_dashboard=False)
    deadline = time.monotonic() + 60
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if sum(n["Resources"].get("CPU", 0) > 0 for n in nodes) >= workers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out: dict = {"driver_digest": numerics.digest(), "tasks": []}
    out["nodes"] = [
        {
            "id": n["NodeID"],
            "address": n["NodeManagerAddress"],
            "head": "node:__internal_head__" in n["Resources"],
            "cpus": n["Resources"].get("CPU", 0),
        }
        for n in nodes
    ]
    task = ray.remote(num_cpus=1)(sees)
    for n in out["nodes"]:
        if n["cpus"] and workers:
            on = NodeAffinitySchedulingStrategy(n["id"], soft=False)
            out["tasks"].append(ray.get(task.options(scheduling_strategy=on).remote(), timeout=120))
    ray.shutdown()
    return out


def run_probe(cluster: Cluster, workers: int, env: dict, renv: str = "stage") -> dict:
    cp = subprocess.run(
        [sys.executable, __file__, "probe", cluster.address, str(workers), renv],
        env=env,  # PYTHONPATH: the clone's digitpairs, the one the stage ships
        capture_output=True,
        text=True,
        timeout=240,
    )
    if cp.returncode:
        raise RuntimeError(f"probe failed: {cp.stdout}\n{cp.stderr}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def md5s(repo: Path) -> dict:
    return {o: hashlib.md5((repo / o).read_bytes()).hexdigest() if (repo / o).exists() else None for o in OUTS}


def ckpt_rows(repo: Path) -> list[dict]:
    path = repo / CKPT
    return [json.loads(line)["row"] for line in path.read_text().splitlines()] if path.exists() else []


class Stage:
    """``dvc repro -f -s cv@pair`` in the background, watched through its checkpoint."""

    def __init__(self, repo: Path, env: dict, fresh: bool = True) -> None:
        if fresh:
            (repo / CKPT).unlink(missing_ok=True)
        self.repo, self.t0 = repo, time.monotonic()
        dvc = str(Path(sys.executable).parent / "dvc")
        self.proc = subprocess.Popen(
            [dvc, "repro", "-f", "-s", "cv@pair"],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_rows(self, n: int, timeout: float = 180) -> float:
        """Poll (every 0.1 s, ``timeout`` s at most) until the checkpoint holds ``n`` rows."""
        deadline = time.monotonic() + timeout
        while len(ckpt_rows(self.repo)) < n:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"checkpoint stayed below {n} rows (stage rc {self.proc.poll()})")
            time.sleep(0.1)
        return time.monotonic()

    def finish(self, timeout: float = 300) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        rows = ckpt_rows(self.repo)
        return {
            "rc": self.proc.returncode,
            "seconds": round(time.monotonic() - self.t0, 1),
            "stderr": err,
            "stdout": out,
            "md5": md5s(self.repo),
            "rows": len(rows),
            "keys": sorted(r["key"] for r in rows),
        }


def executor(repo: Path, name: str) -> None:
    """Set ``cv.executor`` in the clone's params.yaml."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["cv"]["executor"] = name
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def listening() -> list[str]:
    """Local addresses of every listening TCP socket in this namespace."""
    cp = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True)
    return sorted({line.split()[3].rsplit(":", 1)[0] for line in cp.stdout.splitlines()})


def driver_env(repo: Path, work: Path) -> dict:
    """The driver's environment, once this process is known to be in a loopback-only network namespace."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        raise SystemExit(f"not in a loopback-only network namespace: {interfaces}")
    (work / "home").mkdir(parents=True, exist_ok=True)
    (work / "auth_token").write_text(os.urandom(32).hex())
    return {
        **os.environ,
        "HOME": str(work / "home"),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(work / "auth_token"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(repo),
    }


def started(c: Cluster, driver: dict, work: Path) -> dict:
    """Start ``c``; what a job sees on it (pinned and unpinned runtime env), and whether a node imports the
    project without the job's runtime env."""
    t = time.monotonic()
    c.start()
    report = {"start": run_probe(c, 2, driver)}
    report["start"]["seconds"] = round(time.monotonic() - t, 1)
    report["start"]["listening"] = listening()
    report["unpinned"] = run_probe(c, 2, driver, "unpinned")
    cp = subprocess.run(
        [c.py, "-c", "import digitpairs"], cwd=work / "worker1", env=node_env(work), capture_output=True, text=True
    )
    report["node_imports_digitpairs"] = cp.stderr.strip().splitlines()[-1:] or ["imported"]
    return report


def worker_killed(c: Cluster, repo: Path, env: dict) -> dict:
    """A worker node dies mid-grid: SIGKILL its whole process group after two trials are recorded."""
    s = Stage(repo, env)
    s.wait_rows(2)
    deadline = time.monotonic() + 60
    while not c.busy("worker1") and time.monotonic() < deadline:  # kill it while it trains
        time.sleep(0.05)
    busy = c.busy("worker1")
    before = len(ckpt_rows(repo))
    t_kill = c.kill("worker1")
    t_next = s.wait_rows(before + 1)
    res = {**s.finish(), "rows_at_kill": before, "was_training": busy, "kill_to_next_row_s": round(t_next - t_kill, 1)}
    res["kill_to_end_s"] = round(time.monotonic() - t_kill, 1)
    return res


def head_killed(c: Cluster, repo: Path, env: dict) -> dict:
    """The head dies mid-grid: the stage must stop by itself, with one line."""
    c.worker(3)
    s = Stage(repo, env)
    s.wait_rows(1)
    # Workers paused first: the trials left take about as long as noticing the lost head (2 checks,
    # a second apart), so on a loaded machine they could all finish first and the stage, rightly, succeed.
    c.pause("worker2", "worker3")
    t_kill = c.kill(f"head-{c.port}")
    res = s.finish(timeout=180)
    res["kill_to_exit_s"] = round(time.monotonic() - t_kill, 1)
    return res


def closed_port(repo: Path, driver: dict) -> dict:
    """Nothing listens at the address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Stage(repo, {**driver, "RAY_ADDRESS": f"127.0.0.1:{port}"}).finish(timeout=120) | {
        "address": f"127.0.0.1:{port}"
    }


def main(repo: Path, work: Path, report_path: Path) -> None:
    report: dict = {}

    def save() -> None:
        report_path.write_text(json.dumps(report, indent=1, sort_keys=True))

    driver = driver_env(repo, work)
    report["interfaces"] = [name for _, name in socket.if_nameindex()]
    clusters = [Cluster(work, 6400)]
    try:
        c = clusters[0]
        report |= started(c, driver, work)
        save()
        env = {**driver, "RAY_ADDRESS": c.address}

        # The reference, then the stage through RAY_ADDRESS, back to back (the same load on the machine).
        executor(repo, "local")
        report["local"] = Stage(repo, env).finish()
        executor(repo, "ray")
        report["ray"] = Stage(repo, env).finish()
        save()
        report["worker_killed"] = worker_killed(c, repo, env)
        save()
        report["head_killed"] = head_killed(c, repo, env)
        save()
        c.stop()

        # A new cluster: the rerun resumes from the checkpoint.
        t = time.monotonic()
        c = Cluster(work, 7400)
        clusters.append(c)
        c.start()
        report["restart_seconds"] = round(time.monotonic() - t, 1)
        report["rerun"] = Stage(repo, {**driver, "RAY_ADDRESS": c.address}, fresh=False).finish()
        save()
        report["closed_port"] = closed_port(repo, driver)
        save()
    finally:
        for c in clusters:
            c.stop()
        save()


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        print(json.dumps(probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
