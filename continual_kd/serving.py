"""Serving a job's student from its newest committed snapshot, and following new commits (no Ray here).

``SnapshotFollower.poll()`` looks at the job's commit log in the stream store's catalog; when a newer
block is committed it loads that snapshot's student *fully* (files checked against the manifest's sizes
and sha256, the manifest against the digest the commit recorded, the weights against the model the
manifest describes, the id maps and known pairs read from the store) into a new ``ServedStudent``, warms
it with one scoring call, and only then replaces the reference that requests read. A request reads the
reference once, so it is answered by one snapshot from start to end, and no request waits for a load.
A snapshot that fails any check is never served: the follower keeps the previous one and records why.

``runtime/serve.py`` wraps this in a Ray Serve deployment; ``ServedStudent.recommend`` is the scoring.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checksums import file_sha256
from .errors import CkdError
from .manifest import block_manifest_problem
from .snapshots import MANIFEST, block_dir_name, load_state_file, resolve_snapshot

MAX_K = 1000  # the most items one request may ask for
# a poll waits this long for a writer's catalog lock (an ingest, a commit), then tries again at the next poll
POLL_LOCK_WAIT_S = 5.0


class UnknownUser(Exception):
    """The user id is not one the served student knows (not in the store, or new since its block)."""


@dataclass(frozen=True)
class Commit:
    """One active commit of the job: block ``block`` consumed, its snapshot's manifest digest recorded."""

    commit_id: int
    block: int
    plan_id: str
    lineage: str
    snapshot_digest: str
    committed_at: str


def active_commits(store, job_name: str) -> list[Commit]:
    """The job's active (not revoked) commits, newest first."""
    rows = store.committed_blocks(job_name)
    return [Commit(int(r["commit_id"]), int(r["block"]), r["plan_id"], r["lineage"], r["snapshot_digest"],
                   str(r["committed_at"])) for r in sorted(rows, key=lambda r: r["commit_id"], reverse=True)]


@dataclass
class ServedStudent:
    """One committed snapshot's student, ready to score: weights, the pairs to exclude, the id maps."""

    job: str
    commit: Commit
    snapshot: Path
    model: torch.nn.Module
    known: object  # sparse.UserItemSet: every pair of blocks ≤ block (all splits), never recommended
    user_index: dict[str, int]  # external user id → dense id, for the users the student knows
    item_ids: np.ndarray  # (I,) dense item id → external id (object array of str)
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    load_s: float = 0.0  # seconds from the start of the load (checks included) to ready

    @property
    def block(self) -> int:
        return self.commit.block

    @property
    def num_users(self) -> int:
        return len(self.user_index)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @torch.inference_mode()
    def top_k(self, users: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U,) dense users → (U, k) best unseen items and their scores; -1 / -inf past a user's unseen items."""
        scores = self.model.full_scores(users)  # (U, I)
        self.known.mask_(scores, users)
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return torch.where(torch.isneginf(top.values), -1, top.indices), top.values

    def recommend(self, user: str, k: int) -> list[dict]:
        """The top-k items the user has not interacted with, best first: ``[{"item": id, "score": s}]``."""
        dense = self.user_index.get(user.strip())
        if dense is None:
            raise UnknownUser(user)
        items, scores = self.top_k(torch.tensor([dense]), k)
        keep = items[0] >= 0
        ids = self.item_ids[items[0][keep].numpy()]
        return [{"item": str(i), "score": float(s)} for i, s in zip(ids, scores[0][keep].tolist())]

    def describe(self) -> dict:
        return {"job": self.job, "block": self.block, "commit": self.commit.commit_id,
                "snapshot": str(self.snapshot), "committed_at": self.commit.committed_at,
                "loaded_at": self.loaded_at, "load_s": round(self.load_s, 3), "users": self.num_users,
                "items": self.num_items}


def load_served(store, job_name: str, runs_dir: Path, commit: Commit, device: str = "cpu") -> ServedStudent:
    """Load and check the student of ``commit``'s snapshot; CkdError naming what does not match."""
    from .config import parse_job
    from .continual.learner import Learner
    from .continual.snapshot_eval import check_fit
    from .eval import known_pairs

    started = time.perf_counter()
    path = Path(runs_dir) / block_dir_name(commit.block)
    if not (path / MANIFEST).is_file():
        raise CkdError(f"Snapshot {path} of committed block {commit.block} is missing (pruned or moved); "
                       f"keep it (snapshots.keep_last / keep) or rerun the block with `ckd submit`.")
    snap, _ = resolve_snapshot(path.parent, commit.block, check=block_manifest_problem)  # every file's size and sha256 against the manifest
    digest = file_sha256(path / MANIFEST)
    if digest != commit.snapshot_digest:
        raise CkdError(f"Snapshot {path} is not the one committed as block {commit.block} (its manifest's sha256 "
                       f"{digest[:12]}… differs from the commit's {commit.snapshot_digest[:12]}…); it was rewritten "
                       f"after the commit, so rerun the block with `ckd submit`.")
    manifest = snap.manifest
    if manifest.get("job") != job_name or manifest.get("plan_id") != commit.plan_id:
        raise CkdError(f"Snapshot {path} belongs to job {manifest.get('job')!r}, plan {manifest.get('plan_id')!r}, "
                       f"not to the commit of job {job_name!r}, plan {commit.plan_id!r}; point snapshots.dir at "
                       f"the job's own folder.")
    job = parse_job(manifest["job_spec"], f"{path}/{MANIFEST}")
    info = manifest["model_info"]["student"]
    file = path / manifest["models"]["student"]
    state = {"block": commit.block, "num_users": info["num_users"], "num_items": info["num_items"],
             "weights": load_state_file(file)}
    check_fit(job.student, state, file)
    learner = Learner(job.student, job.seed, device)
    learner.load(state)
    model = learner.model
    seen = store.read_blocks(commit.plan_id, commit.block)
    known = known_pairs(seen, device)
    model.observe(known.users, known.items)  # as `ckd recommend` does: everything seen is known when serving
    num_users, num_items = model.num_users, model.num_items
    if seen.num_users > num_users or seen.num_items > num_items:
        raise CkdError(f"Snapshot {file} holds {num_users} users × {num_items} items but block {commit.block} of "
                       f"the store has {seen.num_users} × {seen.num_items}; rerun the block with `ckd submit`.")
    users = store.external_ids("user", np.arange(num_users))
    items = np.asarray(store.external_ids("item", np.arange(num_items)), dtype=object)
    served = ServedStudent(job_name, commit, path, model, known, dict(zip(users, range(num_users))), items)
    served.top_k(torch.zeros(1, dtype=torch.int64), 1)  # warm: caches (graph propagation) built before the swap
    served.load_s = time.perf_counter() - started
    return served


class SnapshotFollower:
    """Holds the served student and swaps it for each newer committed snapshot that passes every check."""

    def __init__(self, store_root: str | Path, job_name: str, runs_dir: str | Path, device: str = "cpu",
                 log: Callable[[str], None] | None = None):
        self.store_root = Path(store_root)
        self.job_name = job_name
        self.runs_dir = Path(runs_dir)
        self.device = device
        self.log = log or (lambda message: None)
        self.current: ServedStudent | None = None  # replaced whole, never changed in place
        self.refused: dict[int, dict] = {}  # commit id → {block, commit, reason, at}
        self.last_poll: dict = {}
        self._lock = threading.Lock()  # one poll at a time (a request never takes it)

    def poll(self) -> bool:
        """Serve the newest active commit whose snapshot passes every check; → True when the student changed.

        A commit refused once is not tried again unless its manifest changes (a snapshot rewritten in place).
        A busy catalog (another process writing) is not a refusal: the next poll tries again."""
        from .stream import StreamStore
        from .stream.catalog import StoreBusyError

        with self._lock:
            try:
                store = StreamStore.open(self.store_root)
                store.lock_wait_s = min(store.lock_wait_s, POLL_LOCK_WAIT_S)
                commits = active_commits(store, self.job_name)
            except StoreBusyError as e:
                self.last_poll = {"ok": False, "reason": str(e)}
                return False
            current = self.current
            swapped = False
            for commit in commits:
                if current is not None and commit.commit_id == current.commit.commit_id:
                    break
                signature = self._signature(commit)
                if self.refused.get(commit.commit_id, {}).get("signature") == signature:
                    continue
                try:
                    served = load_served(store, self.job_name, self.runs_dir, commit, self.device)
                except StoreBusyError as e:
                    self.last_poll = {"ok": False, "reason": str(e)}
                    return False
                except CkdError as e:
                    self.refused[commit.commit_id] = {"block": commit.block, "commit": commit.commit_id,
                                                      "reason": str(e), "signature": signature,
                                                      "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    self.log(f"not serving block {commit.block} (commit {commit.commit_id}): {e}")
                    continue
                self.current = served  # the swap: one reference assignment, atomic for every reader
                swapped = True
                self.log(f"serving block {commit.block} (commit {commit.commit_id}) from {served.snapshot}, "
                         f"loaded and checked in {served.load_s:.2f}s")
                break
            active = {c.commit_id for c in commits}  # a revoked commit's refusal no longer matters
            self.refused = {c: r for c, r in self.refused.items() if c in active}
            self.last_poll = {"ok": True, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "commits": len(commits)}
            return swapped

    def _signature(self, commit: Commit) -> tuple:
        """What must change for a refused commit to be tried again: its snapshot manifest's stat."""
        try:
            st = (self.runs_dir / block_dir_name(commit.block) / MANIFEST).stat()
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return ()

    def health(self) -> dict:
        served = self.current
        # list() copies the values in one step: the follower thread may add a refusal meanwhile
        refused = [{k: v for k, v in r.items() if k != "signature"} for r in list(self.refused.values())]
        return {"status": "ok" if served is not None else "waiting", "job": self.job_name,
                "served": served.describe() if served is not None else None,
                "refused": sorted(refused, key=lambda r: r["commit"]), "last_poll": self.last_poll}
