"""Item knowledge in the store's catalog: triples with stable ids, validation and quarantine, the item graph
read with the blocks, `ckd ingest-kg`, and the real MovieLens-100K files."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from continual_kd.stream import StreamStore
from continual_kd.stream.kg import (
    DUPLICATE, LONG_ID, MISSING_RELATION, MISSING_TAIL, STORED_DUPLICATE, ingest_triples_file, item_graph, kg_quarantine,
    kg_status, relation_names,
)


@pytest.fixture
def store(tmp_path: Path) -> StreamStore:
    """Items a, b, c, d have interactions (dense ids 0..3 in order of time); e has none yet."""
    st = StreamStore.open(tmp_path / "store", create=True)
    st.ingest_table(pa.table({"user": ["u1", "u1", "u2", "u2", "u3"], "item": ["a", "b", "b", "c", "d"],
                              "timestamp": [1, 2, 3, 4, 5]}), "interactions")
    return st


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_triples_are_validated_quarantined_and_get_stable_ids(store, tmp_path):
    f = _write(tmp_path / "kg.csv", "item,relation,tail,tail_name\n"
               "a,directed_by,d1,Ann Director\n"
               "b,directed_by,d1,Ann Director\n"
               "c,genre,g1,Crime\n"
               "a,directed_by,d1,Ann Director\n"  # the same triple again in the file
               "b,,d2,\n"  # no relation
               "c,genre,,\n"  # no tail
               f"d,genre,{'x' * 300},\n"  # absurd id
               "e,genre,g1,Crime\n")  # an item without interactions yet: kept, linked by its external id
    r = ingest_triples_file(store, f)
    assert (r.rows_read, r.rows_taken, r.rows_quarantined) == (8, 4, 4)
    assert r.reasons == {DUPLICATE: 1, MISSING_RELATION: 1, MISSING_TAIL: 1, LONG_ID: 1}
    assert (r.new_entities, r.new_relations) == (2 + 4, 2)  # d1, g1 + item:a, item:b, item:c, item:e
    q = kg_quarantine(store)
    assert [(x["row_number"], x["reason"]) for x in q] == [(4, DUPLICATE), (5, MISSING_RELATION), (6, MISSING_TAIL),
                                                           (7, LONG_ID)]
    assert q[1]["raw"] == "item=b, relation=, tail=d2"

    # the same file again: a no-op; a new file keeps every stored id and marks stored triples
    assert ingest_triples_file(store, f).already_ingested
    before = kg_status(store)
    g = _write(tmp_path / "kg2.csv", "item,relation,tail\nb,directed_by,d1\nd,directed_by,d1\n")
    r2 = ingest_triples_file(store, g)
    assert (r2.rows_taken, r2.reasons) == (1, {STORED_DUPLICATE: 1})
    assert (r2.new_entities, r2.new_relations) == (1, 0)  # item:d only
    assert kg_status(store)["triples"] == before["triples"] + 1 == 5

    # the graph of the items known so far (dense ids): one edge per (item, entity)
    graph = item_graph(store, 4)
    edges = sorted(zip(graph.items.tolist(), graph.relations.tolist(), graph.entities.tolist()))
    # ids in order of first appearance: the items' own entities (no link named them), then the tails
    assert _entity_ids(store) == {"item:a": 0, "item:b": 1, "item:c": 2, "item:e": 3, "d1": 4, "g1": 5, "item:d": 6}
    assert relation_names(store) == {0: "directed_by", 1: "genre"}
    assert edges == [(0, 0, 4), (1, 0, 4), (2, 1, 5), (3, 0, 4)]
    assert item_graph(store, 2).items.tolist() == [0, 1]  # an earlier block knows fewer items
    # the blocks carry the graph of their items
    plan = store.ensure_plan(0.5, 1, (1.0, 0.0, 0.0), 0)
    block = store.read_blocks(plan.plan_id, 1)
    assert np.array_equal(block.meta["item_graph"].items, graph.items)


def _entity_ids(store) -> dict[str, int]:
    with store._connect(write=False) as con:
        return dict(con.sql("SELECT external_id, entity_id FROM kg_entities").fetchall())


def test_entity_ids_survive_later_ingests(store, tmp_path):
    ingest_triples_file(store, _write(tmp_path / "one.csv", "item,relation,tail\na,genre,g1\n"))
    first = _entity_ids(store)
    ingest_triples_file(store, _write(tmp_path / "two.csv", "item,relation,tail\nb,genre,g2\nc,genre,g1\n"))
    after = _entity_ids(store)
    assert {k: after[k] for k in first} == first
    assert after == {**first, "item:b": 2, "item:c": 3, "g2": 4}


def test_parquet_triples(store, tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "kg.parquet"
    pq.write_table(pa.table({"head": ["a", "b"], "relation": ["genre", "genre"], "tail": ["g1", "g1"]}), path)
    r = ingest_triples_file(store, path)
    assert (r.rows_taken, r.rows_quarantined) == (2, 0)


@pytest.mark.parametrize("content, problem", [
    ("item,tail\na,g1\n", "no relation column"),
    ("item,relation,tail\n", "no data rows"),
    ("", "empty"),
])
def test_cli_refuses_a_bad_triples_file_in_one_line(cli, store, tmp_path, content, problem):
    f = _write(tmp_path / "bad.csv", content)
    res = cli("ingest-kg", f, "--store", store.root)
    assert res.exit_code == 2
    assert problem in res.stderr and "bad.csv" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert kg_status(store)["triples"] == 0


def test_cli_ingest_kg_reports_counts(cli, store, tmp_path):
    f = _write(tmp_path / "kg.tsv", "item\trelation\ttail\na\tgenre\tg1\nb\t\tg1\n")
    res = cli("ingest-kg", f, "--store", store.root)
    assert res.exit_code == 0, res.stderr
    assert "1 triples taken, 1 quarantined" in res.stdout and "missing relation" in res.stdout
    assert cli("ingest-kg", tmp_path / "nope.csv", "--store", store.root).exit_code == 2


@pytest.mark.network
def test_movielens_100k_item_knowledge(tmp_path):
    """The real ml-100k .item / .link / .kg files (from the RecBole wheel) in a real store."""
    from continual_kd.data.movielens_kg import add_movielens_kg
    from continual_kd.data.sources import build_store
    from continual_kd.stream.kg import GENRE_RELATION, item_labels

    store, _ = build_store("movielens-100k", tmp_path / "ml")
    freebase, genres = add_movielens_kg(store)
    assert (freebase.rows_read, freebase.rows_taken, freebase.rows_quarantined) == (91631, 91631, 0)
    assert (freebase.new_relations, genres.rows_taken, genres.new_relations) == (24, 2893, 1)
    status = kg_status(store)
    assert status == {"triples": 94524, "entities": 34731, "relations": 25, "linked_items": 1682,
                      "item_attributes": 1682, "quarantined": 0}
    assert all(r.already_ingested for r in add_movielens_kg(store))  # idempotent
    assert GENRE_RELATION in relation_names(store).values()
    dense = store.dense_ids("item", ["1", "50"])
    assert item_labels(store, dense) == ["Toy Story (1995)", "Star Wars (1977)"]
    graph = item_graph(store, store.num_items)
    assert len(graph) == 71929 and graph.num_relations == 25
    assert set(graph.items.tolist()) == set(range(1682))  # every film has at least its MovieLens genres
