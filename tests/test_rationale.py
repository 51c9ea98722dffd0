"""Rationale distillation: item rationales from the catalog's item knowledge, the TF-IDF + LSA encoder, the
``rationale`` KD term (hand values, gradient, nothing in the served student), a job under Ray, and
``ckd recommend --explain`` showing them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from continual_kd.config import load_job, parse_job
from continual_kd.distill.base import Batch, TermContext
from continual_kd.distill.rationale import RationaleTerm, encode_rationales, rationale_embeddings, rationale_loss
from continual_kd.errors import CkdError
from continual_kd.models.mf import BPRMF
from continual_kd.sparse import UserItemSet
from continual_kd.stream import StreamStore
from continual_kd.stream.kg import ingest_item_triples
from continual_kd.stream.rationale import item_rationales
from continual_kd.types import ItemRationales


def _films_store(root: Path) -> StreamStore:
    """Five films: Heat and Casino share a director, Heat and Ronin an actor, Toy Story and Fargo (no attributes)
    a named language; Ronin's director directed nothing else here (left out)."""
    store = StreamStore.open(root, create=True)
    films = ["heat", "casino", "ronin", "toy", "fargo"]
    store.ingest_table(pa.table({"user": ["u0"] * 5 + ["u1"] * 5, "item": films * 2, "timestamp": np.arange(10)}), "r")
    attributes = pa.table({"item": ["heat", "casino", "ronin", "toy"], "title": ["Heat", "Casino", "Ronin", "Toy Story"],
                           "year": pa.array([1995, 1995, 1998, 1995], pa.int32()),
                           "genres": ["Action Crime Thriller", "Crime Drama", "Action Crime", "Animation Comedy"]})
    triples = pa.table({"item": ["heat", "casino", "ronin", "heat", "ronin", "toy", "fargo"],
                        "relation": ["film.film.directed_by", "film.film.directed_by", "film.film.actor", "film.film.actor",
                                     "film.film.directed_by", "film.film.language", "film.film.language"],
                        "tail": ["mann", "mann", "deniro", "deniro", "frankenheimer", "en", "en"],
                        "tail_name": [None, None, None, None, None, "English", "English"]})
    ingest_item_triples(store, triples, "films", attributes=attributes)
    return store


def test_rationale_texts_of_hand_made_items(tmp_path: Path):
    store = _films_store(tmp_path / "store")
    r = item_rationales(store, store.num_items)
    assert r.texts == (
        "Heat (1995); Action, Crime, Thriller; same director as Casino; same actor as Ronin",
        "Casino (1995); Crime, Drama; same director as Heat",
        "Ronin (1998); Action, Crime; same actor as Heat",  # its director is in no other film: left out
        "Toy Story (1995); Animation, Comedy; language English",  # a named entity is said by its name
        "item fargo; language English")  # no attributes: its external id
    heat = {k: (t, d) for i, k, t, d in zip(r.fact_items, r.fact_keys, r.fact_texts, r.fact_degrees) if i == 0}
    assert heat["genre:Crime"] == ("genre Crime", 3) and heat["genre:Thriller"] == ("genre Thriller", 1)
    director = next(k for k, (t, _) in heat.items() if t.startswith("same director"))
    casino = {k for i, k in zip(r.fact_items, r.fact_keys) if i == 1}
    assert director in casino  # the same fact has the same key for both films
    # only the items known at a block: fewer items, and facts shared with an unknown film are gone
    first3 = item_rationales(store, 3)
    assert first3.texts[:2] == r.texts[:2] and len(first3.texts) == 3
    # read with the blocks
    plan = store.ensure_plan(0.5, 1, (0.8, 0.1, 0.1), 0)
    assert store.read_blocks(plan.plan_id, 0).meta["item_rationales"].texts == r.texts


def test_a_store_without_item_knowledge_reads_no_rationales(tmp_path: Path):
    store = StreamStore.open(tmp_path / "plain", create=True)
    store.ingest_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "timestamp": [1, 2]}), "r")
    assert item_rationales(store, 2) is None
    plan = store.ensure_plan(0.5, 1, (0.8, 0.1, 0.1), 0)
    assert "item_rationales" not in store.read_blocks(plan.plan_id, 0).meta


def test_encoder_is_deterministic_and_shared_facts_are_closer(tmp_path: Path):
    texts = list(item_rationales(_films_store(tmp_path / "store"), 5).texts) + [""]
    a, b = encode_rationales(texts, 4, seed=3), encode_rationales(texts, 4, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 4) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a[:5], axis=1), 1.0, atol=1e-5)  # unit rows
    assert not a[5].any()  # an empty text: a zero row
    cos = a @ a.T
    heat, casino, ronin, toy = 0, 1, 2, 3
    assert cos[heat, casino] > cos[heat, toy] + 0.2  # a director (and Crime) in common vs nothing
    assert cos[heat, ronin] > cos[heat, toy] + 0.2
    assert cos[toy, 4] > cos[toy, casino]  # Toy Story and Fargo: the same named language
    # cached per (texts, dim, seed): the same array object, read-only
    assert rationale_embeddings(texts, 4, 3) is rationale_embeddings(texts, 4, 3)
    assert not rationale_embeddings(texts, 4, 3).flags.writeable


def test_rationale_loss_hand_values_and_gradient():
    projected = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # cosines 1, 1/√2, 0 (a zero row) → Σ (1 − cos) = 0 + (1 − 0.70711) + 1
    assert rationale_loss(projected, target).item() == pytest.approx(2 - 1 / math.sqrt(2), abs=1e-6)

    # the term: MF's item rows through the term's projection; one step of its gradient moves the batch's
    # item rows towards their targets, and only the batch's items with a rationale
    model = BPRMF(2, 4, dim=2)
    with torch.no_grad():
        model.item_emb.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]]))
    rationales = ItemRationales(texts=("a",) * 4, fact_items=np.zeros(0, np.int64), fact_keys=np.zeros(0, object),
                                fact_texts=np.zeros(0, object), fact_degrees=np.zeros(0, np.int64))
    ctx = TermContext(model=model, knowledge=[], known=UserItemSet(torch.tensor([0]), torch.tensor([0]), 2, 4),
                      num_users=2, num_items=4, block=0, epochs=1, meta={"item_rationales": rationales})
    spec = parse_job(_job_dict("unused", "rationale")).distill.terms[1]
    term = RationaleTerm(spec, ctx)
    target = torch.zeros(4, spec.dim)
    target[:, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    term.target, term.has = target, torch.tensor([True, True, True, False])  # item 3: no rationale
    with torch.no_grad():
        term.projection.zero_()
        term.projection[:2, :2] = torch.eye(2)  # W v = v, padded
    batch = Batch(users=torch.tensor([0, 1]), pos=torch.tensor([0, 2]), neg=torch.tensor([1, 3]))
    loss = term.loss(model, batch, 0)
    # items 0, 1, 2: cos((1,0),(0,1)) = 0, cos((0,1),(1,0)) = 0, cos((1,1),(1,0)) = 1/√2
    assert loss.item() == pytest.approx(3 - 1 / math.sqrt(2), abs=1e-6)
    loss.backward()
    grad = model.item_emb.grad
    assert grad[3].abs().sum() == 0  # the item without a rationale is left alone
    assert model.user_emb.grad is None or model.user_emb.grad.abs().sum() == 0  # the item side only
    with torch.no_grad():
        moved = model.item_emb - 0.1 * grad
    before = torch.nn.functional.cosine_similarity(model.item_emb[:3].detach(), target[:3, :2], dim=1)
    after = torch.nn.functional.cosine_similarity(moved[:3], target[:3, :2], dim=1)
    assert (after > before + 1e-3).all()
    assert term.projection.grad is not None and term.projection.grad.abs().sum() > 0  # the term's own parameter learns


def test_term_without_item_knowledge_is_one_clear_error():
    model = BPRMF(2, 3, dim=2)
    ctx = TermContext(model=model, knowledge=[], known=UserItemSet(torch.tensor([0]), torch.tensor([0]), 2, 3),
                      num_users=2, num_items=3, block=0, epochs=1)
    spec = parse_job(_job_dict("unused", "rationale")).distill.terms[1]
    with pytest.raises(CkdError, match="needs item knowledge"):
        RationaleTerm(spec, ctx)


# ----------------------------------------------------------------------------- through a job


def _stream_store(root: Path) -> StreamStore:
    """40 users, 24 films in 4 taste groups; each film has a title, year, genre, director and actor."""
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 24
    users = np.repeat(np.arange(n_users), 8)
    items = np.array([rng.choice(np.flatnonzero(np.arange(n_items) % 4 == u % 4), 5, replace=False).tolist()
                      + rng.choice(n_items, 3, replace=False).tolist() for u in range(n_users)]).reshape(-1)
    store = StreamStore.open(root, create=True)
    store.ingest_table(pa.table({"user": [f"u{u}" for u in users], "item": [f"f{i}" for i in items],
                                 "timestamp": np.arange(len(users))}), "ratings")
    films = [f"f{i}" for i in range(n_items)]
    attributes = pa.table({"item": films, "title": [f"Film {i}" for i in range(n_items)],
                           "year": pa.array([1990 + i % 5 for i in range(n_items)], pa.int32()),
                           "genres": [("Drama", "Comedy", "Horror", "Western")[i % 4] for i in range(n_items)]})
    triples = pa.table({"item": films * 2, "relation": ["film.film.directed_by"] * n_items + ["film.film.actor"] * n_items,
                        "tail": [f"d{i % 4}" for i in range(n_items)] + [f"a{i % 6}" for i in range(n_items)],
                        "tail_name": [None] * (2 * n_items)})
    ingest_item_triples(store, triples, "films", attributes=attributes)
    return store


def _job_dict(store: str, *terms: str) -> dict:
    available = {"rrd": {"name": "rrd", "weight": 0.01, "k": 5, "pool": 10, "uninteresting": 5},
                 "rationale": {"name": "rationale", "weight": 0.1, "dim": 8, "seed": 0}}
    return {"name": "rat", "seed": 0, "source": {"dataset": "store", "store": store},
            "blocks": {"base_fraction": 0.5, "incremental": 1, "split": [0.8, 0.1, 0.1]},
            "teachers": [{"name": "mf", "backbone": "mf", "dim": 8,
                          "train": {"epochs_base": 3, "epochs_block": 2, "batch_size": 128}}],
            "student": {"dim": 4, "train": {"epochs_base": 3, "epochs_block": 2, "batch_size": 128}},
            "distill": {"terms": [available[t] for t in ("rrd", *terms)]},
            "eval": {"ks": [10, 20]}}


def test_rationale_term_runs_through_a_job_under_ray(ray_cluster, tmp_path: Path, monkeypatch, one_thread,
                                                    same_as_local):
    from continual_kd.runtime.coordinator import run_job
    from continual_kd.snapshots import resolve_snapshot

    monkeypatch.chdir(tmp_path)
    store = _stream_store(tmp_path / "store")
    (tmp_path / "rat.yaml").write_text(json.dumps(_job_dict(str(store.root), "rationale")))  # JSON is YAML
    job = load_job(tmp_path / "rat.yaml")
    result = run_job(job)
    assert [r.block for r in result.results] == [0, 1]
    for r in result.results:
        assert r.updates["student"]["terms"] == ["rrd", "rationale"]
        assert r.updates["student"]["kd_loss"] > 0
        assert 0 < r.metrics["student"]["ndcg@20"] <= 1
    same_as_local(job, result)
    snap, _ = resolve_snapshot(tmp_path / "runs" / "rat", "latest")
    weights = torch.load(snap.path / "student.pt", weights_only=True)
    weights = weights.get("weights", weights)
    assert set(weights) == {"user_emb", "item_emb"}  # no projection, nothing of the term in the snapshot
    assert weights["user_emb"].shape == (40, 4) and weights["item_emb"].shape == (24, 4)
    assert result.results[-1].updates["student"]["parameters"] == (40 + 24) * 4  # the served MF-4, nothing more

    # a store without item knowledge: refused before Ray runs anything, naming the term
    plain = StreamStore.open(tmp_path / "plain-store", create=True)
    plain.ingest_table(pa.table({"user": [f"u{u % 20}" for u in range(200)], "item": [f"f{u % 13}" for u in range(200)],
                                 "timestamp": np.arange(200)}), "ratings")
    spec = _job_dict(str(plain.root), "rationale")
    spec["name"] = "bare"
    (tmp_path / "bare.yaml").write_text(json.dumps(spec))
    with pytest.raises(CkdError, match=r"distill.terms\[1\]: the rationale term needs item knowledge"):
        run_job(load_job(tmp_path / "bare.yaml"))


def test_cli_recommend_explain_shows_rationales(cli, tmp_path: Path):
    from continual_kd.continual.loop import make_learners, run_block_local
    from continual_kd.snapshots import write_snapshot

    store = _stream_store(tmp_path / "store")
    job = parse_job(_job_dict(str(store.root), "rationale"))
    plan = store.ensure_plan(0.5, 1, (0.8, 0.1, 0.1), 0)
    seen = store.read_blocks(plan.plan_id, 0)
    learners = make_learners(job)
    run_block_local(job, seen, 0, learners)
    states = {n: learner.state() for n, learner in learners.items()}
    write_snapshot(tmp_path / "runs" / job.name, 0, {n: s["weights"] for n, s in states.items()}, {
        "job": job.name, "job_spec": job.to_dict(), "plan_id": plan.plan_id, "store": str(store.root),
        "model_info": {n: {"num_users": s["num_users"], "num_items": s["num_items"]} for n, s in states.items()}})

    res = cli("recommend", "--runs", tmp_path / "runs", "--user", "u1", "-k", "3", "--explain", "--json", "-")
    assert res.exit_code == 0, res.stderr
    recs = json.loads(res.stdout)["recommendations"]["u1"]
    rat = item_rationales(store, store.num_items)
    ext = store.external_ids("item", np.arange(store.num_items))
    history = seen.items[seen.users == store.dense_ids("user", ["u1"])[0]]  # every pair seen (the service's)
    history_keys = set(rat.fact_keys[np.isin(rat.fact_items, history)])
    assert len(recs) == 3
    for r in recs:
        dense, film = ext.index(r["item"]), int(r["item"][1:])
        assert r["rationale"]["text"] == rat.texts[dense]
        assert r["rationale"]["text"].startswith(f"Film {film} ({1990 + film % 5}); ")
        # the facts it shares with u1's films: every one of them, rarest first, at most 3
        mine = [(d, k, t) for i, k, t, d in zip(rat.fact_items, rat.fact_keys, rat.fact_texts, rat.fact_degrees)
                if i == dense and k in history_keys]
        assert [s["fact"] for s in r["rationale"]["shared"]] == [t for _, _, t in sorted(mine)[:3]]
        assert len(r["rationale"]["shared"]) >= 1  # 8 rated films of 4 genres, 4 directors, 6 actors
        for s in r["rationale"]["shared"]:  # named by the films of u1's that have the fact
            assert s["with"] and all(w.startswith("Film ") for w in s["with"])
            assert all(int(w.split()[1]) in {int(ext[h][1:]) for h in history} for w in s["with"])
    res = cli("recommend", "--runs", tmp_path / "runs", "--user", "u1", "-k", "2", "--explain")
    assert res.exit_code == 0, res.stderr
    assert "about it: Film " in res.stdout
