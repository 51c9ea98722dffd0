"""Atomic, verified model snapshots: one folder per block, written whole or not at all.

    runs_dir/block-0003/
        teacher--mf128.pt      one torch.save'd state dict per model (names made filesystem-safe)
        student.pt
        manifest.json          the caller's dict + block, created_at, format_version,
                               files {filename: {sha256, bytes}}, models {model name: filename}

Everything is written into ``runs_dir/.tmp-block-0003-<uuid>/``, fsync'd, then renamed into place,
so a crash leaves either the old snapshot or the new one (plus a temp folder that is ignored and
removed by ``prune_snapshots``). A snapshot is intact when its manifest parses strictly and every
file matches its size and sha256; ``latest`` is the newest intact one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .checksums import file_sha256, fsync_dir
from .errors import CkdError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_BLOCK_DIR = re.compile(r"block-(\d{4,})")
_LEFTOVER = re.compile(r"\.(tmp|old)-block-\d+-[0-9a-f]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def block_dir_name(block: int) -> str:
    return f"block-{block:04d}"


@dataclass(frozen=True)
class Snapshot:
    path: Path
    block: int
    manifest: dict

    def load_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every model's state dict, on the CPU, keyed by model name.

        Weights-only loading (no code from a snapshot ever runs); a file it refuses, or one that holds
        anything but named tensors, is a CkdError naming the file."""
        return {name: load_state_file(self.path / filename) for name, filename in self.manifest["models"].items()}


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """One model file of a snapshot: a dict of tensor names to tensors, loaded with ``weights_only=True``."""
    fix = "use another snapshot (--snapshot N) or rewrite this job's snapshots with `ckd submit --restart`"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip / torch file), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CkdError(f"Snapshot file {path} cannot be loaded as plain tensors ({type(exc).__name__}: {first}); "
                       f"it was not written by ckd, so {fix}.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CkdError(f"Snapshot file {path} does not hold a state dict (names → tensors) but a "
                       f"{type(state).__name__}; {fix}.")
    return state


def write_snapshot(runs_dir: Path, block: int, states: dict[str, dict[str, torch.Tensor]],
                   manifest: dict) -> Snapshot:
    """Write the states of block ``block`` atomically, replacing an existing snapshot of that block."""
    runs_dir = Path(runs_dir)
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be a non-negative int, got {block!r}")
    filenames = _model_filenames(list(states))
    final = runs_dir / block_dir_name(block)
    tmp = runs_dir / f".tmp-{final.name}-{uuid.uuid4().hex}"
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files = {}
        for name, state in states.items():
            buf = io.BytesIO()
            torch.save({k: _cpu_copy(v) for k, v in state.items()}, buf)
            data = buf.getvalue()
            _write_durable(tmp / filenames[name], data)
            files[filenames[name]] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        full = dict(manifest)
        full.update(block=block, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    format_version=FORMAT_VERSION, files=files, models=filenames)
        try:
            text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False)
        except ValueError as exc:  # NaN/inf would make the manifest unreadable by the strict parser
            raise ValueError(f"snapshot manifest must hold only finite numbers: {exc}") from exc
        _write_durable(tmp / MANIFEST, text.encode("utf-8"))
        fsync_dir(tmp)
        if final.exists():
            aside = runs_dir / f".old-{final.name}-{uuid.uuid4().hex}"
            os.replace(final, aside)
            os.replace(tmp, final)
            fsync_dir(runs_dir)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(runs_dir)
    except OSError as exc:  # a full disk, a read-only folder: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise CkdError(f"Cannot write the snapshot {final}: {exc.strerror or exc} ({exc.filename or tmp}); free "
                       f"space or make {runs_dir} writable, then run `ckd submit` again: it resumes after the "
                       f"last committed block.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Snapshot(final, block, full)


def list_snapshots(runs_dir: Path) -> list[int]:
    """Blocks that have a snapshot folder with a manifest, ascending (not checksum-verified)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    blocks = []
    for entry in runs_dir.iterdir():
        m = _BLOCK_DIR.fullmatch(entry.name)
        if m and (entry / MANIFEST).is_file():
            blocks.append(int(m.group(1)))
    return sorted(blocks)


def verify_snapshot(path: Path) -> None:
    """Raise CkdError naming the first missing or damaged file of the snapshot folder ``path``."""
    path = Path(path)
    problem = _damage(path)
    if problem is not None:
        filename, reason = problem
        raise CkdError(f"Snapshot file {path / filename} is damaged ({reason}); use an earlier snapshot "
                       f"(--snapshot N) or rewrite this block with `ckd submit --resume`.")


def resolve_snapshot(runs_dir: Path, which: str | int = "latest",
                     check: Callable[[dict], str | None] | None = None) -> tuple[Snapshot, list[str]]:
    """The snapshot ``which`` ("latest" or a block number) and warnings about damaged ones skipped.
    ``check(manifest)``: what a reader also needs of the manifest (a problem in words, or None); a snapshot
    whose manifest it finds wanting counts as damaged."""
    runs_dir = Path(runs_dir)
    blocks = list_snapshots(runs_dir)
    available = ", ".join(str(b) for b in blocks) or "none"
    if not blocks:
        raise CkdError(f"No snapshots in {runs_dir}; run `ckd submit JOB.yaml` first to create them.")
    if which == "latest":
        lost = _without_manifest(runs_dir)  # folders that lost their manifest: damaged, when newer than the one used
        damaged = []
        for block in reversed(blocks):
            path = runs_dir / block_dir_name(block)
            problem = _damage(path) or _wanting(path, check)
            if problem is None:
                skipped = sorted([*damaged, *((runs_dir / block_dir_name(b), (MANIFEST, "missing"))
                                              for b in lost if b > block)], key=lambda d: d[0].name, reverse=True)
                warnings = [f"{bad.name} is damaged ({file} {reason}); using {path.name}"
                            for bad, (file, reason) in skipped]
                return Snapshot(path, block, _read_manifest(path)), warnings
            damaged.append((path, problem))
        damaged += [(runs_dir / block_dir_name(b), (MANIFEST, "missing")) for b in lost]
        details = "; ".join(f"{bad.name}: {file} {reason}" for bad, (file, reason) in damaged)
        raise CkdError(f"Every snapshot in {runs_dir} is damaged ({details}); "
                       "rerun the stream with `ckd submit JOB.yaml`.")
    block = _parse_which(which)
    if block in _without_manifest(runs_dir):
        raise CkdError(f"Snapshot file {runs_dir / block_dir_name(block) / MANIFEST} is damaged (missing); use an "
                       f"earlier snapshot (--snapshot N) or rewrite this block with `ckd submit --resume`.")
    if block not in blocks:
        raise CkdError(f"No snapshot for block {block} in {runs_dir}; available blocks: {available} "
                       "(use one of them, or run `ckd submit` first to create it).")
    path = runs_dir / block_dir_name(block)
    verify_snapshot(path)
    problem = _wanting(path, check)
    if problem is not None:
        raise CkdError(f"Snapshot file {path / MANIFEST} is damaged ({problem[1]}); use an earlier snapshot "
                       f"(--snapshot N) or rewrite this block with `ckd submit --resume`.")
    return Snapshot(path, block, _read_manifest(path)), []


def damaged_snapshots(runs_dir: Path, verify: bool = False) -> dict[int, str]:
    """block → what is wrong, for the snapshot folders of ``runs_dir`` that cannot be read: those that lost their
    manifest (``list_snapshots`` skips them) and, with ``verify``, those whose files no longer match it."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return {}
    bad = {b: f"{MANIFEST} missing" for b in _without_manifest(runs_dir)}
    if verify:  # every file of every snapshot against its manifest's size and sha256
        for b in list_snapshots(runs_dir):
            problem = _damage(runs_dir / block_dir_name(b))
            if problem is not None:
                bad[b] = f"{problem[0]} {problem[1]}"
    return dict(sorted(bad.items()))


def _without_manifest(runs_dir: Path) -> list[int]:
    """Blocks whose snapshot folder holds files but no manifest (lost or deleted; ``list_snapshots`` skips them)."""
    out = []
    for entry in runs_dir.iterdir():
        m = _BLOCK_DIR.fullmatch(entry.name)
        if m and entry.is_dir() and not (entry / MANIFEST).exists() and any(entry.iterdir()):
            out.append(int(m.group(1)))
    return sorted(out)


def _wanting(path: Path, check: Callable[[dict], str | None] | None) -> tuple[str, str] | None:
    """(MANIFEST, what is wanting) when ``check`` finds the (parsed, intact) manifest of ``path`` wanting."""
    problem = None if check is None else check(_read_manifest(path))
    return None if problem is None else (MANIFEST, problem)


def prune_snapshots(runs_dir: Path, keep_last: int, keep: set[int] = frozenset()) -> list[int]:
    """Delete all but the ``keep_last`` newest snapshots and those in ``keep``; → deleted blocks.

    The newest intact snapshot is always kept (even if damaged ones are newer), and temp folders
    left by interrupted writes are removed.
    """
    runs_dir = Path(runs_dir)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise CkdError(f"keep_last must be an integer >= 1, got {keep_last!r}.")
    if not runs_dir.is_dir():
        return []
    for entry in runs_dir.iterdir():
        if _LEFTOVER.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    blocks = list_snapshots(runs_dir)
    kept = set(blocks[-keep_last:]) | set(keep)
    for block in reversed(blocks):  # newest intact snapshot: normally the newest one, one hash pass
        if _damage(runs_dir / block_dir_name(block)) is None:
            kept.add(block)
            break
    deleted = []
    for block in blocks:
        if block in kept:
            continue
        # rename first so a half-deleted folder never looks like a snapshot
        aside = runs_dir / f".old-{block_dir_name(block)}-{uuid.uuid4().hex}"
        os.replace(runs_dir / block_dir_name(block), aside)
        shutil.rmtree(aside, ignore_errors=True)
        deleted.append(block)
    if deleted:
        fsync_dir(runs_dir)
    return deleted


def remove_job_snapshots(runs_dir: Path, job: str) -> list[int]:
    """Delete the snapshot folders job ``job`` wrote in ``runs_dir`` (for ``submit --restart``); → blocks.

    Only what this module wrote for that job goes: ``block-NNNN`` folders whose manifest names the job
    and that hold nothing but the manifest's files, plus temp folders of interrupted writes. Anything
    else in ``runs_dir`` (another job's snapshots, any other file), or a ``runs_dir`` that is the
    working directory or one of its parents, makes it refuse before deleting anything.
    """
    from .locks import LOCK_FILE

    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    where = Path.cwd().resolve()
    target = runs_dir.resolve()
    if runs_dir.is_symlink() or not runs_dir.is_dir():
        raise CkdError(f"--restart: {runs_dir} is not a plain snapshot folder (a file or a link); refusing to "
                       f"delete it, point snapshots.dir at a folder of its own")
    if target == where or target in where.parents:
        raise CkdError(f"--restart: the snapshot folder {runs_dir} is the working directory or one of its parents; "
                       f"refusing to delete it, set snapshots.dir to a folder of the job's own (e.g. runs/{job})")
    blocks, leftovers = [], []
    for entry in sorted(runs_dir.iterdir()):
        if entry.name == LOCK_FILE and entry.is_file() and not entry.is_symlink():
            continue
        if _LEFTOVER.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            leftovers.append(entry)
            continue
        m = _BLOCK_DIR.fullmatch(entry.name)
        owner = _snapshot_job(entry) if m and entry.is_dir() and not entry.is_symlink() else None
        if owner != job:
            what = (f"a snapshot of job {owner!r}" if isinstance(owner, str) else
                    "not a snapshot this job wrote")
            raise CkdError(f"--restart: {entry} is {what}; refusing to delete {runs_dir}, "
                           f"move that out or give this job its own snapshots.dir")
        blocks.append(int(m.group(1)))
    for entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)
    for block in blocks:  # rename first so a half-deleted folder never looks like a snapshot
        aside = runs_dir / f".old-{block_dir_name(block)}-{uuid.uuid4().hex}"
        os.replace(runs_dir / block_dir_name(block), aside)
        shutil.rmtree(aside)
    if blocks or leftovers:
        fsync_dir(runs_dir)
    return blocks


def _snapshot_job(path: Path) -> str | None:
    """The job named by the manifest of snapshot folder ``path``, if the folder holds only its files."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    own = {MANIFEST, *manifest["files"]}
    if any(e.name not in own or not e.is_file() or e.is_symlink() for e in path.iterdir()):
        return None
    job = manifest.get("job")
    return job if isinstance(job, str) else None


def _damage(path: Path) -> tuple[str, str] | None:
    """(file name, what is wrong) for the first problem found in a snapshot folder, or None if intact."""
    try:
        manifest = _read_manifest(path)
    except FileNotFoundError:
        return MANIFEST, "missing"
    except (OSError, ValueError) as exc:
        return MANIFEST, f"does not parse: {exc}"
    for filename, entry in manifest["files"].items():
        file = path / filename
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return filename, "missing"
        if size != entry["bytes"]:
            return filename, f"size {size} bytes, manifest says {entry['bytes']}"
        if file_sha256(file) != entry["sha256"]:
            return filename, "checksum mismatch"
    return None


def _read_manifest(path: Path) -> dict:
    """Strictly parse and check manifest.json; ValueError on anything unexpected."""
    raw = (path / MANIFEST).read_bytes()
    manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_reject_constant)
    if not isinstance(manifest, dict):
        raise ValueError("top level is not an object")
    version = manifest.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"format_version {version!r} is not supported (expected 1..{FORMAT_VERSION})")
    m = _BLOCK_DIR.fullmatch(path.name)
    if not _is_int(manifest.get("block")) or (m and int(m.group(1)) != manifest["block"]):
        raise ValueError(f"block {manifest.get('block')!r} does not match the folder name {path.name}")
    if not isinstance(manifest.get("created_at"), str):
        raise ValueError("created_at is missing")
    files, models = manifest.get("files"), manifest.get("models")
    if not isinstance(files, dict) or not isinstance(models, dict):
        raise ValueError("files / models must be objects")
    for filename, entry in files.items():
        if not _is_plain_filename(filename) or filename == MANIFEST:
            raise ValueError(f"file name {filename!r} is not a plain file name")
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _SHA256.fullmatch(entry["sha256"]) or not _is_int(entry.get("bytes"))):
            raise ValueError(f"files[{filename!r}] needs a sha256 hex digest and a byte count")
    for name, filename in models.items():
        if filename not in files:
            raise ValueError(f"model {name!r} points to {filename!r}, which is not listed in files")
    return manifest


def _model_filenames(names: list[str]) -> dict[str, str]:
    """Model name → file name: ':' becomes '--', other unsafe characters '_'; collisions get a hash."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"model names must be non-empty strings, got {name!r}")
        stem = _UNSAFE.sub("_", name.replace(":", "--")).lstrip(".") or "model"
        filename = f"{stem}.pt"
        if filename in used:
            filename = f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.pt"
        used.add(filename)
        out[name] = filename
    return out


def _cpu_copy(value):
    # a copy, so a slice of a larger tensor does not drag the whole storage into the file
    return value.detach().to("cpu").clone() if isinstance(value, torch.Tensor) else value


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _parse_which(which: str | int) -> int:
    if _is_int(which) and which >= 0:
        return int(which)
    if isinstance(which, str):
        m = re.fullmatch(r"(?:block-)?(\d+)", which.strip())
        if m:
            return int(m.group(1))
    raise CkdError(f"--snapshot must be 'latest' or a block number, got {which!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_plain_filename(name: str) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")
