"""Latency and throughput of `ckd serve` on this machine, steady and while the served student swaps blocks.

    python bench/serve.py [JOB] [--workdir DIR] [--port 8011] [--clients 8] [--seconds 15] [--k 10] [--json out.json]

In ``--workdir`` (default: a fresh temporary folder) it commits block 0 of JOB (default
jobs/synthetic-small.yaml) with `ckd submit --max-blocks 1`, starts `ckd serve JOB` (its own embedded Ray
and Ray Serve, one replica) and drives it from ``--clients`` threads, each with one keep-alive
http.client connection to 127.0.0.1, asking GET /recommend?user=U&k=K for users drawn uniformly from the
ones the student knows. Two phases:

  steady   ``--seconds`` of load on the served block 0
  swap, training   load while `ckd submit --max-blocks 1` trains and commits block 1 on the same machine,
                   until the server has served block 1 for 2 s
  swap, alone      block 2 is trained beforehand in a copy of the folder; under load its snapshot is moved
                   into the job's folder and committed (as the coordinator does), until block 2 has been
                   served for 2 s: the cost of the swap itself

Each swap phase also gets figures for its window: from 0.5 s before the replica began to load the new
block (its load time, from /healthz, before the first answer from it) to 1 s after that first answer.

Printed per phase: requests, failed requests (any non-200 or connection error), throughput (answers/s),
p50 / p99 / max latency in ms, and the blocks that answered. The server is stopped with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CKD = [sys.executable, "-m", "continual_kd.cli"]


def ckd(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*CKD, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def health(port: int) -> dict | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        status, body = get(conn, "/healthz")
        return body if status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class Load:
    """``clients`` threads asking for recommendations until stopped; every answer's (start, seconds, status, block)."""

    def __init__(self, port: int, users: list[str], clients: int, k: int, seed: int = 0):
        self.port, self.users, self.k = port, users, k
        self.stop = threading.Event()
        self.records: list[list[tuple[float, float, int, int | None]]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._client, args=(i, seed + i), daemon=True) for i in range(clients)]

    def _client(self, i: int, seed: int) -> None:
        rng = random.Random(seed)
        out = self.records[i]
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            path = f"/recommend?user={rng.choice(self.users)}&k={self.k}"
            t0 = time.perf_counter()
            try:
                status, body = get(conn, path)
                out.append((t0, time.perf_counter() - t0, status, body.get("block")))
            except (OSError, ValueError, http.client.HTTPException):
                out.append((t0, time.perf_counter() - t0, 0, None))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()

    def __enter__(self) -> "Load":
        self.started = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        self.ended = time.perf_counter()

    def all(self) -> np.ndarray:
        rows = [(t0, dt, st, -1 if b is None else b) for rec in self.records for (t0, dt, st, b) in rec]
        return np.array(sorted(rows), dtype=np.float64).reshape(-1, 4)


def wait_for_block(port: int, block: int, timeout: float = 300.0) -> float | None:
    """Wait until /healthz serves ``block``; → the replica's load-and-check seconds for it."""
    t = time.perf_counter()
    while True:
        served = (health(port) or {}).get("served") or {}
        if served.get("block") == block:
            return served.get("load_s")
        if time.perf_counter() - t > timeout:
            sys.exit(f"the server did not swap to block {block} within {timeout:g} s")
        time.sleep(0.2)


def commit_copied_snapshot(snapshot: Path, runs: Path, store_root: Path, job) -> None:
    """Move a snapshot trained elsewhere into the served job's folder (rename: whole or absent) and commit it."""
    from continual_kd.manifest import manifest_digest
    from continual_kd.stream import StreamStore

    tmp = runs / f".tmp-{snapshot.name}-bench"
    shutil.copytree(snapshot, tmp)
    os.replace(tmp, runs / snapshot.name)
    m = json.loads((runs / snapshot.name / "manifest.json").read_text())
    StreamStore.open(store_root).commit_block(job.name, job.config_hash(), m["plan_id"], m["block"], m["rows_covered"],
                                              str(runs / snapshot.name), manifest_digest(runs / snapshot.name))


def swap_figures(out: dict, name: str, load: "Load", block: int) -> None:
    rows = load.all()
    out[f"swap_{name}"] = figures(rows, load.ended - load.started)
    # the window of the swap: from 0.5 s before the replica began loading the new block to 1 s after its first answer
    first_new = rows[rows[:, 3] == block, 0].min()
    begin = first_new - (out[f"block{block}_load_s"] or 0.0) - 0.5
    inside = (rows[:, 0] >= begin) & (rows[:, 0] <= first_new + 1.0)
    out[f"around_swap_{name}"] = figures(rows[inside], first_new + 1.0 - begin)
    show(f"swap, {name}", out[f"swap_{name}"])
    show("  its window", out[f"around_swap_{name}"])
    print(f"  the replica loaded and checked block {block} in {out[f'block{block}_load_s']}s beside the served one")


def figures(rows: np.ndarray, seconds: float) -> dict:
    ok = rows[:, 2] == 200
    lat = rows[ok, 1] * 1000.0
    return {"requests": int(len(rows)), "failed": int((~ok).sum()), "seconds": round(seconds, 2),
            "throughput": round(float(ok.sum()) / seconds, 1) if seconds > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "max_ms": round(float(lat.max()), 2) if len(lat) else None,
            "blocks": {int(b): int((rows[:, 3] == b).sum()) for b in np.unique(rows[:, 3])}}


def show(name: str, f: dict) -> None:
    print(f"{name:<16} {f['requests']:>7} req  {f['failed']:>3} failed  {f['throughput']:>8} /s  "
          f"p50 {f['p50_ms']:>7} ms  p99 {f['p99_ms']:>7} ms  max {f['max_ms']:>8} ms  blocks {f['blocks']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", nargs="?", default=str(ROOT / "jobs" / "synthetic-small.yaml"))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--commit-copy", nargs=4, metavar=("SNAPSHOT", "RUNS", "STORE", "JOB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.commit_copy:
        from continual_kd.config import load_job

        snapshot, runs, store, job_path = args.commit_copy
        commit_copied_snapshot(Path(snapshot), Path(runs), Path(store), load_job(job_path))
        return

    from continual_kd.config import load_job
    from continual_kd.stream import StreamStore

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckd-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / Path(args.job).name
    if Path(args.job).resolve() != job_file.resolve():
        shutil.copy(args.job, job_file)
    job = load_job(job_file)
    t = time.perf_counter()
    r = ckd(["submit", job_file.name, "--max-blocks", "1"], work)
    if r.returncode:
        sys.exit(f"ckd submit failed:\n{r.stderr[-2000:]}")
    print(f"block 0 committed in {time.perf_counter() - t:.1f}s ({work})")

    log = open(work / "serve.log", "w")
    server = subprocess.Popen([*CKD, "serve", job_file.name, "--port", str(args.port), "--poll", "1s"], cwd=work,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    out: dict = {"job": job.name, "clients": args.clients, "k": args.k, "cpus": os.cpu_count(),
                 "load_average_before": os.getloadavg()}
    try:
        t = time.perf_counter()
        while (h := health(args.port)) is None:
            if server.poll() is not None or time.perf_counter() - t > 300:
                sys.exit(f"ckd serve did not come up:\n{(work / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        out["startup_s"] = round(time.perf_counter() - t, 1)
        print(f"ckd serve answered after {out['startup_s']}s: block {h['served']['block']}, "
              f"{h['served']['users']} users × {h['served']['items']} items")
        users = StreamStore.open(work / job.source.store).external_ids("user", np.arange(h["served"]["users"]))

        with Load(args.port, users, args.clients, args.k) as load:
            time.sleep(args.seconds)
        out["steady"] = figures(load.all(), load.ended - load.started)
        show("steady", out["steady"])

        # phase 2: the job trains block 1 on this machine and commits it; the server swaps to it
        with Load(args.port, users, args.clients, args.k, seed=1000) as load:
            t = time.perf_counter()
            r = ckd(["submit", job_file.name, "--max-blocks", "1"], work)
            if r.returncode:
                sys.exit(f"ckd submit of block 1 failed:\n{r.stderr[-2000:]}")
            out["block1_commit_s"] = round(time.perf_counter() - t, 1)
            out["block1_load_s"] = wait_for_block(args.port, 1)
            time.sleep(2.0)
        swap_figures(out, "training", load, 1)

        # phase 3: the swap alone: block 2 is trained beforehand in a copy of the folder, then its snapshot is
        # moved in and committed (what the coordinator does at the end of a block) while nothing else runs
        shadow = work / "shadow"
        shutil.rmtree(shadow, ignore_errors=True)
        shadow.mkdir()
        shutil.copy(job_file, shadow / job_file.name)
        runs_rel = job.snapshot_dir
        shutil.copytree(work / job.source.store, shadow / job.source.store)
        shutil.copytree(work / runs_rel, shadow / runs_rel)
        r = ckd(["submit", job_file.name, "--max-blocks", "1"], shadow)
        if r.returncode:
            sys.exit(f"ckd submit of block 2 (in the copy) failed:\n{r.stderr[-2000:]}")
        with Load(args.port, users, args.clients, args.k, seed=2000) as load:
            time.sleep(3.0)
            # in another process, so the load generator's threads do not wait on it for the GIL
            subprocess.run([sys.executable, __file__, "--commit-copy", str(shadow / runs_rel / "block-0002"),
                            str(work / runs_rel), str(work / job.source.store), str(job_file)], check=True)
            out["block2_load_s"] = wait_for_block(args.port, 2)
            time.sleep(2.0)
        swap_figures(out, "alone", load, 2)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out["server_exit_code"] = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            out["server_exit_code"] = "killed after 120 s"
        log.close()
    out["load_average_after"] = os.getloadavg()
    print(f"server stopped (exit code {out['server_exit_code']}); load average before {out['load_average_before']}, "
          f"after {out['load_average_after']} on {out['cpus']} CPUs")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
