"""Loads the real MovieLens-100K (GroupLens archive or the recbole wheel from PyPI: needs network)."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from continual_kd.data.movielens import CACHE_FILE, load_movielens_100k
from continual_kd.errors import CkdError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckd-cache")


@pytest.mark.network
def test_load_and_cache(cache_dir):
    table = load_movielens_100k(cache_dir)
    assert table.schema == pa.schema([("user", pa.string()), ("item", pa.string()),
                                      ("timestamp", pa.int64()), ("rating", pa.float32())])
    assert table.num_rows == 100_000
    assert pc.count_distinct(table["user"]).as_py() == 943
    assert pc.count_distinct(table["item"]).as_py() == 1682
    assert pc.min(table["rating"]).as_py() == 1.0 and pc.max(table["rating"]).as_py() == 5.0
    # the first line of u.data: user 196 rated item 242 with 3 at 881250949
    assert table.slice(0, 1).to_pylist() == [{"user": "196", "item": "242", "timestamp": 881250949, "rating": 3.0}]

    assert (cache_dir / CACHE_FILE).is_file()
    assert load_movielens_100k(cache_dir).equals(table)


@pytest.mark.network
def test_damaged_cache_is_rebuilt_from_u_data(cache_dir, tmp_path):
    # a user-provided u.data in the cache folder is a source; a damaged cache is ignored
    full = load_movielens_100k(cache_dir)
    lines = [f"{r['user']}\t{r['item']}\t{int(r['rating'])}\t{r['timestamp']}" for r in full.to_pylist()]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    (tmp_path / CACHE_FILE).write_bytes(b"not parquet")
    assert load_movielens_100k(tmp_path).equals(full)
    assert load_movielens_100k(tmp_path).equals(full)  # now from the rewritten cache


def test_truncated_u_data_is_rejected_when_nothing_else_works(tmp_path, monkeypatch):
    import continual_kd.data.movielens as ml

    def offline():
        raise OSError("offline")

    monkeypatch.setattr(ml, "_from_grouplens", offline)
    monkeypatch.setattr(ml, "_from_recbole_wheel", offline)
    (tmp_path / "u.data").write_text("1\t2\t3\t881250949\n")
    with pytest.raises(CkdError, match=r"u\.data.*expected 100000 rows.*ckd ingest"):
        load_movielens_100k(tmp_path)
