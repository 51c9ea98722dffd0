"""Reading one input (CSV / Parquet file or an Arrow table) in record batches and validating every row.

Memory is bounded by the batch, not the file: ``input_file_batches`` streams a CSV (Arrow's streaming
reader, ``CSV_BLOCK_BYTES`` at a time) or a Parquet file (``BATCH_ROWS`` rows at a time, row group by row
group); ``validate_batch`` checks each row of one batch (vectorised) and gives the row-local reason it is
quarantined; ``stage_batches`` writes the validated batches to a staging Parquet file. What needs the
whole input or the store (duplicates within the file, duplicates of stored rows, new ids in order of
first appearance) is decided afterwards, out of core, by DuckDB in ``store.py``.

Nothing here touches the catalog, so a file that cannot be read fails before the store is locked.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from continual_kd.checksums import file_sha256
from continual_kd.errors import CkdError, excerpt

# Quarantine reasons, in order of precedence (a row gets the first that applies).
MISSING_USER = "missing user id"
MISSING_ITEM = "missing item id"
LONG_ID = "id longer than 256 characters"
BAD_TIMESTAMP = "unparseable timestamp"
TIMESTAMP_RANGE = "timestamp out of range"
BAD_WEIGHT = "non-finite weight"
DUPLICATE = "duplicate row"
STORED_DUPLICATE = "duplicate of stored row"
REASONS = (MISSING_USER, MISSING_ITEM, LONG_ID, BAD_TIMESTAMP, TIMESTAMP_RANGE, BAD_WEIGHT, DUPLICATE,
           STORED_DUPLICATE)
MAX_ID_CHARS = 256  # longer ids are almost surely a broken file (a whole line in one field)
OK = -1  # reason code of a valid row
ROW_LOCAL_REASONS = 6  # REASONS[:6] are decided per row; DUPLICATE / STORED_DUPLICATE need the whole input

BATCH_ROWS = 1 << 16  # rows per validated batch (Parquet files and Arrow tables)
CSV_BLOCK_BYTES = 1 << 20  # bytes of CSV text per streamed batch (the reader reads a few ahead)
# One row per input row: its 0-based position, normalised ids (null where missing), parsed timestamp and
# weight, the row-local reason (OK = valid so far) and the raw text kept for the quarantine.
STAGING_SCHEMA = pa.schema([("rn", pa.int64()), ("user", pa.string()), ("item", pa.string()), ("ts", pa.int64()),
                            ("weight", pa.float32()), ("reason", pa.int8()), ("raw", pa.string())])

TS_MIN, TS_MAX = 0, 4_102_444_800  # [1970-01-01, 2100-01-01) in epoch seconds
MS_THRESHOLD = 1e11  # larger epoch values are milliseconds
ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d")
_NUMBER_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_ISO_TAIL_RE = r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d)(\.\d+)?Z?$"  # drop fraction / trailing Z
RAW_MAX_CHARS = 200
_SNIFF_BYTES = 1 << 16
_TAB_SUFFIXES = (".tsv", ".inter")

_FLAGS = {"user": "--user-col", "item": "--item-col", "timestamp": "--time-col", "weight": "--weight-col"}
# Tried only when the ColumnMap field keeps its default name (MovieLens, RecBole, Amazon headers).
_ALIASES = {
    "user": ("user_id", "userid", "uid", "reviewerid"),
    "item": ("item_id", "itemid", "movieid", "iid", "asin"),
    "timestamp": ("ts", "time", "unixreviewtime", "datetime"),
}


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns hold the user, item, timestamp and (optional) weight."""

    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    weight: str | None = None  # None: a column named "weight" or "rating" if present, else 1.0


# --- reading -------------------------------------------------------------------------------

def file_content_hash(path: Path) -> str:
    return file_sha256(path)


def table_content_hash(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def check_input_file(path: Path) -> str:
    """Cheap checks before hashing; returns the format ("parquet" or "csv")."""
    if not path.exists():
        raise CkdError(f"Cannot ingest {path}: the file does not exist.")
    if not path.is_file():
        raise CkdError(f"Cannot ingest {path}: it is not a regular file.")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head.strip():
        raise CkdError(f"Cannot ingest {path}: the file is empty.")
    if head[:4] == b"PAR1":
        return "parquet"
    if b"\x00" in head or _decode_head(head) is None:
        raise CkdError(f"Cannot ingest {path}: it is neither a CSV/TSV text file nor a Parquet file.")
    return "csv"


def input_file_batches(path: Path, fmt: str, columns: ColumnMap) -> tuple[dict[str, str], Iterator[pa.RecordBatch]]:
    """(role → column name, record batches of the mapped columns); the file is read as it is consumed."""
    if fmt == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise CkdError(f"Cannot ingest {path}: it is not a readable Parquet file ({_first_line(e)}).") from None
        cols = resolve_columns(parquet.schema_arrow.names, columns, str(path))
        if parquet.metadata.num_rows == 0:
            raise CkdError(f"Cannot ingest {path}: the file has a header but no data rows.")
        return cols, _reading(_row_group_batches(parquet, list(dict.fromkeys(cols.values()))),
                              f"Cannot ingest {path}: it is not a readable Parquet file")
    return _csv_batches(path, columns)


def _row_group_batches(parquet: pq.ParquetFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """One row group at a time (a reader over the whole file reads ahead, so its memory grows with it)."""
    for group in range(parquet.metadata.num_row_groups):
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns)


def table_batches(table: pa.Table, columns: ColumnMap, source: str) -> tuple[dict[str, str], Iterator[pa.RecordBatch]]:
    """The same for an Arrow table already in memory (dataset loaders)."""
    cols = resolve_columns(table.column_names, columns, source)
    return cols, iter(table.select(list(dict.fromkeys(cols.values()))).to_batches(max_chunksize=BATCH_ROWS))


def _reading(batches: Iterator[pa.RecordBatch], what: str | Callable[[BaseException], str]) -> Iterator[pa.RecordBatch]:
    """``batches``, with a read error part-way through the file turned into one CkdError line (``what``: its
    beginning, or a function of the error that gives it)."""
    try:
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise CkdError(f"{what(e) if callable(what) else what} ({_first_line(e)}).") from None


def _ragged_line(path: Path, delimiter: str, width: int) -> int | None:
    """The number of the first line (the header is line 1) whose record has not ``width`` fields; the error path
    only (pyarrow's message does not say where), so a plain scan with the csv module is enough."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = csv.reader(f, delimiter=delimiter)
            next(rows, None)
            before = rows.line_num  # a record may span lines (quoted newlines): name the line it starts on
            for row in rows:
                if row and len(row) != width:
                    return before + 1
                before = rows.line_num
    except (OSError, csv.Error):
        return None
    return None


def _decode_head(head: bytes) -> str | None:
    try:  # incremental: a multi-byte character cut at the end of the sample is not an error
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None


def _first_line(e: BaseException) -> str:
    return excerpt(e) if str(e).strip() else type(e).__name__


def sniff_delimiter(header: str, path: Path) -> str:
    counts = {d: header.count(d) for d in (",", "\t", ";")}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] == 0:
        return "\t" if path.suffix.lower() in _TAB_SUFFIXES else ","
    if path.suffix.lower() in _TAB_SUFFIXES and counts["\t"]:
        return "\t"
    return best


def _csv_batches(path: Path, columns: ColumnMap) -> tuple[dict[str, str], Iterator[pa.RecordBatch]]:
    with open(path, "rb") as f:
        head = _decode_head(f.read(_SNIFF_BYTES)) or ""
    header = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
    delimiter = sniff_delimiter(header, path)
    names = [n.strip() for n in next(csv.reader([header], delimiter=delimiter))]
    cols = resolve_columns(names, columns, str(path))

    def not_delimited(e: BaseException) -> str:
        line = _ragged_line(path, delimiter, len(names)) if "columns, got" in str(e) else None
        return f"Cannot ingest {path}: it could not be parsed as delimited text{f' at line {line}' if line else ''}"

    # Every column as text: ids keep leading zeros, timestamps/weights are parsed row by row later.
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 include_columns=list(dict.fromkeys(cols.values()))),
        )
    except (pa.ArrowException, OSError) as e:
        raise CkdError(f"{not_delimited(e)} ({_first_line(e)}).") from None
    return cols, _reading(reader, not_delimited)


# --- columns -------------------------------------------------------------------------------

def _match(names: list[str], wanted: str) -> str | None:
    if wanted in names:
        return wanted
    base = {n: n.split(":", 1)[0].strip() for n in names}  # RecBole: "user_id:token"
    for n in names:
        if base[n] == wanted:
            return n
    for n in names:
        if base[n].lower() == wanted.lower():
            return n
    return None


def resolve_columns(names: list[str], columns: ColumnMap, source: str) -> dict[str, str]:
    """Role ("user", "item", "timestamp", "weight") -> column name in the input."""
    default = ColumnMap()
    found: dict[str, str] = {}
    for role in ("user", "item", "timestamp"):
        wanted = getattr(columns, role)
        name = _match(names, wanted)
        if name is None and wanted == getattr(default, role):
            name = next((m for a in _ALIASES[role] if (m := _match(names, a)) is not None), None)
        if name is None:
            raise CkdError(
                f"Cannot ingest {source}: required {role} column '{wanted}' not found "
                f"(columns: {excerpt(', '.join(names)) or 'none'}); name the right columns with "
                f"--user-col/--item-col/--time-col."
            )
        found[role] = name
    if columns.weight is not None:
        name = _match(names, columns.weight)
        if name is None:
            raise CkdError(
                f"Cannot ingest {source}: weight column '{columns.weight}' not found "
                f"(columns: {', '.join(names)}); fix --weight-col or leave it out to use 1.0."
            )
        found["weight"] = name
    else:
        name = _match(names, "weight") or _match(names, "rating")
        if name is not None:
            found["weight"] = name
    for role, name in found.items():  # which of two columns of one name holds the ids is anyone's guess
        if names.count(name) > 1:
            raise CkdError(f"Cannot ingest {source}: the {role} column '{name}' appears {names.count(name)} times "
                           f"(columns: {', '.join(names)}); rename the extra ones")
    return found


# --- per-column parsing (vectorised) -------------------------------------------------------

def _as_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _ids(col: pa.Array, source: str, name: str) -> pa.Array:
    """Normalised string ids (surrounding whitespace trimmed), null where missing or empty."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_floating(col.type):  # NaN is a missing id, not the id "nan"
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    if not pa.types.is_string(col.type):
        try:
            col = pc.cast(col, pa.string())
        except pa.ArrowException:
            raise CkdError(f"Cannot ingest {source}: id column '{name}' has type {col.type}, "
                           f"which cannot be read as text ids.") from None
    col = pc.utf8_trim_whitespace(col)
    return pc.if_else(pc.equal(pc.utf8_length(col), 0), pa.scalar(None, pa.string()), col)


def _text_numbers(col: pa.Array) -> pa.Array:
    """float64 for text that is a plain decimal number, null elsewhere."""
    col = pc.utf8_trim_whitespace(col)
    is_number = pc.fill_null(pc.match_substring_regex(col, _NUMBER_RE), False)
    col = pc.replace_substring_regex(col, r"^\+", "")
    return pc.cast(pc.if_else(is_number, col, pa.scalar(None, pa.string())), pa.float64())


def _numeric_seconds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Epoch seconds from float epoch values (seconds or, above 1e11, milliseconds)."""
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    v = np.floor(np.where(v > MS_THRESHOLD, v / 1000.0, v))
    return v, ~finite


def _timestamps(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds int64, unparseable mask, out-of-range mask)."""
    n = len(col)
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_large_string(t):
        col, t = col.cast(pa.string()), pa.string()
    if pa.types.is_timestamp(t):
        secs = pc.cast(col, pa.timestamp("s", tz=t.tz), safe=False).cast(pa.int64())
        seconds, bad = secs.fill_null(0).to_numpy().astype(np.float64), col.is_null().to_numpy(zero_copy_only=False)
    elif pa.types.is_date32(t):
        days = col.cast(pa.int32())
        seconds = days.fill_null(0).to_numpy().astype(np.float64) * 86400.0
        bad = col.is_null().to_numpy(zero_copy_only=False)
    elif pa.types.is_date64(t):
        ms = col.cast(pa.int64())
        seconds = np.floor(ms.fill_null(0).to_numpy().astype(np.float64) / 1000.0)
        bad = col.is_null().to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.cast(col, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        seconds, bad = _numeric_seconds(values)
    elif pa.types.is_string(t):
        numbers = _text_numbers(col).fill_null(np.nan).to_numpy(zero_copy_only=False)
        seconds, bad = _numeric_seconds(numbers)
        text = pc.replace_substring_regex(pc.utf8_trim_whitespace(col), _ISO_TAIL_RE, r"\1")
        parsed = pa.nulls(n, pa.timestamp("s"))
        for fmt in ISO_FORMATS:
            parsed = pc.coalesce(parsed, pc.strptime(text, format=fmt, unit="s", error_is_null=True))
        is_iso = parsed.is_valid().to_numpy(zero_copy_only=False) & bad
        iso_seconds = parsed.cast(pa.int64()).fill_null(0).to_numpy().astype(np.float64)
        seconds = np.where(is_iso, iso_seconds, seconds)
        bad = bad & ~is_iso
    else:
        seconds, bad = np.zeros(n), np.ones(n, dtype=bool)
    out_of_range = ~bad & ((seconds < TS_MIN) | (seconds >= TS_MAX))
    seconds = np.where(bad | out_of_range, 0, seconds).astype(np.int64)
    return seconds, bad, out_of_range


def _weights(col: pa.Array | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 weights, bad mask): null, non-numeric, NaN/inf or float32 overflow are bad."""
    if col is None:
        return np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_large_string(t):
        col, t = col.cast(pa.string()), pa.string()
    if pa.types.is_string(t):
        values = _text_numbers(col)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        values = pc.cast(col, pa.float64())
    else:
        values = pa.nulls(n, pa.float64())
    v64 = values.fill_null(np.nan).to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore", invalid="ignore"):
        v32 = v64.astype(np.float32)
    bad = ~np.isfinite(v32)
    return np.where(bad, np.float32(0), v32) + np.float32(0), bad  # + 0: -0.0 == 0.0 bitwise below


# --- validation ----------------------------------------------------------------------------

def validate_batch(batch: pa.RecordBatch | pa.Table, cols: dict[str, str], source: str, first_row: int) -> pa.RecordBatch:
    """One batch of input rows (``first_row`` = position of its first row in the input) as staging rows
    (``STAGING_SCHEMA``) with the first row-local reason that applies, in ``REASONS`` order."""
    n = batch.num_rows
    user = _ids(_as_array(batch.column(cols["user"])), source, cols["user"])
    item = _ids(_as_array(batch.column(cols["item"])), source, cols["item"])
    ts, bad_ts, ts_range = _timestamps(_as_array(batch.column(cols["timestamp"])))
    weight_col = _as_array(batch.column(cols["weight"])) if "weight" in cols else None
    weight, bad_weight = _weights(weight_col, n)

    missing_user = user.is_null().to_numpy(zero_copy_only=False)
    missing_item = item.is_null().to_numpy(zero_copy_only=False)
    long_id = _too_long(user) | _too_long(item)
    reason = np.full(n, OK, dtype=np.int8)
    for code, mask in enumerate((missing_user, missing_item, long_id, bad_ts, ts_range, bad_weight)):
        reason[(reason == OK) & mask] = code
    return pa.RecordBatch.from_arrays(
        [pa.array(np.arange(first_row, first_row + n, dtype=np.int64)), user, item, pa.array(ts),
         pa.array(weight), pa.array(reason), raw_strings(batch, cols)], schema=STAGING_SCHEMA)


def stage_batches(batches, cols: dict[str, str], source: str, staging: Path) -> int:
    """Validate every batch and append it to the staging Parquet file ``staging``; → rows read."""
    rows = 0
    with pq.ParquetWriter(staging, STAGING_SCHEMA, compression="lz4") as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(validate_batch(batch, cols, source, rows))
                rows += batch.num_rows
    return rows


def _too_long(ids: pa.Array) -> np.ndarray:
    """(n,) rows whose id has more than MAX_ID_CHARS characters."""
    return pc.fill_null(pc.greater(pc.utf8_length(ids), MAX_ID_CHARS), False).to_numpy(zero_copy_only=False)


def raw_strings(batch: pa.RecordBatch | pa.Table, cols: dict[str, str]) -> pa.Array:
    """'name=value, ...' of the mapped input columns of every row, at most RAW_MAX_CHARS."""
    names = list(dict.fromkeys(cols.values()))
    parts = []
    for name in names:
        try:
            values = pc.cast(_as_array(batch.column(name)), pa.string())
        except pa.ArrowException:
            values = pa.array(["?"] * batch.num_rows, pa.string())
        parts.append(pc.binary_join_element_wise(pa.scalar(name), pc.fill_null(values, ""), "="))
    joined = pc.binary_join_element_wise(*parts, ", ") if len(parts) > 1 else parts[0]
    return pc.utf8_slice_codeunits(joined, 0, RAW_MAX_CHARS)
