"""Ingest benchmark: peak memory and rows/s of `ckd ingest` for CSV and Parquet inputs of several sizes.

    python bench/ingest_memory.py [--sizes 1000000 10000000] [--dir /tmp/ckd-ingest-bench] [--json out.json]

Each input is generated once (seeded, in chunks: the generator itself stays small), then ingested into
a fresh store by a separate `python -m continual_kd.cli ingest` process; its peak resident memory is that
process's ru_maxrss (the Python interpreter with pyarrow and DuckDB loaded counts too). The last line says
how far the peak grows from the smallest to the largest input (the ingest streams record batches, so it
should stay within 1.5×).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1_000_000


def generate(path: Path, rows: int, fmt: str, seed: int = 0) -> None:
    """``rows`` interactions: rows/20 users, 50k items (Zipf-like), increasing timestamps, ratings 1-5."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    users, items = max(rows // 20, 10), 50_000
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            table = pa.table({
                "user": pa.array(np.char.add("u", rng.integers(0, users, n).astype(str))),
                "item": pa.array(np.char.add("i", (rng.zipf(1.3, n) % items).astype(str))),
                "timestamp": pa.array(1_500_000_000 + start + np.arange(n, dtype=np.int64)),
                "rating": pa.array(rng.integers(1, 6, n).astype(np.int64)),
            })
            if writer is None:
                writer = (pq.ParquetWriter(tmp, table.schema) if fmt == "parquet"
                          else pacsv.CSVWriter(tmp, table.schema))
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)


def ingest(path: Path, store: Path) -> dict:
    """Run one ingest in a child process; → seconds, peak RSS (MiB) of that process, rows taken."""
    shutil.rmtree(store, ignore_errors=True)
    code = ("import resource, sys, time, json\n"
            "from continual_kd.stream import StreamStore\n"
            "t = time.perf_counter()\n"
            "r = StreamStore.open(sys.argv[2], create=True).ingest_file(sys.argv[1])\n"
            "s = time.perf_counter() - t\n"
            "print(json.dumps({'seconds': s, 'taken': r.rows_taken, 'read': r.rows_read,"
            " 'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(store)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(store, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--formats", nargs="+", default=["csv", "parquet"], choices=["csv", "parquet"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckd-ingest-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    baseline = subprocess.run([sys.executable, "-c", "import resource, continual_kd.stream; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              cwd=ROOT, capture_output=True, text=True, check=True)
    print(f"python + pyarrow + duckdb loaded, nothing ingested: {float(baseline.stdout):.0f} MiB")
    results = []
    print(f"{'format':8} {'rows':>12} {'file MiB':>9} {'peak MiB':>9} {'seconds':>8} {'rows/s':>11}")
    for fmt in args.formats:
        for rows in args.sizes:
            path = args.dir / f"interactions-{rows}.{fmt}"
            generate(path, rows, fmt)
            r = ingest(path, args.dir / "store")
            r.update(format=fmt, rows=rows, file_mib=path.stat().st_size / 2**20, rows_per_s=rows / r["seconds"])
            results.append(r)
            print(f"{fmt:8} {rows:>12,} {r['file_mib']:>9.0f} {r['peak_mib']:>9.0f} {r['seconds']:>8.1f} "
                  f"{r['rows_per_s']:>11,.0f}", flush=True)
    for fmt in args.formats:
        mine = sorted((r for r in results if r["format"] == fmt), key=lambda r: r["rows"])
        if len(mine) > 1:
            ratio = mine[-1]["peak_mib"] / mine[0]["peak_mib"]
            print(f"{fmt}: peak memory {mine[-1]['rows'] // mine[0]['rows']}× the rows → {ratio:.2f}× the memory")
    if args.json:
        args.json.write_text(json.dumps({"baseline_mib": float(baseline.stdout), "results": results}, indent=2))


if __name__ == "__main__":
    main()
