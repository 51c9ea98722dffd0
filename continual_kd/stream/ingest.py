"""Reading one input (CSV / Parquet file or an Arrow table) and validating every row, vectorised.

Nothing here touches the catalog: ``read_input_file`` and ``validate_rows`` are pure, so a file
that cannot be read fails before the store is opened for writing.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from continual_kd.checksums import file_sha256
from continual_kd.errors import CkdError

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


@dataclass
class ValidatedRows:
    """Every input row, normalised, with the reason it is quarantined (``OK`` if it is not).

    Ids are dictionary codes (-1 where missing) into ``user_values`` / ``item_values``.
    """

    user_codes: np.ndarray  # (n,) int64
    user_values: pa.Array  # string, distinct normalised external ids
    item_codes: np.ndarray  # (n,) int64
    item_values: pa.Array
    ts: np.ndarray  # (n,) int64 epoch seconds (0 where invalid)
    weight: np.ndarray  # (n,) float32 (0 where invalid)
    reason: np.ndarray  # (n,) int8 index into REASONS, OK = valid

    def __len__(self) -> int:
        return len(self.reason)

    def reason_counts(self) -> dict[str, int]:
        counts = np.bincount(self.reason[self.reason != OK], minlength=len(REASONS))
        return {REASONS[i]: int(c) for i, c in enumerate(counts) if c}


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


def read_input_file(path: Path, fmt: str) -> pa.Table:
    if fmt == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise CkdError(f"Cannot ingest {path}: it is not a readable Parquet file ({_first_line(e)}).") from None
    else:
        table = _read_csv(path)
    if table.num_rows == 0:
        raise CkdError(f"Cannot ingest {path}: the file has a header but no data rows.")
    return table


def _decode_head(head: bytes) -> str | None:
    try:  # incremental: a multi-byte character cut at the end of the sample is not an error
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def sniff_delimiter(header: str, path: Path) -> str:
    counts = {d: header.count(d) for d in (",", "\t", ";")}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] == 0:
        return "\t" if path.suffix.lower() in _TAB_SUFFIXES else ","
    if path.suffix.lower() in _TAB_SUFFIXES and counts["\t"]:
        return "\t"
    return best


def _read_csv(path: Path) -> pa.Table:
    with open(path, "rb") as f:
        head = _decode_head(f.read(_SNIFF_BYTES)) or ""
    header = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
    delimiter = sniff_delimiter(header, path)
    names = [n.strip() for n in next(csv.reader([header], delimiter=delimiter))]
    # Every column as text: ids keep leading zeros, timestamps/weights are parsed row by row below.
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except (pa.ArrowException, OSError) as e:
        raise CkdError(f"Cannot ingest {path}: it could not be parsed as delimited text ({_first_line(e)}).") from None


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
                f"(columns: {', '.join(names) or 'none'}); name the right columns with "
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
    return found


# --- per-column parsing (vectorised) -------------------------------------------------------

def _as_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _ids(col: pa.Array, source: str, name: str) -> tuple[np.ndarray, pa.Array]:
    """(codes, distinct values): normalised string ids, code -1 where missing or empty."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not pa.types.is_string(col.type):
        try:
            col = pc.cast(col, pa.string())
        except pa.ArrowException:
            raise CkdError(f"Cannot ingest {source}: id column '{name}' has type {col.type}, "
                           f"which cannot be read as text ids.") from None
    col = pc.utf8_trim_whitespace(col)
    col = pc.if_else(pc.equal(pc.utf8_length(col), 0), pa.scalar(None, pa.string()), col)
    encoded = pc.dictionary_encode(col)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary


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

def validate_rows(table: pa.Table, cols: dict[str, str], source: str) -> ValidatedRows:
    n = table.num_rows
    user_codes, user_values = _ids(_as_array(table.column(cols["user"])), source, cols["user"])
    item_codes, item_values = _ids(_as_array(table.column(cols["item"])), source, cols["item"])
    ts, bad_ts, ts_range = _timestamps(_as_array(table.column(cols["timestamp"])))
    weight_col = _as_array(table.column(cols["weight"])) if "weight" in cols else None
    weight, bad_weight = _weights(weight_col, n)

    long_id = _too_long(user_codes, user_values) | _too_long(item_codes, item_values)
    reason = np.full(n, OK, dtype=np.int8)
    for code, mask in enumerate((user_codes < 0, item_codes < 0, long_id, bad_ts, ts_range, bad_weight)):
        reason[(reason == OK) & mask] = code
    rows = ValidatedRows(user_codes, user_values, item_codes, item_values, ts, weight, reason)
    mark_batch_duplicates(rows)
    return rows


def _too_long(codes: np.ndarray, values: pa.Array) -> np.ndarray:
    """(n,) rows whose id has more than MAX_ID_CHARS characters."""
    if len(values) == 0:
        return np.zeros(len(codes), dtype=bool)
    long_value = pc.greater(pc.utf8_length(values), MAX_ID_CHARS).to_numpy(zero_copy_only=False)
    return (codes >= 0) & long_value[np.maximum(codes, 0)]


def mark_batch_duplicates(rows: ValidatedRows) -> None:
    """Second and later copies of an identical valid (user, item, ts, weight) row -> DUPLICATE."""
    valid = np.flatnonzero(rows.reason == OK)
    if len(valid) < 2:
        return
    keys = (rows.weight[valid].view(np.int32), rows.ts[valid], rows.item_codes[valid], rows.user_codes[valid])
    order = np.lexsort(keys)  # stable: within equal keys the earliest row comes first
    same = np.ones(len(valid) - 1, dtype=bool)
    for key in keys:
        k = key[order]
        same &= k[1:] == k[:-1]
    rows.reason[valid[order[1:][same]]] = REASONS.index(DUPLICATE)


def raw_strings(table: pa.Table, cols: dict[str, str], rows: np.ndarray) -> pa.Array:
    """'name=value, ...' of the mapped input columns for the given rows, at most RAW_MAX_CHARS."""
    names = list(dict.fromkeys(cols.values()))
    sub = table.select(names).take(pa.array(rows, pa.int64()))
    parts = []
    for name in names:
        try:
            values = pc.cast(_as_array(sub.column(name)), pa.string())
        except pa.ArrowException:
            values = pa.array(["?"], pa.string()).take(pa.array(np.zeros(len(rows), np.int64)))
        parts.append(pc.binary_join_element_wise(pa.scalar(name), pc.fill_null(values, ""), "="))
    joined = pc.binary_join_element_wise(*parts, ", ") if len(parts) > 1 else parts[0]
    return pc.utf8_slice_codeunits(joined, 0, RAW_MAX_CHARS)
