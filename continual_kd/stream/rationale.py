"""Item rationales: a short text per item from the store's item attributes and knowledge graph.

    "Heat (1995); Action, Crime, Thriller; same director as Casino, Ronin; same actor as The Godfather, …"

A text is the item's title (year), its genres, then at most ``MAX_FACTS`` knowledge-graph facts, at most
``PER_RELATION`` per relation, relations in ``RELATION_WORDS`` order (director before actor before country),
inside a relation the entities shared by the most known items first. Freebase entities have no names, so an
unnamed entity is named by films linked to it: its first ``CANONICAL`` known films by dense id, the item
itself left out — every film sharing the entity names it the same way, so shared facts are shared words
(what the rationale encoder, distill/rationale.py, picks up). An entity linked to one known item only
joins nothing and is left out unless it has a name (a genre, a user's ``tail_name``).

Read with the blocks (``StreamStore.read_block(s)`` → ``Interactions.meta["item_rationales"]``) for the
items known at that block only; pure SQL over the catalog, no interactions.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from continual_kd.stream import catalog
from continual_kd.stream.kg import GENRE_RELATION, GRAPH_SQL
from continual_kd.types import ItemGraph, ItemRationales

MAX_FACTS = 8  # knowledge-graph facts per item text
PER_RELATION = 2  # facts per relation and item
CANONICAL = 3  # films that name an unnamed entity (2 shown: the item itself left out)

# (substring of a relation name, the noun for its entity), first match wins; the order is the facts' order
RELATION_WORDS = (
    ("movielens.genre", "genre"),
    ("direct", "director"),
    ("writ", "writer"),
    ("sequel", "series"),
    ("prequel", "series"),
    ("subject", "subject"),
    ("actor", "actor"),
    ("production_compan", "production company"),
    ("produc", "producer"),
    ("cinematograph", "cinematographer"),
    ("award_won", "award"),
    ("award_nomination", "award nomination"),
    ("genre", "genre"),
    ("language", "language"),
    ("country", "country"),
    ("rating", "content rating"),
)


def relation_noun(name: str) -> tuple[str, int]:
    """(noun, order) of a relation name: 'film.film.directed_by' → ('director', 1); a relation we have no
    word for is its last dotted part in words, after every known one."""
    low = name.lower()
    for pos, (key, noun) in enumerate(RELATION_WORDS):
        if key in low:
            return noun, pos
    return low.rsplit(".", 1)[-1].replace("_", " "), len(RELATION_WORDS)


FACTS_SQL = f"""
WITH known AS (SELECT i.dense_id AS item, i.external_id, a.title, a."year", nullif(trim(a.genres), '') AS genres
               FROM items i LEFT JOIN item_attributes a ON a.item = i.external_id WHERE i.dense_id < $n),
labelled AS (SELECT item, coalesce(regexp_replace(title, '^(.*), (The|A|An)$', '\\2 \\1'), 'item ' || external_id) AS label,
                    "year", genres FROM known),
e AS (SELECT g.item, g.relation, g.entity, r.noun, r."order", n.name,
             count(*) OVER (PARTITION BY g.relation, g.entity) AS degree,
             row_number() OVER (PARTITION BY g.relation, g.entity ORDER BY g.item) AS canon
      FROM _ckd_edges g JOIN _ckd_rels r ON r.relation = g.relation
      JOIN labelled k ON k.item = g.item LEFT JOIN kg_entities n ON n.entity_id = g.entity
      WHERE NOT (r.is_genre AND k.genres IS NOT NULL)),  -- MovieLens genres: said once, from the attributes
per_rel AS (SELECT *, row_number() OVER (PARTITION BY item, relation ORDER BY degree, entity) AS rank_in_rel
            FROM e WHERE degree >= 2 OR name IS NOT NULL),
facts AS (SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY item ORDER BY "order", rank_in_rel, relation) AS pos
                         FROM per_rel WHERE rank_in_rel <= {PER_RELATION}) WHERE pos <= {MAX_FACTS}),
named AS (SELECT f.item, f.relation, f.entity, f.pos, f.degree,
                 CASE WHEN f.name IS NOT NULL THEN f.noun || ' ' || f.name
                      ELSE 'same ' || f.noun || ' as ' || array_to_string(list_slice(
                          list(k.label ORDER BY c.canon) FILTER (WHERE c.item IS NOT NULL), 1, {CANONICAL - 1}), ', ')
                 END AS text
          FROM facts f LEFT JOIN e c ON c.relation = f.relation AND c.entity = f.entity AND c.canon <= {CANONICAL}
                                        AND c.item <> f.item
          LEFT JOIN labelled k ON k.item = c.item
          GROUP BY f.item, f.relation, f.entity, f.pos, f.degree, f.name, f.noun),
genre AS (SELECT item, trim(g) AS g FROM (SELECT item, unnest(string_split(genres, ' ')) AS g FROM labelled
                                          WHERE genres IS NOT NULL) WHERE trim(g) <> ''),
genre_facts AS (SELECT item, 'genre:' || g AS key, 'genre ' || g AS text, count(*) OVER (PARTITION BY g) AS degree,
                       row_number() OVER (PARTITION BY item ORDER BY g) - 100 AS pos FROM genre),
all_facts AS (SELECT item, key, text, degree, pos FROM genre_facts
              UNION ALL
              SELECT item, 'r' || relation || ':e' || entity AS key, text, degree, pos FROM named),
-- two entities named by the same films (two Freebase genres of the same first films): said once
uniq AS (SELECT * FROM all_facts QUALIFY row_number() OVER (PARTITION BY item, text ORDER BY pos) = 1),
texts AS (SELECT item, string_agg(text, '; ' ORDER BY pos) AS facts FROM uniq WHERE pos > 0 GROUP BY item)
SELECT 0 AS part, u.item, u.key, u.text, u.degree, u.pos FROM uniq u
UNION ALL
SELECT 1 AS part, k.item, NULL, concat_ws('; ', k.label || coalesce(' (' || k."year" || ')', ''),
                                         replace(k.genres, ' ', ', '), t.facts), NULL, NULL
FROM labelled k LEFT JOIN texts t ON t.item = k.item
ORDER BY part, item, pos
"""


def has_item_knowledge(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the catalog holds item attributes or triples (what a rationale is made of)."""
    return bool(int(catalog.scalar(con, "SELECT count(*) FROM item_attributes"))
                or int(catalog.scalar(con, "SELECT count(*) FROM kg_triples")))


def store_has_item_knowledge(store) -> bool:
    with store._connect(write=False) as con:
        return has_item_knowledge(con)


def read_item_rationales(con: duckdb.DuckDBPyConnection, num_items: int,
                         graph: ItemGraph | None = None) -> ItemRationales | None:
    """Rationales of dense items < ``num_items``; None when the catalog holds no item knowledge (no
    attributes, no triples). ``graph``: the item graph already read for the same items (else read here)."""
    if not has_item_knowledge(con):
        return None
    n = int(num_items)
    edges = {"item": np.zeros(0, np.int64), "relation": np.zeros(0, np.int64), "entity": np.zeros(0, np.int64)}
    if graph is not None:
        edges = {"item": graph.items, "relation": graph.relations, "entity": graph.entities}
    elif int(catalog.scalar(con, "SELECT count(*) FROM kg_triples")):
        edges = con.sql(GRAPH_SQL, params=[n]).fetchnumpy()
    edges = pa.table({k: pa.array(np.asarray(edges[k], dtype=np.int64)) for k in ("item", "relation", "entity")})
    rel_rows = con.sql("SELECT relation_id, name FROM kg_relations ORDER BY relation_id").fetchall()
    words = [relation_noun(name) for _, name in rel_rows]
    rels = pa.table({"relation": pa.array([r for r, _ in rel_rows], pa.int64()),
                     "noun": pa.array([w for w, _ in words], pa.string()),
                     "order": pa.array([o for _, o in words], pa.int32()),
                     "is_genre": pa.array([name == GENRE_RELATION for _, name in rel_rows], pa.bool_())})
    with catalog.registered(con, "_ckd_edges", edges), catalog.registered(con, "_ckd_rels", rels):
        rows = con.sql(FACTS_SQL, params={"n": n}).fetchnumpy()
    fact = np.asarray(rows["part"]) == 0
    texts = np.full(n, "", dtype=object)
    texts[np.asarray(rows["item"], np.int64)[~fact]] = [t or "" for t in rows["text"][~fact].tolist()]
    return ItemRationales(
        texts=tuple(texts.tolist()),
        fact_items=np.asarray(rows["item"][fact], dtype=np.int64),
        fact_keys=np.asarray(rows["key"][fact], dtype=object),
        fact_texts=np.asarray(rows["text"][fact], dtype=object),
        fact_degrees=np.asarray(rows["degree"][fact], dtype=np.int64))


def item_rationales(store, num_items: int) -> ItemRationales | None:
    with store._connect(write=False) as con:
        return read_item_rationales(con, num_items)
