"""A job's source: open its stream store, building it from the named dataset the first time.

A new store is built whole in a hidden sibling folder (``stores/.tiny.building-<uuid>/``) and renamed
into place only when its data are in, so a build that fails (a bad generator setting, MovieLens
unreachable offline, Ctrl-C) leaves no store behind and the next command simply builds it again.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from ..checksums import fsync_dir
from ..config import SourceSpec
from ..errors import CkdError
from ..stream import BlockPlan, IngestReport, StreamStore
from ..stream.catalog import CATALOG_FILE

DATASETS = ("movielens-100k", "synthetic", "files")


def build_store(dataset: str, root: str | Path, synthetic=None, source: SourceSpec | None = None
                ) -> tuple[StreamStore, IngestReport]:
    """Create the store at ``root`` from ``dataset`` (or top up the store already there); → (store, report).
    ``source``: the job's source (dataset files reads its train/valid/test files)."""
    if dataset not in DATASETS:
        raise CkdError(f"unknown dataset {dataset!r}; use movielens-100k, synthetic or files")
    root = Path(root)
    if _is_store(root):  # topping up: an ingest is one transaction, a failed one changes nothing
        store = StreamStore.open(root)
        return store, _fill(store, dataset, synthetic, source)
    if root.exists() and not root.is_dir():
        raise CkdError(f"{root} is a file, not a stream store directory; choose another path.")
    if root.is_dir() and any(root.iterdir()):
        raise CkdError(f"{root} is a folder with other files in it, not a stream store; choose a new or empty "
                       f"folder for the store")
    parent = root.parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{root.name}.building-{uuid.uuid4().hex}"
    try:
        report = _fill(StreamStore.open(tmp, create=True), dataset, synthetic, source)
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty folder at root
        except OSError:
            if not _is_store(root):
                raise
            shutil.rmtree(tmp)  # another process built it first: top up theirs (a no-op for the same data)
            return build_store(dataset, root, synthetic, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break
        raise
    fsync_dir(parent)
    return StreamStore.open(root), report


def open_source(source: SourceSpec) -> StreamStore:
    root = Path(source.store)
    if source.dataset == "files":  # the files are read (and checked) every time; the store is built once
        from .files import fixed_split_parts, read_fixed_split

        tables = read_fixed_split(source)
        if not _is_store(root):
            build_store("files", root, source=source)
        store = StreamStore.open(root)
        store.ensure_fixed_plan(fixed_split_parts(tables))  # refuses a store that holds other rows
        return store
    if _is_store(root):
        store = StreamStore.open(root)
        if source.dataset == "store" or store.num_users > 0:
            return store
        # an empty store of a dataset source (left by a failed build of an older version): fill it now
    elif source.dataset == "store":
        raise CkdError(f"source.store {root}: no stream store there; fill one with `ckd ingest FILE --store {root}` "
                       f"or `ckd data movielens-100k [--kg] --store {root}` (see the job file's comments), or set "
                       f"source.dataset to movielens-100k or synthetic")
    store, _ = build_store(source.dataset, root, source.synthetic)
    return store


def _fill(store: StreamStore, dataset: str, synthetic, source: SourceSpec | None = None) -> IngestReport:
    if dataset == "files":
        from .files import fill_files_store

        return fill_files_store(store, source)[0]
    if dataset == "movielens-100k":
        from .movielens import load_movielens_100k

        return store.ingest_table(load_movielens_100k(), source="movielens-100k")
    from .synthetic import SyntheticConfig, generate_stream

    fields = {} if synthetic is None else (synthetic.model_dump() if hasattr(synthetic, "model_dump")
                                           else asdict(synthetic))  # a dataclass or a pydantic spec
    cfg = SyntheticConfig(**fields)
    return store.ingest_table(generate_stream(cfg), source=f"synthetic(seed={cfg.seed})")


def _is_store(root: Path) -> bool:
    return (root / CATALOG_FILE).is_file()


def source_plan(store: StreamStore, job) -> BlockPlan:
    """The block plan of ``job`` on its source's ``store``: the fixed split's one block (dataset files),
    else the base block + incremental blocks of ``job.blocks``."""
    if job.source.dataset == "files":
        from .files import fixed_split_parts, read_fixed_split

        return store.ensure_fixed_plan(fixed_split_parts(read_fixed_split(job.source)))
    b = job.blocks
    return store.ensure_plan(b.base_fraction, b.incremental, b.plan_split, job.seed)
