"""A fixed benchmark split as a source: ``source: {dataset: files, train: F, valid: F, test: F}``.

Each file (CSV/TSV or Parquet) has a user and an item column (``user`` / ``item``, or ``user_id``,
``item_id``, ``movieId``, RecBole's ``user_id:token`` …). The three files become one store with one id
map (dense ids in order of first appearance: the train file's rows first) and one block whose
train/valid/test splits are exactly the files' rows (``StreamStore.ensure_fixed_plan``): no time cut,
no random split, no stream. Every problem of a file (missing, unreadable, no id column, an empty id,
a pair listed twice, a pair in two splits) ends in one ``CkdError`` naming the file and the row.

Inside the store each row's timestamp is its position in train, then valid, then test (the files
carry no time that matters here), so nothing is ever taken as a duplicate and dropped.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..config import SPLIT_FILES, SourceSpec
from ..errors import CkdError, excerpt
from ..stream import StreamStore
from ..stream.ingest import MAX_ID_CHARS, sniff_delimiter, table_content_hash
from ..types import TEST, TRAIN, VALID

SPLIT_CODES = {"train": TRAIN, "valid": VALID, "test": TEST}
ID_COLUMNS = {"user": ("user", "user_id", "userid", "uid"), "item": ("item", "item_id", "itemid", "movieid", "iid")}


def _where(role: str, path: Path) -> str:
    return f"source.{role} {path}"


def _column(names: list[str], kind: str, role: str, path: Path) -> str:
    base = {n: n.split(":", 1)[0].strip().lower() for n in names}
    for wanted in ID_COLUMNS[kind]:
        found = next((n for n in names if base[n] == wanted), None)
        if found is not None:
            return found
    raise CkdError(f"{_where(role, path)}: no {kind} column (columns: {excerpt(', '.join(names)) or 'none'}); name it "
                   f"{kind} or {kind}_id")


def read_split_file(path: str | Path, role: str = "train") -> tuple[pa.Array, pa.Array]:
    """(users, items) of one split file as trimmed string arrays, every row checked."""
    path = Path(path)
    where = _where(role, path)
    if not path.is_file():
        raise CkdError(f"{where}: {'not a regular file' if path.exists() else 'the file does not exist'}; "
                       f"give the path of a CSV or Parquet file with user and item columns")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise CkdError(f"{where}: the file is empty; it needs a header and one row per (user, item) pair")
    try:
        if head[:4] == b"PAR1":
            names = pq.ParquetFile(path).schema_arrow.names
            cols = [_column(names, "user", role, path), _column(names, "item", role, path)]
            table = pq.read_table(path, columns=cols)
            lines = 0  # Parquet rows are counted from 1, no header line
        else:
            text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
            header = text.splitlines()[0]
            delimiter = sniff_delimiter(header, path)
            names = [n.strip() for n in next(csv.reader([header], delimiter=delimiter))]
            cols = [_column(names, "user", role, path), _column(names, "item", role, path)]
            table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
                                   parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                   convert_options=pacsv.ConvertOptions(
                                       column_types={n: pa.string() for n in names}, include_columns=cols))
            lines = 1  # the header line
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CkdError(f"{where}: cannot be read as CSV/TSV or Parquet ({reason}); fix the file") from None
    if table.num_rows == 0:
        raise CkdError(f"{where}: the file has no data rows; a split file lists one (user, item) pair per row")
    out = []
    for kind, name in zip(("user", "item"), cols):
        col = table.column(name).combine_chunks()
        col = pc.utf8_trim_whitespace(col if pa.types.is_string(col.type) else pc.cast(col, pa.string()))
        bad = pc.or_(pc.is_null(col), pc.equal(pc.utf8_length(col), 0)).fill_null(True)
        long = pc.greater(pc.utf8_length(col), MAX_ID_CHARS).fill_null(False)
        for mask, problem in ((bad, f"has no {kind} id"), (long, f"has a {kind} id longer than {MAX_ID_CHARS} characters")):
            rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            if len(rows):
                at = f"row {rows[0] + 1}" + (f" (line {rows[0] + 1 + lines})" if lines else "")
                more = f" ({len(rows)} rows in all)" if len(rows) > 1 else ""
                raise CkdError(f"{where}: {at} {problem}{more}; fix or remove the row")
        out.append(col)
    return out[0], out[1]


def read_fixed_split(source: SourceSpec) -> dict[str, pa.Table]:
    """split name → table (user, item, timestamp) of its file, checked: no pair twice in one file or in
    two files. Timestamps number the rows of train, valid, test in order (see the module note)."""
    read = {role: read_split_file(getattr(source, role), role) for role in SPLIT_FILES}
    users = np.concatenate([read[r][0].to_numpy(zero_copy_only=False) for r in SPLIT_FILES])
    items = np.concatenate([read[r][1].to_numpy(zero_copy_only=False) for r in SPLIT_FILES])
    sizes = [len(read[r][0]) for r in SPLIT_FILES]
    role_of = np.repeat(np.arange(3), sizes)
    row_of = np.concatenate([np.arange(n) for n in sizes])
    _, u = np.unique(users, return_inverse=True)
    _, i = np.unique(items, return_inverse=True)
    key = u.astype(np.int64) * (int(i.max()) + 1) + i
    order = np.argsort(key, kind="stable")  # equal pairs stay in file order: train, valid, test, by row
    repeat = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(repeat):
        first, again = order[repeat[0]], order[repeat[0] + 1]
        ra, rb = SPLIT_FILES[role_of[first]], SPLIT_FILES[role_of[again]]
        pair = f"(user {users[first]}, item {items[first]})"
        if ra == rb:
            raise CkdError(f"{_where(rb, Path(getattr(source, rb)))}: rows {row_of[first] + 1} and {row_of[again] + 1} "
                           f"are the same pair {pair}; a split lists each pair once, remove the repeat")
        raise CkdError(f"{_where(rb, Path(getattr(source, rb)))}: row {row_of[again] + 1} {pair} is also row "
                       f"{row_of[first] + 1} of {_where(ra, Path(getattr(source, ra)))}; a pair belongs to one split "
                       f"only, remove it from one of the files")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return {role: pa.table({"user": read[role][0], "item": read[role][1],
                            "timestamp": pa.array(np.arange(n, dtype=np.int64) + s)})
            for role, n, s in zip(SPLIT_FILES, sizes, starts)}


def fixed_split_parts(tables: dict[str, pa.Table]) -> list[tuple[str, int]]:
    """[(content hash of the table ingested for each split, split code)], train, valid, test."""
    return [(table_content_hash(tables[role]), SPLIT_CODES[role]) for role in SPLIT_FILES]


def fill_files_store(store: StreamStore, source: SourceSpec, tables: dict[str, pa.Table] | None = None) -> list:
    """Ingest the three files (a no-op for files already in); every row must be taken. → the reports."""
    tables = tables or read_fixed_split(source)
    reports = []
    for role in SPLIT_FILES:
        report = store.ingest_table(tables[role], source=f"{role}:{getattr(source, role)}")
        reports.append(report)
        if report.rows_quarantined:
            reasons = ", ".join(f"{n} {r}" for r, n in report.reasons.items())
            raise CkdError(f"{_where(role, Path(getattr(source, role)))}: {report.rows_quarantined} rows were refused "
                           f"({reasons}); fix the file")
    return reports


__all__ = ["fill_files_store", "fixed_split_parts", "read_fixed_split", "read_split_file"]
