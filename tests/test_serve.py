"""`ckd serve`: the student of the newest committed snapshot over HTTP (Ray Serve), swapped on each new commit
without a failed request; a damaged snapshot is never served. Real Ray Serve on the session's Ray, real files."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# Ray Serve's own config models still use pydantic v1-style Field extras
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


def _get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        if own:
            conn.close()


def _wait_for(port: int, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    health: dict = {}
    while time.monotonic() < deadline:
        try:
            _, health = _get(port, "/healthz")
            if predicate(health):
                return health
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not reach the expected state within {timeout}s; last /healthz: {health}")


def _expected_top(runs: Path, store_root: Path, block: int, user: str, k: int) -> list[str]:
    """By hand: the MF student's scores u·v over every item, the user's seen items (blocks ≤ block) dropped."""
    from continual_kd.stream import StreamStore

    store = StreamStore.open(store_root)
    manifest = json.loads((runs / f"block-{block:04d}" / "manifest.json").read_text())
    w = torch.load(runs / f"block-{block:04d}" / manifest["models"]["student"], weights_only=True)
    u = int(store.dense_ids("user", [user])[0])
    scores = (w["user_emb"][u] @ w["item_emb"].T).numpy().astype(np.float64)
    seen = store.read_blocks(manifest["plan_id"], block)
    scores[seen.items[seen.users == u]] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return store.external_ids("item", order)


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    path.write_bytes(bytes(data))


def _commit_damaged_copy(runs: Path, store_root: Path, job, source: int, block: int) -> None:
    """Commit block ``block`` as the coordinator does, its snapshot a copy of block ``source``'s, then damage
    its student file (a disk fault between the commit and the server's load)."""
    from continual_kd.manifest import manifest_digest
    from continual_kd.stream import StreamStore

    copy = runs / f"block-{block:04d}"
    shutil.copytree(runs / f"block-{source:04d}", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["block"] = block
    (copy / "manifest.json").write_text(json.dumps(manifest))
    StreamStore.open(store_root).commit_block(job.name, job.config_hash(), manifest["plan_id"], block,
                                              manifest["rows_covered"], str(copy), manifest_digest(copy))
    _damage(copy / "student.pt")


def test_serve_follows_commits_without_a_failed_request_and_never_serves_a_damaged_snapshot(
        ray_cluster, cli, tiny_job, tmp_path, one_thread):
    from continual_kd.config import load_job
    from continual_kd.runtime.serve import free_port, serve_job

    job_file = tiny_job()
    assert cli("submit", job_file, "--max-blocks", "1").exit_code == 0  # block 0 committed (commit 1)
    runs, store_root = tmp_path / "runs" / "tiny", tmp_path / "stores" / "tiny"
    # commit 2: block 1, whose snapshot is damaged after it was written: never to be served
    _commit_damaged_copy(runs, store_root, load_job(job_file), 0, 1)

    port = free_port()
    stop, events, failed = threading.Event(), [], []

    def run_server():
        try:
            serve_job(load_job(job_file), "127.0.0.1", port, poll_s=0.5, replicas=1, torch_threads=1,
                      emit=events.append, stop=stop)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertions below
            failed.append(e)

    server = threading.Thread(target=run_server, daemon=True)
    server.start()
    try:
        health = _wait_for(port, lambda h: h.get("served") is not None or failed, timeout=90)
        assert not failed, failed
        # block 1's snapshot fails verification: block 0 is served, and /healthz says why not block 1
        assert health["served"]["block"] == 0 and health["served"]["commit"] == 1
        assert [(r["block"], r["commit"]) for r in health["refused"]] == [(1, 2)]
        assert "student.pt is damaged (checksum mismatch)" in health["refused"][0]["reason"]

        user = "u1"
        status, body = _get(port, f"/recommend?user={user}&k=5")
        assert status == 200 and body["block"] == 0 and body["user"] == user and body["k"] == 5
        assert [x["item"] for x in body["items"]] == _expected_top(runs, store_root, 0, user, 5)
        assert all(a["score"] >= b["score"] for a, b in zip(body["items"], body["items"][1:]))

        # parameters and ids the API refuses, each with a JSON body saying why
        for path, code, words in [
            ("/recommend?user=nobody", 404, "unknown user 'nobody'"),
            ("/recommend?k=5", 400, "'user' is missing"),
            ("/recommend?user=u1&k=0", 400, "from 1 to 1000"),
            ("/recommend?user=u1&k=ten", 400, "got 'ten'"),
            ("/recommend?user=u1&k=1001", 400, "from 1 to 1000"),
            ("/recommend?user=u1&kk=3", 400, "unknown parameter 'kk'"),
            ("/recommend?user=u1&user=u2", 400, "more than once"),
            ("/nowhere", 404, "GET /recommend?user=U"),
        ]:
            got, err = _get(port, path)
            assert (got, words in err.get("error", "")) == (code, True), (path, got, err)

        # hammer the server while the job runs block 1 (its damaged commit 2 is revoked) and commits it: commit 3
        answers: list[tuple[int | None, int | None]] = []
        done = threading.Event()

        def hammer():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            while not done.is_set():
                try:
                    status, body = _get(port, f"/recommend?user={user}&k=5", conn)
                    answers.append((status, body.get("block")))
                except (OSError, ValueError, http.client.HTTPException):
                    answers.append((None, None))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                time.sleep(0.005)  # steady traffic that leaves the in-process submit its share of the GIL
            conn.close()

        hammering = threading.Thread(target=hammer, daemon=True)
        hammering.start()
        assert cli("submit", job_file, "--max-blocks", "1").exit_code == 0
        health = _wait_for(port, lambda h: (h.get("served") or {}).get("block") == 1, timeout=30)
        time.sleep(0.5)  # a few answers from the new student too
        done.set()
        hammering.join(timeout=15)

        new_commit = health["served"]["commit"]
        assert new_commit == 3 and health["refused"] == []  # the revoked commit 2 is no longer a refusal
        assert len(answers) > 20 and all(status == 200 for status, _ in answers), \
            [a for a in answers if a[0] != 200][:5]
        blocks = [b for _, b in answers]
        assert blocks[0] == 0 and blocks[-1] == 1 and blocks == sorted(blocks)  # k, then k+1, never back
        status, body = _get(port, f"/recommend?user={user}&k=5")
        assert (status, body["block"], body["commit"]) == (200, 1, new_commit)
        assert [x["item"] for x in body["items"]] == _expected_top(runs, store_root, 1, user, 5)

        # a newer commit whose snapshot is damaged while it is served: refused, block 1 stays served
        _commit_damaged_copy(runs, store_root, load_job(job_file), 1, 2)
        health = _wait_for(port, lambda h: h["refused"], timeout=20)
        assert [(r["block"], r["commit"]) for r in health["refused"]] == [(2, new_commit + 1)]
        assert health["served"]["block"] == 1
        status, body = _get(port, f"/recommend?user={user}&k=5")
        assert (status, body["block"]) == (200, 1)
    finally:
        stop.set()
        server.join(timeout=60)
    assert not server.is_alive() and not failed, failed
    with pytest.raises(OSError):  # Serve is shut down: nothing listens on the port any more
        _get(port, "/healthz")
    # what the driver reported (the lines `ckd serve` prints): block 0, then block 1, and the refusals
    served = [e["served"]["block"] for e in events if e["event"] == "health" and e.get("served")]
    assert served[0] == 0 and served[-1] == 1 and served == sorted(served)
    assert 1 in {r["block"] for e in events if e["event"] == "health" for r in e["refused"]}


def test_recommend_query_parsing():
    from continual_kd.runtime.serve import parse_recommend_query

    assert parse_recommend_query([("user", " 196 ")]) == ("196", 10)
    assert parse_recommend_query([("k", "3"), ("user", "a b")]) == ("a b", 3)
    assert parse_recommend_query([("user", "u"), ("k", "1000")]) == ("u", 1000)
    for pairs, words in [([], "missing"), ([("user", "  ")], "missing"), ([("user", "u"), ("k", "-1")], "got '-1'"),
                         ([("user", "u"), ("k", "1e3")], "got '1e3'"), ([("user", "u"), ("k", "")], "got ''"),
                         ([("user", "u"), ("x", "1")], "unknown parameter 'x'")]:
        with pytest.raises(ValueError, match=words):
            parse_recommend_query(pairs)


def test_serve_refuses_a_job_without_a_store_and_a_busy_port(cli, tiny_job):
    import socket

    job_file = tiny_job()
    r = cli("serve", job_file, "--port", "8000")
    assert r.exit_code == 2 and "no stream store there yet" in r.stderr
    Path("stores/tiny").mkdir(parents=True)
    (Path("stores/tiny") / "catalog.duckdb").write_bytes(b"")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        r = cli("serve", job_file, "--port", str(sock.getsockname()[1]))
    assert r.exit_code == 2 and "cannot listen there" in r.stderr
    r = cli("serve", job_file, "--poll", "soon")
    assert r.exit_code == 2 and "--poll 'soon'" in r.stderr
