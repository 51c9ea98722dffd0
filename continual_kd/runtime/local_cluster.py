"""A multi-node Ray cluster on this machine, for trying distribution without a cloud (`ckd cluster up`).

A head and N worker raylets are started with ``ray start``, all under one temp folder of their own
(``/tmp/ckd-ray-*``), so ``down`` stops exactly these processes (by id: those whose command line names
that folder, and their children) and never another Ray on the machine. Each node carries a custom
resource naming it (``ckd_node_head``, ``ckd_node_w1``, …: one unit), so a test or a job can see, and
ask, where an actor runs. The head has no CPUs by default: the job's actors go to the workers, the
drivers of the Jobs API run on the head.

Token authentication stays on (``RAY_AUTH_MODE=token``; the token is ``~/.ray/auth_token``). Note
that Ray's ``ray start`` on Linux binds the GCS, raylets and agents to the machine's network address
(only the dashboard stays on 127.0.0.1): the token guards them. The embedded Ray of ``ckd submit``
without ``--address`` is the loopback-only one.

What was started is recorded in ``<state dir>/cluster.json`` (default ``~/.cache/continual-kd/cluster``,
``CKD_CLUSTER_DIR`` or ``--state-dir`` elsewhere).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import CkdError

STATE_FILE = "cluster.json"
NODE_RESOURCE = "ckd_node_{}"  # + "head" / "w1", "w2", …


def default_state_dir() -> Path:
    if os.environ.get("CKD_CLUSTER_DIR"):
        return Path(os.environ["CKD_CLUSTER_DIR"])
    cache = Path(os.environ.get("CKD_CACHE_DIR") or Path.home() / ".cache" / "continual-kd")
    return cache / "cluster"


# ------------------------------------------------------------------------------------- token, HTTP


def auth_token() -> str:
    """The cluster token, as Ray reads it: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, or
    ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CkdError(f"{path}: cannot read the Ray token ({e.strerror or e}); a head started with "
                       f"RAY_AUTH_MODE=token writes it there; copy the cluster's token to it or set RAY_AUTH_TOKEN") from None
    if not token:
        raise CkdError(f"{path}: the Ray token file is empty; copy the cluster's token into it or set RAY_AUTH_TOKEN")
    return token


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {auth_token()}"}


def dashboard_get(url: str, path: str, timeout: float = 10.0):
    """GET a dashboard JSON endpoint with the token; a refused token or an unreachable dashboard → one sentence."""
    req = urllib.request.Request(url.rstrip("/") + path, headers=auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise CkdError(f"{url}: the Ray dashboard refused the token (HTTP {e.code}); use the cluster's token in "
                           f"~/.ray/auth_token (or RAY_AUTH_TOKEN)") from None
        raise CkdError(f"{url}{path}: the Ray dashboard answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CkdError(f"{url}: no Ray dashboard answers there ({reason}); start a cluster (`ckd cluster up`) or "
                       f"check the address") from None


def list_nodes(dashboard_url: str) -> list[dict]:
    """Every node the cluster knows (the state API): node_id, state, resources_total, node_ip."""
    body = dashboard_get(dashboard_url, "/api/v0/nodes?limit=1000&detail=1")
    return list(body.get("data", {}).get("result", {}).get("result", []))


# ------------------------------------------------------------------------------------- processes


def _ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise CkdError("the `ray` command is not installed next to this Python; install continual-kd's "
                       "dependencies (pip install -e .) in this environment")
    return found


def _free_port() -> int:
    """A port no process listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


AGENT_PORTS = (20000, 32000)  # above Ray's worker ports (10002-19999), below Linux's ephemeral range (32768+)
_HANDED_OUT: set[int] = set()


def _agent_port() -> list[str]:
    """Each raylet's dashboard agent on a port of its own: Ray's default (52365) is one per machine, so a second
    node here — or any other Ray on this machine, e.g. an embedded one — leaves a node without its agent, and a
    head without one refuses Jobs API submissions ("No available agent"). The port is free now, not one handed to
    an earlier node of this process (whose agent may not listen yet), and outside the ephemeral range, where the
    outgoing connections of a starting cluster could take it before the agent binds it."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*AGENT_PORTS)
        if port not in _HANDED_OUT and _port_free(port):
            _HANDED_OUT.add(port)
            return ["--dashboard-agent-listen-port", str(port)]
    raise CkdError(f"no free port for a dashboard agent in {AGENT_PORTS[0]}-{AGENT_PORTS[1] - 1} on this machine")


def _port_free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME-WAIT leftovers do not block a listener
                sock.bind((host, port))
                sock.listen(1)
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (97, 99):  # no IPv6 here
                continue
            return False
    return True


def _env() -> dict[str, str]:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        raise CkdError(f"RAY_AUTH_MODE={mode}: ckd's clusters always run with token authentication; unset it "
                       f"(or set it to token) and run again")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    # Jobs API drivers run `python -m continual_kd.cli`: this environment's python comes first on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def cluster_processes(temp_dir: str) -> list:
    """This user's processes whose command line names ``temp_dir`` (every Ray process of the cluster
    started under it), with their children (workers, agents, the drivers of submitted jobs)."""
    import ray  # noqa: F401  (Ray ships psutil in its thirdparty_files)
    import psutil

    me = os.getuid()
    found = {}
    for p in psutil.process_iter():
        try:
            if p.uids().real == me and temp_dir in " ".join(p.cmdline()):
                found[p.pid] = p
        except psutil.Error:
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop(procs: list, timeout_s: float = 5.0) -> int:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def read_state(state_dir: Path | None = None) -> dict | None:
    path = Path(state_dir or default_state_dir()) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CkdError(f"{path}: cannot read the local cluster's record ({e}); remove it, then `ckd cluster up`") from None


def _write_state(state_dir: Path, state: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_dir / STATE_FILE)


def _ray_start(args: list[str], env: dict, what: str) -> subprocess.Popen:
    return subprocess.Popen([_ray_executable(), "start", *args, "--disable-usage-stats"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise CkdError(f"`ray start` of the {what} did not finish within {timeout_s:g} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        raise CkdError(f"`ray start` of the {what} failed (exit code {proc.returncode}): {last.strip()[:300]}")


# ------------------------------------------------------------------------------------- up / status / down


def cluster_up(workers: int, cpus_per_worker: float | None = None, gpus_per_worker: int = 0, head_cpus: float = 0,
               port: int = 6379, dashboard_port: int = 8265, object_store_mb: int = 256,
               state_dir: Path | None = None, timeout_s: float = 90.0) -> dict:
    """Start a head and ``workers`` worker raylets on this machine; returns the recorded state."""
    state_dir = Path(state_dir or default_state_dir())
    if workers < 1:
        raise CkdError(f"--workers: must be at least 1, got {workers}")
    if cpus_per_worker is None:
        cpus_per_worker = max(1, (os.cpu_count() or 1) // workers)
    if cpus_per_worker <= 0 or head_cpus < 0 or gpus_per_worker < 0:
        raise CkdError("--cpus-per-worker must be > 0, --head-cpus and --gpus-per-worker ≥ 0")
    if object_store_mb < 80:
        raise CkdError(f"--object-store-mb: Ray needs at least 80 MB per node, got {object_store_mb}")
    old = read_state(state_dir)
    if old is not None:
        if cluster_processes(old["temp_dir"]):
            raise CkdError(f"a local cluster is already up (Ray at {old['address']}, recorded in {state_dir / STATE_FILE}); "
                           f"`ckd cluster down` first")
        shutil.rmtree(old["temp_dir"], ignore_errors=True)  # a cluster that died: forget it
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if not _port_free(p):
            raise CkdError(f"{flag} {p}: the port is in use on this machine (another Ray head?); choose another with {flag}")
    env = _env()
    auth_headers()  # the token must exist before anything starts (Ray writes it with the first head otherwise)
    temp_dir = tempfile.mkdtemp(prefix="ckd-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    store = str(object_store_mb * 1024 * 1024)
    state = {"address": f"127.0.0.1:{port}", "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
             "temp_dir": temp_dir, "started_at": time.time(),
             "nodes": [{"name": "head", "resource": NODE_RESOURCE.format("head"), "cpus": head_cpus, "gpus": 0}]}
    state["nodes"] += [{"name": f"w{i}", "resource": NODE_RESOURCE.format(f"w{i}"), "cpus": cpus_per_worker,
                        "gpus": gpus_per_worker} for i in range(1, workers + 1)]
    _write_state(state_dir, state)  # before anything starts: `down` finds whatever did
    try:
        head = _ray_start(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                           str(dashboard_port), "--include-dashboard", "true", "--num-cpus", f"{head_cpus:g}",
                           "--num-gpus", "0", "--resources", json.dumps({state["nodes"][0]["resource"]: 1}),
                           "--temp-dir", temp_dir, "--object-store-memory", store, *_agent_port()], env, "head")
        _finish(head, "head", timeout_s)
        for n in state["nodes"][1:]:  # one after the other: raylets joining at once can time out on a small box
            # each worker under a temp folder of its own: in the head's, a worker's runtime-env agent deleted the
            # packages of a job's working folder it no longer used — the driver's working directory on the head
            own = os.path.join(temp_dir, n["name"])
            os.makedirs(own, exist_ok=True)
            _finish(_ray_start(["--address", state["address"], "--num-cpus", f"{cpus_per_worker:g}", "--num-gpus",
                                str(gpus_per_worker), "--resources", json.dumps({n["resource"]: 1}), "--temp-dir",
                                own, "--object-store-memory", store, *_agent_port()], env, n["name"]),
                    f"worker {n['name']}",
                    timeout_s)
        wait_for_nodes(state, timeout_s)
    except BaseException:
        cluster_down(state_dir)
        raise
    return state


def node_rows(state: dict) -> list[dict]:
    """The cluster's nodes as the GCS knows them, named by their ckd_node_* resource (alive ones first)."""
    rows = []
    for n in list_nodes(state["dashboard_url"]):
        res = n.get("resources_total") or {}
        names = [r[len("ckd_node_"):] for r in res if r.startswith("ckd_node_")]
        rows.append({"name": names[0] if names else "?", "node_id": n.get("node_id"), "state": n.get("state"),
                     "ip": n.get("node_ip"), "cpus": res.get("CPU", 0.0), "gpus": res.get("GPU", 0.0),
                     "resources": {k: v for k, v in res.items() if not k.startswith("node:")},
                     "metrics_export_port": n.get("metrics_export_port")})
    order = {n["name"]: i for i, n in enumerate(state["nodes"])}
    rows.sort(key=lambda r: (r["state"] != "ALIVE", order.get(r["name"], 1_000)))
    return rows


def wait_for_nodes(state: dict, timeout_s: float = 60.0) -> list[dict]:
    want = {n["name"] for n in state["nodes"]}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rows = node_rows(state)
        except CkdError:
            rows = []
        alive = {r["name"] for r in rows if r["state"] == "ALIVE"}
        if want <= alive:
            return rows
        if time.monotonic() > deadline:
            raise CkdError(f"the local cluster's nodes {', '.join(sorted(want - alive))} did not join within "
                           f"{timeout_s:g} s; see the logs under {state['temp_dir']}/session_latest/logs (a worker's: "
                           f"{state['temp_dir']}/<name>/session_latest/logs)")
        time.sleep(0.5)


def cluster_status(state_dir: Path | None = None) -> dict | None:
    """The recorded cluster with its nodes as the GCS sees them; None when none is up."""
    state = read_state(state_dir)
    if state is None:
        return None
    if not cluster_processes(state["temp_dir"]):
        return {**state, "up": False, "nodes_now": []}
    return {**state, "up": True, "nodes_now": node_rows(state)}


def cluster_down(state_dir: Path | None = None) -> int:
    """Stop every process of the recorded cluster (by id) and remove its temp folder; returns how many."""
    state_dir = Path(state_dir or default_state_dir())
    state = read_state(state_dir)
    if state is None:
        return 0
    n = _stop(cluster_processes(state["temp_dir"]))
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return n
