"""``ckd serve JOB``: the job's student over HTTP with Ray Serve, following each new committed snapshot.

    GET /recommend?user=U&k=10   → 200 {"user", "k", "block", "commit", "items": [{"item", "score"}, …]}
                                   400 bad parameters, 404 unknown user, 503 nothing committed yet
    GET /healthz                 → 200 the served block, commit, snapshot, refused snapshots (503 while waiting)

Each replica runs a ``serving.SnapshotFollower``: a thread polls the job's commit log, loads a newer
committed snapshot fully beside the served one and swaps the reference, so requests are never refused
or held during a swap; a snapshot that fails verification is never served. The scoring itself is plain
torch in ``continual_kd/serving.py``; this module is the Ray part only.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
from pathlib import Path
from typing import Callable

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import CkdError
from ..serving import MAX_K, SnapshotFollower, UnknownUser
from ..stopping import Stop, StopFlag, catch_stop_signals, nap_until, restore_signals

logger = logging.getLogger("ray.serve")
APP_NAME = "ckd"
USAGE = "use GET /recommend?user=U&k=10 or GET /healthz"


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def parse_recommend_query(pairs: list[tuple[str, str]]) -> tuple[str, int]:
    """(user, k) from the query's (name, value) pairs; ValueError with the message a 400 answers."""
    allowed = ("user", "k")
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise ValueError(f"unknown parameter {name!r}; the parameters are user (required) and k (default 10)")
        if name in seen:
            raise ValueError(f"parameter {name!r} is given more than once; give it once")
        seen[name] = value
    user = seen.get("user", "").strip()
    if not user:
        raise ValueError("parameter 'user' is missing or empty; give an external user id, e.g. /recommend?user=196")
    text = seen.get("k", "10").strip()
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= MAX_K:
        raise ValueError(f"parameter 'k' must be a whole number from 1 to {MAX_K}, got {text!r}")
    return user, int(text)


@serve.deployment(name="recommend", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class RecommendServer:
    def __init__(self, store_root: str, job_name: str, runs_dir: str, poll_s: float, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)  # one small matrix product per request: more threads only contend
        self.follower = SnapshotFollower(store_root, job_name, runs_dir, log=self._log)
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._poll()  # ready with the newest good snapshot (if any) before the first request
        self._thread = threading.Thread(target=self._follow, name="ckd-snapshot-follower", daemon=True)
        self._thread.start()

    @staticmethod
    def _log(message: str) -> None:
        (logger.warning if message.startswith("not serving") else logger.info)(message)

    def _poll(self) -> None:
        try:
            self.follower.poll()
        except Exception:  # a poll that fails (a store being repaired, …) leaves the served student as it is
            logger.exception("polling the commit log failed; serving the current snapshot")

    def _follow(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._poll()

    def check_health(self) -> None:
        """Serve's periodic replica check: a replica whose follower thread died is restarted by Serve."""
        if not self._thread.is_alive():
            raise RuntimeError("the snapshot follower thread stopped; this replica would never swap again")

    def __del__(self):
        self._stop.set()

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path not in ("/recommend", "/healthz"):
            return _error(404, f"no such path {request.url.path!r}; {USAGE}")
        if request.method not in ("GET", "HEAD"):
            return _error(405, f"{request.method} is not allowed; {USAGE}")
        if path == "/healthz":
            health = self.follower.health()
            return JSONResponse(health, status_code=200 if health["served"] is not None else 503)
        try:
            user, k = parse_recommend_query(request.query_params.multi_items())
        except ValueError as e:
            return _error(400, str(e))
        served = self.follower.current  # read once: this request is answered by one snapshot throughout
        if served is None:
            return _error(503, f"job {self.follower.job_name!r} has no committed snapshot that can be served yet; "
                               f"wait for its first block (GET /healthz says why)")
        try:
            # a few microseconds of torch for a small student: scored on the event loop, no thread hop
            items = served.recommend(user, k)
        except UnknownUser:
            return _error(404, f"unknown user {user!r}: the student served from block {served.block} does not know "
                               f"this id (not in the stream store, or first seen after that block)",
                          user=user, block=served.block)
        return JSONResponse({"user": user, "k": k, "job": served.job, "block": served.block,
                             "commit": served.commit.commit_id, "items": items})


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise CkdError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick a free port "
                           f"(--port) or stop what uses it") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def get_json(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def serve_job(job, host: str, port: int, poll_s: float, replicas: int, torch_threads: int,
              emit: Callable[[dict], None], stop: Stop | None = None,
              dashboard_port: int | None = None) -> None:
    """Start an embedded Ray (loopback, token auth) and the Serve app; report what it serves (``emit``) until
    ``stop`` is set or, in the main thread, SIGINT / SIGTERM arrives; then shut Serve and Ray down."""
    from .cluster import ray_session

    stop = stop or StopFlag()

    store_root = Path(job.source.store).resolve()
    if not (store_root / "catalog.duckdb").is_file():
        raise CkdError(f"source.store {job.source.store}: no stream store there yet; run `ckd submit` on the job "
                       f"first (it builds the store and commits blocks to serve)")
    check_port_free(host, port)
    runs_dir = job.snapshot_dir.resolve()
    with ray_session(namespace="ckd-serve", dashboard_port=dashboard_port or free_port()) as session:
        handlers = catch_stop_signals(stop)  # after ray.init, which sets its own SIGTERM handler
        started = False
        try:
            logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's driver-side start-up chatter
            serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
            started = True
            app = RecommendServer.options(num_replicas=replicas).bind(
                str(store_root), job.name, str(runs_dir), poll_s, torch_threads)
            try:
                serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            except RuntimeError as e:
                raise CkdError(f"Ray Serve could not start the app ({str(e).splitlines()[0]}); see the Serve logs "
                               f"under /tmp/ray/session_latest/logs/serve/") from None
            emit({"event": "started", "url": f"http://{host}:{port}", "dashboard": session.dashboard_url})
            last = None
            while True:
                try:
                    _, health = get_json(host, port, "/healthz")
                except (OSError, ValueError) as e:
                    health = {"status": "unreachable", "reason": str(e)}
                state = (health.get("served") or {}).get("commit"), tuple(r["commit"] for r in health.get("refused", []))
                if state != last:
                    emit({"event": "health", **health})
                    last = state
                if nap_until(stop, min(poll_s, 1.0)):
                    break
        finally:
            # a Ray this call joined (a test's) keeps running, so Serve is taken down in it; our own embedded Ray
            # goes down whole with the session (Serve's shutdown there only printed the raylet's noise that its
            # controller's graceful_shutdown "failed")
            if started and not session.started_here:
                serve.shutdown()
            restore_signals(handlers)
