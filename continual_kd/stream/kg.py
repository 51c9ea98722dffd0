"""Item knowledge in the store's catalog: (head, relation, tail) triples, the item → entity links, item
attributes (title, year, genres), and the item graph a path model reads.

Ids are stable: an entity keeps the id it got when first ingested (``kg_entities``, by external id), a
relation likewise (``kg_relations``, by name). Items are linked to entities by their *external* id
(``item_entities``), so knowledge may arrive before an item's first interaction; it joins the item's
dense id when the graph is read (``read_item_graph``), for the items known at that time only.

An ingest of triples is validated row by row (vectorised) like an ingest of interactions: a bad row is
quarantined with a reason (``kg_quarantine``), the same content again is a no-op, and everything one
ingest changes is one transaction under the catalog's write lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from continual_kd.errors import CkdError, excerpt
from continual_kd.stream import catalog
from continual_kd.stream.ingest import (
    MAX_ID_CHARS, RAW_MAX_CHARS, check_input_file, file_content_hash, sniff_delimiter,
)
from continual_kd.types import ItemGraph

# Quarantine reasons of a triple, in order of precedence.
MISSING_HEAD = "missing item (head)"
MISSING_RELATION = "missing relation"
MISSING_TAIL = "missing tail"
LONG_ID = "id longer than 256 characters"
DUPLICATE = "duplicate triple"
STORED_DUPLICATE = "duplicate of stored triple"
KG_REASONS = (MISSING_HEAD, MISSING_RELATION, MISSING_TAIL, LONG_ID, DUPLICATE, STORED_DUPLICATE)
OK = -1
ITEM_ENTITY_PREFIX = "item:"  # entity made for an item that no link names (a user's own triples)
GENRE_RELATION = "movielens.genre"
GENRE_ENTITY_PREFIX = "genre:"

# column roles of a user's triples file → accepted names (first found wins)
_COLUMNS = {"item": ("item", "head", "item_id", "head_id"), "relation": ("relation", "relation_id", "rel"),
            "tail": ("tail", "tail_id", "entity", "object"), "tail_name": ("tail_name", "name", "label")}


@dataclass
class KGIngestReport:
    source: str
    content_hash: str
    rows_read: int
    rows_taken: int
    rows_quarantined: int
    reasons: dict[str, int]
    already_ingested: bool
    new_entities: int = 0
    new_relations: int = 0


# --- reading a user's triples file ---------------------------------------------------------

def _base(name: str) -> str:
    return name.split(":", 1)[0].strip().lower()  # RecBole headers: "head_id:token"


def _resolve(names: list[str], path: Path) -> dict[str, str]:
    by_base = {}
    for n in names:
        by_base.setdefault(_base(n), n)
    found = {}
    for role, aliases in _COLUMNS.items():
        hit = next((by_base[a] for a in aliases if a in by_base), None)
        if hit is None and role != "tail_name":
            raise CkdError(f"Cannot ingest triples from {path}: no {role} column (columns: {excerpt(', '.join(names)) or 'none'}); "
                           f"a triples file has the columns item (the item id as in your interactions), relation "
                           f"and tail (optional tail_name).")
        if hit is not None:
            found[role] = hit
    return found


def read_triples_file(path: Path) -> tuple[pa.Table, str]:
    """A user's triples file (CSV/TSV/Parquet) as text columns item, relation, tail, tail_name (+ raw); →
    (table, content hash). A file that is not readable is one CkdError sentence naming it."""
    path = Path(path)
    fmt = check_input_file(path)
    content_hash = file_content_hash(path)
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
            table = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema]))
        else:
            with open(path, "r", encoding="utf-8", errors="replace") as f:
                header = f.readline().lstrip("\ufeff")
            delimiter = sniff_delimiter(header, path)
            names = [n.strip() for n in header.rstrip("\r\n").split(delimiter)]
            table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
                                   parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                   convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CkdError(f"Cannot ingest triples from {path}: it could not be read as CSV/TSV or Parquet ({first}); "
                       f"fix the file (one triple per row: item, relation, tail).") from None
    cols = _resolve(table.column_names, path)
    if table.num_rows == 0:
        raise CkdError(f"Cannot ingest triples from {path}: the file has a header but no data rows.")
    out = {role: table[name] for role, name in cols.items()}
    if "tail_name" not in out:
        out["tail_name"] = pa.nulls(table.num_rows, pa.string())
    return pa.table(out), content_hash


# --- validation ----------------------------------------------------------------------------

def _ids(col) -> pa.Array:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    return pc.if_else(pc.equal(pc.utf8_length(col), 0), pa.scalar(None, pa.string()), col)


def validate_triples(table: pa.Table) -> pa.Table:
    """Row-local checks (vectorised): → rn, item, relation, tail, tail_name, reason (code, OK = -1), raw."""
    n = table.num_rows
    item, rel, tail = _ids(table["item"]), _ids(table["relation"]), _ids(table["tail"])
    name = _ids(table["tail_name"])
    too_long = np.zeros(n, dtype=bool)
    for c in (item, rel, tail):
        too_long |= pc.fill_null(pc.greater(pc.utf8_length(c), MAX_ID_CHARS), False).to_numpy(zero_copy_only=False)
    reason = np.full(n, OK, dtype=np.int8)
    masks = (item.is_null().to_numpy(zero_copy_only=False), rel.is_null().to_numpy(zero_copy_only=False),
             tail.is_null().to_numpy(zero_copy_only=False), too_long)
    for code, mask in enumerate(masks):
        reason[(reason == OK) & mask] = code
    parts = [pc.binary_join_element_wise(pa.scalar(k), pc.fill_null(pc.cast(table[k].combine_chunks(), pa.string()), ""),
                                         "=") for k in ("item", "relation", "tail")]
    raw = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*parts, ", "), 0, RAW_MAX_CHARS)
    return pa.table({"rn": pa.array(np.arange(n, dtype=np.int64)), "item": item, "relation": rel, "tail": tail,
                     "tail_name": name, "reason": pa.array(reason), "raw": raw})


# --- ingest --------------------------------------------------------------------------------

def ingest_triples_file(store, path: str | Path) -> KGIngestReport:
    """``ckd ingest-kg FILE``: a user's (item, relation, tail) triples into the store's catalog."""
    table, content_hash = read_triples_file(Path(path))
    return ingest_item_triples(store, table, str(path), content_hash)


def ingest_item_triples(store, table: pa.Table, source: str, content_hash: str | None = None,
                        links: pa.Table | None = None, attributes: pa.Table | None = None,
                        heads_are_entities: bool = False) -> KGIngestReport:
    """Triples (columns item, relation, tail, tail_name) into the catalog, in one transaction.

    ``item`` is an item's external id (resolved through ``item_entities``; an item without a link gets
    the entity ``item:<id>``), or, with ``heads_are_entities``, an entity's external id (RecBole's .kg).
    ``links`` (item, entity) and ``attributes`` (item, title, year, genres) are stored first (existing
    rows of the same item are kept: ids stay stable)."""
    content_hash = content_hash or _logical_hash(table)
    staged = validate_triples(table)
    with store._connect(write=True) as con:
        prior = con.sql("SELECT rows_read FROM kg_ingests WHERE content_hash = ?", params=[content_hash]).fetchall()
        if prior:
            return KGIngestReport(source, content_hash, int(prior[0][0]), 0, 0, {}, True)
        with catalog.transaction(con):
            report = _ingest(con, staged, source, content_hash, links, attributes, heads_are_entities)
    return report


def _logical_hash(table: pa.Table) -> str:
    """sha256 of the table's rows as CSV text: the same triples give the same hash however they are chunked
    or where they were read from (a wheel, a Parquet cache)."""
    import hashlib

    sink = pa.BufferOutputStream()
    pacsv.write_csv(table.select(["item", "relation", "tail", "tail_name"]), sink)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _ingest(con, staged: pa.Table, source: str, content_hash: str, links, attributes,
            heads_are_entities: bool) -> KGIngestReport:
    entities_before = int(catalog.scalar(con, "SELECT count(*) FROM kg_entities"))
    relations_before = int(catalog.scalar(con, "SELECT count(*) FROM kg_relations"))
    if attributes is not None:
        with catalog.registered(con, "_ckd_attrs", attributes):
            con.execute('INSERT INTO item_attributes SELECT item, title, "year", genres FROM _ckd_attrs '
                        'WHERE item NOT IN (SELECT item FROM item_attributes)')
    if links is not None:
        with catalog.registered(con, "_ckd_links", links):
            _new_entities(con, "SELECT entity AS ext, NULL::VARCHAR AS name, row_number() OVER () AS rn FROM _ckd_links")
            con.execute("INSERT INTO item_entities SELECT l.item, e.entity_id FROM _ckd_links l "
                        "JOIN kg_entities e ON e.external_id = l.entity "
                        "WHERE l.item NOT IN (SELECT item FROM item_entities)")
    with catalog.registered(con, "_ckd_kg", staged):
        # second and later copies of a valid triple in the input are duplicates
        con.execute(f"""CREATE TEMP TABLE _ckd_kg_rows AS SELECT *, CASE WHEN reason = {OK} AND row_number() OVER (
                        PARTITION BY reason, item, relation, tail ORDER BY rn) > 1 THEN {KG_REASONS.index(DUPLICATE)}
                        ELSE reason END AS final FROM _ckd_kg""")
    try:
        ok = f"final = {OK}"
        if heads_are_entities:
            _new_entities(con, f"SELECT item AS ext, NULL::VARCHAR AS name, rn FROM _ckd_kg_rows WHERE {ok}")
            head_sql = "SELECT r.rn, e.entity_id AS head FROM _ckd_kg_rows r JOIN kg_entities e ON e.external_id = r.item"
        else:  # items without a link get their own entity item:<id>, linked to them
            _new_entities(con, f"SELECT '{ITEM_ENTITY_PREFIX}' || item AS ext, NULL::VARCHAR AS name, rn FROM _ckd_kg_rows "
                               f"WHERE {ok} AND item NOT IN (SELECT item FROM item_entities)")
            con.execute(f"INSERT INTO item_entities SELECT DISTINCT r.item, e.entity_id FROM _ckd_kg_rows r "
                        f"JOIN kg_entities e ON e.external_id = '{ITEM_ENTITY_PREFIX}' || r.item "
                        f"WHERE r.{ok} AND r.item NOT IN (SELECT item FROM item_entities)")
            head_sql = "SELECT r.rn, l.entity_id AS head FROM _ckd_kg_rows r JOIN item_entities l ON l.item = r.item"
        _new_entities(con, f"SELECT tail AS ext, tail_name AS name, rn FROM _ckd_kg_rows WHERE {ok}")
        con.execute(f"""INSERT INTO kg_relations SELECT ? + row_number() OVER (ORDER BY first) - 1, relation FROM (
                        SELECT relation, min(rn) AS first FROM _ckd_kg_rows WHERE {ok}
                        AND relation NOT IN (SELECT name FROM kg_relations) GROUP BY relation)""",
                    [int(catalog.scalar(con, "SELECT coalesce(max(relation_id) + 1, 0) FROM kg_relations"))])
        con.execute(f"""CREATE TEMP TABLE _ckd_kg_resolved AS
            SELECT r.rn, h.head, k.relation_id, t.entity_id AS tail FROM _ckd_kg_rows r
            JOIN ({head_sql}) h ON h.rn = r.rn JOIN kg_relations k ON k.name = r.relation
            JOIN kg_entities t ON t.external_id = r.tail WHERE r.{ok}""")
        con.execute(f"""UPDATE _ckd_kg_rows SET final = {KG_REASONS.index(STORED_DUPLICATE)} WHERE rn IN (
                        SELECT x.rn FROM _ckd_kg_resolved x JOIN kg_triples s
                        ON s.head = x.head AND s.relation_id = x.relation_id AND s.tail = x.tail)""")
        ingest_id = int(catalog.scalar(con, "SELECT coalesce(max(ingest_id), 0) + 1 FROM kg_ingests"))
        con.execute(f"INSERT INTO kg_triples SELECT x.head, x.relation_id, x.tail, ? FROM _ckd_kg_resolved x "
                    f"JOIN _ckd_kg_rows r ON r.rn = x.rn WHERE r.{ok} ORDER BY x.rn", [ingest_id])
        counts = dict(con.sql("SELECT final, count(*) FROM _ckd_kg_rows GROUP BY final").fetchall())
        rows_read = int(sum(counts.values()))
        taken = int(counts.pop(OK, 0))
        con.execute("INSERT INTO kg_ingests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [ingest_id, content_hash, source, rows_read, taken, rows_read - taken, catalog.now_utc()])
        reasons = pa.table({"code": pa.array(range(len(KG_REASONS)), pa.int8()), "reason": pa.array(KG_REASONS)})
        with catalog.registered(con, "_ckd_kg_reasons", reasons):
            con.execute(f"INSERT INTO kg_quarantine SELECT ?, ?, r.rn + 1, q.reason, r.raw FROM _ckd_kg_rows r "
                        f"JOIN _ckd_kg_reasons q ON q.code = r.final WHERE r.final <> {OK} ORDER BY r.rn",
                        [ingest_id, source])
    finally:
        con.execute("DROP TABLE IF EXISTS _ckd_kg_rows")
        con.execute("DROP TABLE IF EXISTS _ckd_kg_resolved")
    return KGIngestReport(
        source, content_hash, rows_read, taken, rows_read - taken,
        {KG_REASONS[int(c)]: int(n) for c, n in sorted(counts.items())}, False,
        int(catalog.scalar(con, "SELECT count(*) FROM kg_entities")) - entities_before,
        int(catalog.scalar(con, "SELECT count(*) FROM kg_relations")) - relations_before)


def _new_entities(con, select_sql: str) -> None:
    """Entities named by ``select_sql`` (ext, name, rn) that are not stored yet get the next ids, in order of
    first appearance."""
    first = int(catalog.scalar(con, "SELECT coalesce(max(entity_id) + 1, 0) FROM kg_entities"))
    con.execute(f"""INSERT INTO kg_entities SELECT ? + row_number() OVER (ORDER BY first) - 1, ext, name FROM (
                    SELECT ext, any_value(name) AS name, min(rn) AS first FROM ({select_sql}) s
                    WHERE ext NOT IN (SELECT external_id FROM kg_entities) GROUP BY ext)""", [first])


# --- reading -------------------------------------------------------------------------------

GRAPH_SQL = """
WITH linked AS (SELECT it.dense_id AS item, l.entity_id FROM item_entities l
                JOIN items it ON it.external_id = l.item WHERE it.dense_id < ?),
edges AS (SELECT linked.item, t.relation_id, t.tail AS entity, 0 AS dir FROM kg_triples t
          JOIN linked ON linked.entity_id = t.head
          UNION ALL
          SELECT linked.item, t.relation_id, t.head AS entity, 1 AS dir FROM kg_triples t
          JOIN linked ON linked.entity_id = t.tail)
SELECT item, arg_min(relation_id, dir * 1000000 + relation_id) AS relation, entity
FROM edges GROUP BY item, entity ORDER BY item, entity
"""


def read_item_graph(con: duckdb.DuckDBPyConnection, num_items: int) -> ItemGraph | None:
    """The item graph for dense items < ``num_items``: one edge per (item, entity), from the triples where the
    item's entity is the head (or, when no such triple names that entity, the tail: inverse relations name
    the same fact twice). None when the catalog holds no triples."""
    if not int(catalog.scalar(con, "SELECT count(*) FROM kg_triples")):
        return None
    data = con.sql(GRAPH_SQL, params=[int(num_items)]).fetchnumpy()
    num_relations = int(catalog.scalar(con, "SELECT coalesce(max(relation_id) + 1, 0) FROM kg_relations"))
    return ItemGraph(items=np.asarray(data["item"], dtype=np.int64), relations=np.asarray(data["relation"], np.int64),
                     entities=np.asarray(data["entity"], dtype=np.int64), num_relations=num_relations)


def item_graph(store, num_items: int) -> ItemGraph | None:
    with store._connect(write=False) as con:
        return read_item_graph(con, num_items)


def item_labels(store, dense_items) -> list[str]:
    """'Title (year)' of each dense item (its external id where the catalog has no title)."""
    dense = np.asarray(dense_items, dtype=np.int64)
    if len(dense) == 0:
        return []
    query = pa.table({"pos": pa.array(np.arange(len(dense))), "dense": pa.array(dense)})
    with store._connect(write=False) as con, catalog.registered(con, "_ckd_q", query):
        rows = con.sql('SELECT q.pos, i.external_id, a.title, a."year" FROM _ckd_q q JOIN items i ON i.dense_id = q.dense '
                       'LEFT JOIN item_attributes a ON a.item = i.external_id ORDER BY q.pos').fetchall()
    out = [str(d) for d in dense]
    for pos, ext, title, year in rows:
        out[pos] = (f"{title} ({year})" if year is not None else title) if title else f"item {ext}"
    return out


def explanation_names(store, dense_items, entities) -> tuple[list[str], list[str], dict[int, str], dict[int, str | None]]:
    """What an explanation names, in one catalog connection: (external id and 'Title (year)' of each dense item,
    relation names by id, entity names by id for ``entities``)."""
    dense = np.asarray(dense_items, dtype=np.int64)
    ents = np.unique(np.asarray(entities, dtype=np.int64))
    ext, labels = [str(d) for d in dense], [str(d) for d in dense]
    query = pa.table({"pos": pa.array(np.arange(len(dense), dtype=np.int64)), "dense": pa.array(dense)})
    with store._connect(write=False) as con, catalog.registered(con, "_ckd_q", query), \
            catalog.registered(con, "_ckd_e", pa.table({"id": pa.array(ents)})):
        rows = con.sql('SELECT q.pos, i.external_id, a.title, a."year" FROM _ckd_q q JOIN items i ON i.dense_id = q.dense '
                       'LEFT JOIN item_attributes a ON a.item = i.external_id').fetchall()
        relations = dict(con.sql("SELECT relation_id, name FROM kg_relations").fetchall())
        names = dict(con.sql("SELECT e.entity_id, e.name FROM _ckd_e q JOIN kg_entities e ON e.entity_id = q.id").fetchall())
    for pos, e, title, year in rows:
        ext[pos] = e
        labels[pos] = (f"{title} ({year})" if year is not None else title) if title else f"item {e}"
    return ext, labels, relations, names


def relation_names(store) -> dict[int, str]:
    with store._connect(write=False) as con:
        return dict(con.sql("SELECT relation_id, name FROM kg_relations").fetchall())


def entity_names(store, ids) -> dict[int, str | None]:
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        return {}
    with store._connect(write=False) as con, catalog.registered(con, "_ckd_q", pa.table({"id": pa.array(ids)})):
        return dict(con.sql("SELECT e.entity_id, e.name FROM _ckd_q q JOIN kg_entities e ON e.entity_id = q.id").fetchall())


def kg_status(store) -> dict:
    """Counts for ``ckd status``: triples, entities, relations, linked items, items with attributes, quarantined."""
    with store._connect(write=False) as con:
        q = lambda t: int(catalog.scalar(con, f"SELECT count(*) FROM {t}"))  # noqa: E731
        return {"triples": q("kg_triples"), "entities": q("kg_entities"), "relations": q("kg_relations"),
                "linked_items": q("item_entities"), "item_attributes": q("item_attributes"),
                "quarantined": q("kg_quarantine")}


def kg_quarantine(store, limit: int = 100) -> list[dict]:
    with store._connect(write=False) as con:
        rows = con.sql("SELECT ingest_id, source, row_number, reason, raw FROM kg_quarantine "
                       "ORDER BY ingest_id, row_number LIMIT ?", params=[int(limit)]).fetchall()
    return [dict(zip(("ingest_id", "source", "row_number", "reason", "raw"), r)) for r in rows]
