"""A missing-at-random labelled sample in the store's catalog: (user, item, label, time) rows collected under
uniform exposure (each user shown items drawn uniformly, clicked or not), which models with ``calibrate: mar``
learn from (continual/calibrate.py). The log says what users did with what they were shown; this says what
they think of items nobody chose to show them.

Rows keep their *external* ids (a sample may name users or items before their first interaction); they
join the dense ids when blocks are read (``read_labelled``), for the users and items known at that block and
the rows collected up to its end (a file without a time column counts from the start). Labels are stored
as 0/1 (≥ ``positive``). The same file again is a no-op; rows without a user, an item, a numeric label or (in a
file with times) a readable time are dropped and counted; one ingest is one transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from continual_kd.errors import CkdError
from continual_kd.eval.estimates import read_labelled_columns
from continual_kd.stream import catalog
from continual_kd.stream.ingest import MAX_ID_CHARS, file_content_hash

ALWAYS = -(2**62)  # the time of a row without one: usable from the first block on


@dataclass
class LabelledIngestReport:
    source: str
    content_hash: str
    rows_read: int
    rows_taken: int
    rows_dropped: int  # no user, item, numeric label or readable time
    positives: int
    already_ingested: bool
    rows_known: int = 0  # taken rows whose user and item the store knows now (the rest wait for the stream)
    relabelled: bool = False  # the file was ingested before with another --positive: its stored labels were replaced


def ingest_labelled_file(store, path: str | Path, positive: float = 1.0) -> LabelledIngestReport:
    """``ckd ingest-labelled FILE``: a labelled sample (user, item, label[, timestamp]) into the catalog, each
    label stored as 1 when ≥ ``positive`` (ratings: e.g. 4), else 0. Ids are read as ``ckd ingest`` reads
    them; times likewise (seconds, milliseconds or ISO text)."""
    path = Path(path)
    if not math.isfinite(positive):
        raise CkdError(f"ingest-labelled --positive {positive}: give a finite number (a label ≥ it is a positive)")
    if not path.is_file():
        raise CkdError(f"ingest-labelled {path}: no such file")
    users, items, label, when = read_labelled_columns(path, "ingest-labelled", times=True)
    if len(label) == 0:  # as `ckd ingest` refuses a file without rows
        raise CkdError(f"ingest-labelled {path}: the file has no rows (a header at most); nothing to add")
    content_hash = file_content_hash(path)
    ok = np.isfinite(label)
    for ids in (users, items):  # present and not absurdly long (a whole line in one field)
        ok &= pc.fill_null(pc.less_equal(pc.utf8_length(ids), MAX_ID_CHARS), False).to_numpy(zero_copy_only=False)
    if when is None:
        ts = np.full(len(label), ALWAYS, dtype=np.int64)
    else:
        ts, bad_time = when
        ok &= ~bad_time
    binary = (np.nan_to_num(label, nan=-np.inf) >= positive).astype(np.float64)
    keep = pa.array(ok)
    table = pa.table({"user": users.filter(keep), "item": items.filter(keep),
                      "label": pa.array(binary[ok], pa.float64()), "ts": pa.array(ts[ok], pa.int64())})
    positives = int(binary[ok].sum())
    with store._connect(write=True) as con:
        prior = con.sql("SELECT ingest_id, rows_read FROM labelled_ingests WHERE content_hash = ?",
                        params=[content_hash]).fetchall()
        if prior:  # the same file again: nothing to add, unless another --positive labels its rows otherwise
            ingest_id = int(prior[0][0])
            stored = int(catalog.scalar(con, "SELECT coalesce(sum(CASE WHEN label > 0 THEN 1 ELSE 0 END), 0) "
                                             "FROM labelled WHERE ingest_id = ?", [ingest_id]))
            if stored == positives:  # a threshold's positives are {label ≥ it}: as many means the same rows
                return LabelledIngestReport(str(path), content_hash, int(prior[0][1]), 0, 0, 0, True)
        with catalog.transaction(con):
            if prior:  # its labels replace the stored ones (never counted twice)
                con.execute("DELETE FROM labelled WHERE ingest_id = ?", [ingest_id])
                con.execute("UPDATE labelled_ingests SET source = ?, created_at = now() WHERE ingest_id = ?",
                            [str(path), ingest_id])
            else:
                ingest_id = int(catalog.scalar(con, "SELECT coalesce(max(ingest_id) + 1, 0) FROM labelled_ingests"))
                con.execute("INSERT INTO labelled_ingests VALUES (?, ?, ?, ?, ?, now())",
                            [ingest_id, content_hash, str(path), len(label), int(ok.sum())])
            con.register("_ckd_labelled", table)
            con.execute("INSERT INTO labelled SELECT ?, \"user\", item, label, ts FROM _ckd_labelled", [ingest_id])
            con.unregister("_ckd_labelled")
        known = int(catalog.scalar(con, 'SELECT count(*) FROM labelled l JOIN users u ON u.external_id = l."user" '
                                        'JOIN items i ON i.external_id = l.item WHERE l.ingest_id = ?', [ingest_id]))
    return LabelledIngestReport(str(path), content_hash, len(label), int(ok.sum()), int((~ok).sum()),
                                positives, False, known, relabelled=bool(prior))


def _has_table(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(catalog.scalar(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'labelled'"))


def read_labelled(con: duckdb.DuckDBPyConnection, num_users: int, num_items: int, ts_end: int):
    """(users, items, labels float32) in dense ids: the rows collected by ``ts_end`` whose user and item are
    among the first ``num_users`` / ``num_items``; None when the catalog holds no sample."""
    if not _has_table(con):
        return None  # a catalog from before labelled samples, opened read-only
    if not int(catalog.scalar(con, "SELECT count(*) FROM labelled")):
        return None
    data = con.sql('SELECT u.dense_id AS u, i.dense_id AS i, l.label FROM labelled l '
                   'JOIN users u ON u.external_id = l."user" JOIN items i ON i.external_id = l.item '
                   'WHERE u.dense_id < ? AND i.dense_id < ? AND l.ts <= ? '
                   'ORDER BY l.ingest_id, u.dense_id, i.dense_id, l.ts, l.label',
                   params=[int(num_users), int(num_items), int(ts_end)]).fetchnumpy()
    return (np.asarray(data["u"], dtype=np.int64), np.asarray(data["i"], dtype=np.int64),
            np.asarray(data["label"], dtype=np.float32))


def labelled_status(store) -> dict:
    with store._connect(write=False) as con:
        if not _has_table(con):
            return {"ingests": 0, "rows": 0, "positives": 0}
        n, pos = con.sql("SELECT count(*), coalesce(sum(CASE WHEN label > 0 THEN 1 ELSE 0 END), 0) FROM labelled").fetchall()[0]
        return {"ingests": int(catalog.scalar(con, "SELECT count(*) FROM labelled_ingests")), "rows": int(n),
                "positives": int(pos)}
