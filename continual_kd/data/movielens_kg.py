"""MovieLens-100K's item knowledge, from the same RecBole source as its ratings.

The ``recbole==1.2.1`` wheel ships ``ml-100k.item`` (title, release year, genres of the 1,682 films),
``ml-100k.link`` (1,598 films → Freebase entity) and ``ml-100k.kg`` (91,631 Freebase triples: actor,
genre, director, writer, producer, award, language, country, …; entities have no names). Sources, in
order: the Parquet copies cached by an earlier call; a ``recbole-1.2.1-py3-none-any.whl`` the user put
into the cache folder; the wheel from PyPI (downloaded, read as a zip, never installed).

``add_movielens_kg(store)`` puts it into a store's catalog (stream/kg.py): the triples, the links, the
attributes, and the MovieLens genres as named triples (relation ``movielens.genre``, entity
``genre:<name>``), so an explanation can say "also a Crime film".
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import CkdError
from .movielens import RECBOLE_REQUIREMENT, _write_cache, default_cache_dir

log = logging.getLogger(__name__)

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
WHEEL_FILE = "recbole-1.2.1-py3-none-any.whl"
CACHE_FILES = {"items": "ml-100k-items.parquet", "links": "ml-100k-links.parquet", "triples": "ml-100k-kg.parquet"}
EXPECTED_ROWS = {"items": 1682, "links": 1598, "triples": 91631}


def load_movielens_100k_kg(cache_dir: Path | None = None) -> dict[str, pa.Table]:
    """{"items": item, title, year, genres; "links": item, entity; "triples": head, relation, tail} (all text
    but year: int32)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = {k: cache_dir / f for k, f in CACHE_FILES.items()}
    if all(p.is_file() for p in cached.values()):
        try:
            return _checked({k: pq.read_table(p) for k, p in cached.items()})
        except Exception as exc:  # a damaged cache is rebuilt from the wheel
            log.warning("ignoring damaged MovieLens KG cache in %s: %s", cache_dir, exc)
    tried = []
    for name, fetch in ((str(cache_dir / WHEEL_FILE), lambda: (cache_dir / WHEEL_FILE).read_bytes()),
                        (f"PyPI wheel {RECBOLE_REQUIREMENT}", _download_wheel)):
        try:
            tables = _checked(_from_wheel(fetch()))
        except FileNotFoundError:
            tried.append(f"{name} (not present)")
            continue
        except Exception as exc:  # try the next source
            tried.append(f"{name} ({type(exc).__name__}: {exc})")
            continue
        for k, t in tables.items():
            _write_cache(t, cached[k])
        return tables
    raise CkdError("Could not load MovieLens-100K's item knowledge; tried " + "; ".join(tried)
                   + f". Put {WHEEL_FILE} (pip download --no-deps {RECBOLE_REQUIREMENT}) into {cache_dir} "
                     f"(or set CKD_CACHE_DIR), or ingest your own triples with `ckd ingest-kg FILE`.")


def _download_wheel() -> bytes:
    import subprocess
    import sys
    import tempfile

    from .movielens import PIP_TIMEOUT_S

    with tempfile.TemporaryDirectory(prefix="ckd-recbole-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE_REQUIREMENT,
               "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download exited {proc.returncode}: {tail[0]}")
        return wheels[0].read_bytes()


def _tsv(data: bytes, names: list[str]) -> pa.Table:
    return pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
                          parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                          convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))


def _from_wheel(wheel: bytes) -> dict[str, pa.Table]:
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        items = _tsv(zf.read(MEMBER.format("item")), ["item", "title", "year", "genres"])
        links = _tsv(zf.read(MEMBER.format("link")), ["item", "entity"])
        triples = _tsv(zf.read(MEMBER.format("kg")), ["head", "relation", "tail"])
    year = pc.cast(pc.if_else(pc.match_substring_regex(items["year"], r"^\d{4}$"), items["year"],
                              pa.scalar(None, pa.string())), pa.int32())
    items = pa.table({"item": items["item"], "title": items["title"], "year": year, "genres": items["genres"]})
    return {"items": items, "links": links, "triples": triples}


def _checked(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    for k, n in EXPECTED_ROWS.items():
        if tables[k].num_rows != n:
            raise ValueError(f"{k}: expected {n} rows, got {tables[k].num_rows}")
    return tables


def genre_triples(items: pa.Table) -> pa.Table:
    """One (item, movielens.genre, genre:<name>) triple per genre of each film, the genre named."""
    rows = [(r["item"], g) for r in items.select(["item", "genres"]).to_pylist() for g in (r["genres"] or "").split()]
    films, genres = [r[0] for r in rows], [r[1] for r in rows]
    from ..stream.kg import GENRE_ENTITY_PREFIX, GENRE_RELATION

    return pa.table({"item": pa.array(films, pa.string()), "relation": pa.array([GENRE_RELATION] * len(rows), pa.string()),
                     "tail": pa.array([GENRE_ENTITY_PREFIX + g for g in genres], pa.string()),
                     "tail_name": pa.array(genres, pa.string())})


def add_movielens_kg(store, cache_dir: Path | None = None) -> list:
    """Ingest MovieLens-100K's item knowledge into ``store``: → the two ingest reports (Freebase triples with
    links and attributes; MovieLens genres). Ingesting it again changes nothing."""
    from ..stream.kg import ingest_item_triples

    tables = load_movielens_100k_kg(cache_dir)
    t = tables["triples"]
    freebase = pa.table({"item": t["head"], "relation": t["relation"], "tail": t["tail"],
                         "tail_name": pa.nulls(t.num_rows, pa.string())})
    reports = [ingest_item_triples(store, freebase, "movielens-100k: ml-100k.kg", links=tables["links"],
                                   attributes=tables["items"], heads_are_entities=True)]
    reports.append(ingest_item_triples(store, genre_triples(tables["items"]), "movielens-100k: ml-100k.item genres"))
    return reports
