"""A job's source: open its stream store, building it from the named dataset the first time."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..config import SourceSpec
from ..errors import CkdError
from ..stream import StreamStore


def build_store(dataset: str, root: str | Path, synthetic=None):
    """Create (or top up) the store at ``root`` from ``dataset``; returns (store, report)."""
    store = StreamStore.open(root, create=True)
    if dataset == "movielens-100k":
        from .movielens import load_movielens_100k

        report = store.ingest_table(load_movielens_100k(), source="movielens-100k")
    elif dataset == "synthetic":
        from .synthetic import SyntheticConfig, generate_stream

        cfg = SyntheticConfig(**(asdict(synthetic) if synthetic is not None else {}))
        report = store.ingest_table(generate_stream(cfg), source=f"synthetic(seed={cfg.seed})")
    else:
        raise CkdError(f"unknown dataset {dataset!r}; use movielens-100k or synthetic")
    return store, report


def open_source(source: SourceSpec) -> StreamStore:
    root = Path(source.store)
    if (root / "catalog.duckdb").exists():
        return StreamStore.open(root)
    if source.dataset == "store":
        raise CkdError(f"source.store {root}: no stream store there; fill one with `ckd ingest FILE --store {root}` "
                       f"or set source.dataset to movielens-100k or synthetic")
    store, _ = build_store(source.dataset, root, source.synthetic)
    return store
