"""The path teacher, its explanations and their faithfulness, the SKD term, and `ckd recommend --explain`
on a real snapshot. Hand-made graphs where the right path (and its weight) is known."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from continual_kd.config import TrainSpec, parse_job
from continual_kd.continual.training import train_epochs
from continual_kd.distill import TERMS, TermContext
from continual_kd.distill.skd import SKDTerm, structured_score_loss
from continual_kd.explain import reason_parts, reason_text, reasons, removal_drops
from continual_kd.explain.faithfulness import faithfulness
from continual_kd.models import build_backbone
from continual_kd.models.pathrec import PathRec
from continual_kd.sparse import UserItemSet
from continual_kd.types import ItemGraph, Knowledge

DIRECTOR, GENRE = 0, 1


def hand_model(director_weight: float = 2.0) -> PathRec:
    """User 0 rated films 0 and 1, user 1 rated films 1 and 5. Films 0 and 3 share a director (entity 100),
    films 1 and 4 a genre (entity 200); film 2's entity 300 is its own (it joins nothing)."""
    m = build_backbone("pathrec", 2, 6)
    m.set_item_graph(ItemGraph(items=np.array([0, 3, 1, 4, 2]), relations=np.array([DIRECTOR, DIRECTOR, GENRE, GENRE, GENRE]),
                               entities=np.array([100, 100, 200, 200, 300]), num_relations=2))
    m.observe(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 5]))
    with torch.no_grad():
        m.relation_log_weight[DIRECTOR] = math.log(director_weight)
    m.eval()
    return m


def test_hand_made_graph_scores_and_reasons():
    m = hand_model()
    # x_u0 = 1/√2 (two films); A = 1/√(2 items · 1 fact) on each side of a shared entity, so S = 1/2:
    # film 3: 1/√2 · w_director (2) · 1/2;  film 4: 1/√2 · w_genre (1) · 1/2
    # film 5: user 1 rated 1 and 5: R[1,1] = 1/√(2·2), R[1,5] = 1/√(2·1), C[1,5] = 1/(2√2): 1/√2 · C = 1/4
    expected = torch.tensor([2 / (2 * math.sqrt(2)), 1 / (2 * math.sqrt(2)), 0.25])
    with torch.no_grad():
        full = m.full_scores(torch.tensor([0]))[0]
    assert torch.allclose(full[[3, 4, 5]], expected, atol=1e-6)
    assert full[2] == 0  # film 2 shares nothing with what user 0 rated
    items = torch.tensor([[3, 4, 5]])
    r = reasons(m, torch.tensor([0]), items, top=2)
    assert r.via[0, :, 0].tolist() == [0, 1, 1]  # the film each recommendation comes from
    assert r.via[0, :, 1].tolist() == [-1, -1, -1]  # and nothing else
    assert torch.allclose(r.weight[0, :, 0], expected, atol=1e-6)
    assert torch.allclose(r.path_score[0], expected, atol=1e-6)
    kg, cf, ent = reason_parts(m, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), torch.tensor([3, 4, 5]))
    assert torch.allclose(kg[0, DIRECTOR], expected[0]) and kg[0].sum() == kg[0, DIRECTOR] and cf[0] == 0
    assert torch.allclose(kg[1, GENRE], expected[1]) and ent[1, GENRE] == 200 and ent[0, DIRECTOR] == 100
    assert kg[2].abs().sum() == 0 and torch.allclose(cf[2], expected[2])


def test_reasons_add_up_to_the_score_and_the_self_path_is_left_out():
    torch.manual_seed(0)
    m = random_model()
    users = torch.arange(8)
    known = UserItemSet(*m._edges, 8, 12)
    with torch.no_grad():
        full = m.full_scores(users)
        m.item_bias.normal_()
        full = m.full_scores(users)
    items = torch.arange(12).expand(8, -1)
    r = reasons(m, users, items, top=12)
    unseen = ~known.dense(users)
    assert torch.allclose((r.path_score + m.item_bias)[unseen], full[unseen], atol=1e-5)
    # a film the user rated gains nothing from itself: its score is what the *other* films give it
    seen = known.dense(users)
    assert torch.allclose((r.path_score + m.item_bias)[seen] - r.contributions.diagonal(dim1=1, dim2=2)[seen],
                          full[seen], atol=1e-5)
    assert torch.all(r.contributions.diagonal(dim1=1, dim2=2) == 0)


def random_model(seed: int = 0):
    rng = np.random.default_rng(seed)
    pairs = np.unique(rng.integers(0, [8, 12], size=(40, 2)), axis=0)
    m = build_backbone("pathrec", 8, 12)
    t = 30
    m.set_item_graph(ItemGraph(items=rng.integers(0, 12, t), relations=rng.integers(0, 3, t),
                               entities=rng.integers(0, 6, t), num_relations=3))
    m.observe(torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1]))
    with torch.no_grad():
        m.relation_log_weight[:3] = torch.tensor([0.3, -0.5, 1.0])
        m.cf_log_weight[0] = 0.2
    m.eval()
    return m


def test_removal_drop_is_exact_leave_one_out():
    m = random_model()
    known = UserItemSet(*m._edges, 8, 12)
    users, items, removed, brute = [], [], [], []
    for u in range(8):  # brute force: rebuild the graph without (u, i*) and score again
        rated = known.items[known.users == u].tolist()
        unseen = [i for i in range(12) if i not in rated]
        if len(rated) < 2:
            continue
        with torch.no_grad():
            base = m.full_scores(torch.tensor([u]))[0]
        for star in rated:
            keep = ~((known.users == u) & (known.items == star))
            m.observe(known.users[keep], known.items[keep])
            with torch.no_grad():
                after = m.full_scores(torch.tensor([u]))[0]
            m.observe(known.users, known.items)
            users.append(u)
            items.append(unseen)
            removed.append([star] * len(unseen))
            brute.append((base - after)[unseen])
    width = min(len(i) for i in items)
    drops = removal_drops(m, torch.tensor(users), torch.tensor([i[:width] for i in items]),
                          torch.tensor([r[:width] for r in removed]))
    assert torch.allclose(drops, torch.stack([b[:width] for b in brute]), atol=1e-6)


def test_faithfulness_cited_beats_random_on_the_hand_graph():
    m = hand_model()
    res = faithfulness(m, torch.tensor([0]), torch.tensor([[3, 4, 5]]), torch.Generator().manual_seed(0))
    # every film has one reason; removing it costs its whole contribution, the other film's removal only
    # rescales: drop = c·√2 − s·(√2 − 1)
    s = torch.tensor([2, 1, 1 / math.sqrt(2)]) / (2 * math.sqrt(2))
    cited = s * math.sqrt(2) - s * (math.sqrt(2) - 1)
    other = -s * (math.sqrt(2) - 1)
    assert res["cases"] == 3 and res["cited_wins"] == 1.0
    assert res["cited_drop"] == pytest.approx(float(cited.mean()), abs=1e-6)
    assert res["random_drop"] == pytest.approx(float(other.mean()), abs=1e-6)


def test_reason_text_names_films_and_relations():
    parts = [("film.film.directed_by", 0.7, None), ("collaborative", 0.1, None)]
    assert reason_text("Heat (1995)", parts) == ("you rated *Heat (1995)*; this film has the same director; "
                                                 "users who rated it also rated this film")
    assert reason_text("Fargo (1996)", [("collaborative", 0.25, None)]) == \
        "users who rated *Fargo (1996)* like you also rated this film"
    assert reason_text("Fargo (1996)", [("movielens.genre", 0.3, "Crime"), ("film.film.actor", 0.1, None)]) == \
        "you rated *Fargo (1996)*; this film is also a Crime film and shares an actor with it"
    assert "shares 'my.relation' with it" in reason_text("X", [("my.relation", 1.0, None)])


def test_training_learns_the_relation_that_predicts():
    """Films in 8 clusters of 5 share a director; a second relation links films at random. Users rate films
    of one cluster: the director's weight must grow above the noise relation's."""
    rng = np.random.default_rng(0)
    films = np.arange(40)
    cluster = films // 5
    noise = rng.integers(0, 8, 40)
    graph = ItemGraph(items=np.concatenate([films, films]), relations=np.concatenate([np.zeros(40), np.ones(40)]).astype(int),
                      entities=np.concatenate([cluster, 100 + noise]), num_relations=2)
    users = np.repeat(np.arange(48), 3)
    items = np.array([rng.choice(np.flatnonzero(cluster == u % 8), 3, replace=False) for u in range(48)]).reshape(-1)
    m = build_backbone("pathrec", 48, 40)
    m.set_item_graph(graph)
    known = UserItemSet(users, items, 48, 40)
    m.observe(known.users, known.items)
    train_epochs(m, torch.as_tensor(users), torch.as_tensor(items), known, 30,
                 TrainSpec(epochs_base=30, lr=0.05, weight_decay=0.0, batch_size=64), torch.Generator().manual_seed(0))
    w = m.relation_weights().detach()
    assert w[0] > 2 * w[1]


def test_skd_loss_hand_values():
    t = torch.tensor([[10.0, 20.0, 30.0]])
    assert structured_score_loss(torch.tensor([[1.0, 2.0, 3.0]]), t) == pytest.approx(0.0, abs=1e-6)
    # reversed: ½ Σ (z_s − z_t)² = ½ Σ (2 z)² = 2 · P = 6
    assert structured_score_loss(torch.tensor([[3.0, 2.0, 1.0]]), t) == pytest.approx(6.0, abs=1e-5)
    # constant student scores: ½ Σ z_t² = P / 2
    assert structured_score_loss(torch.tensor([[5.0, 5.0, 5.0]]), t) == pytest.approx(1.5, abs=1e-5)


def test_skd_term_makes_the_student_reproduce_the_teacher_scores():
    torch.manual_seed(0)
    spec = parse_job({"teachers": [{"name": "path", "backbone": "pathrec"}],
                      "distill": {"terms": [{"name": "skd", "teacher": "path", "weight": 1.0, "k": 20,
                                             "pairs": 10}]}}).distill.terms[0]
    assert TERMS["skd"] is SKDTerm
    users = np.arange(30)
    teacher_items = np.stack([np.random.default_rng(u).permutation(40)[:20] for u in users])
    teacher_scores = np.sort(np.random.default_rng(1).normal(size=(30, 20)), axis=1)[:, ::-1].astype(np.float32)
    other = Knowledge("other", 0, users, teacher_items[:, ::-1].copy(), teacher_scores)
    know = Knowledge("path", 0, users, teacher_items, teacher_scores)
    student = build_backbone("mf", 30, 40, dim=8)
    pos_u = np.repeat(users, 2)
    pos_i = teacher_items[:, :2].reshape(-1)
    known = UserItemSet(pos_u, pos_i, 30, 40)
    ctx = TermContext(model=student, knowledge=[other, know], known=known, num_users=30, num_items=40, block=0,
                      epochs=40)
    term = SKDTerm(spec, ctx)
    assert torch.equal(term.items, torch.as_tensor(teacher_items))  # it reads the named teacher's list

    def corr() -> float:
        with torch.no_grad():
            s = student.score(torch.as_tensor(users), torch.as_tensor(teacher_items))
        t = torch.as_tensor(teacher_scores)
        zs = (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True)
        zt = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True)
        return float((zs * zt).mean(1).mean())

    before = corr()
    train_epochs(student, torch.as_tensor(pos_u), torch.as_tensor(pos_i), known, 40,
                 TrainSpec(epochs_base=40, lr=0.05, weight_decay=0.0, batch_size=32), torch.Generator().manual_seed(0),
                 [term])
    assert before < 0.2 and corr() > 0.8


# ------------------------------------------------------------------ the CLI on a real snapshot

JOB = {
    "name": "explain-tiny", "seed": 0,
    "source": {"dataset": "store", "store": "STORE"},
    "blocks": {"base_fraction": 0.5, "incremental": 1},
    "teachers": [{"name": "path", "backbone": "pathrec",
                  "train": {"epochs_base": 3, "epochs_block": 1, "lr": 0.05, "batch_size": 256}}],
    "student": {"dim": 8, "train": {"epochs_base": 3, "epochs_block": 1, "batch_size": 256}},
    "distill": {"terms": [{"name": "skd", "teacher": "path", "weight": 0.1, "k": 10, "pairs": 5}]},
    "eval": {"ks": [10]},
}


def test_cli_recommend_explain_on_a_real_snapshot(cli, tmp_path: Path):
    """A real store (interactions + triples), the job's block 0 trained in-process, a real snapshot on disk;
    `ckd recommend --explain` reads the snapshot and the store only."""
    from continual_kd.continual.loop import make_learners, run_block_local
    from continual_kd.snapshots import write_snapshot
    from continual_kd.stream import StreamStore
    from continual_kd.stream.kg import ingest_triples_file

    rng = np.random.default_rng(0)
    n_users, n_items = 30, 24
    users = np.repeat(np.arange(n_users), 8)
    items = np.array([rng.choice(np.flatnonzero(np.arange(n_items) % 4 == u % 4), 5, replace=False).tolist()
                      + rng.choice(n_items, 3, replace=False).tolist() for u in range(n_users)]).reshape(-1)
    store = StreamStore.open(tmp_path / "store", create=True)
    store.ingest_table(pa.table({"user": [f"u{u}" for u in users], "item": [f"f{i}" for i in items],
                                 "timestamp": np.arange(len(users))}), "ratings")
    (tmp_path / "kg.csv").write_text("item,relation,tail,tail_name\n" + "".join(
        f"f{i},film.film.directed_by,d{i % 4},\nf{i},movielens.genre,genre:{i % 3},Genre{i % 3}\n" for i in range(n_items)))
    assert ingest_triples_file(store, tmp_path / "kg.csv").rows_taken == 2 * n_items
    job = parse_job(json.loads(json.dumps(JOB).replace("STORE", str(store.root))))
    plan = store.ensure_plan(0.5, 1, (0.8, 0.1, 0.1), 0)
    seen = store.read_blocks(plan.plan_id, 0)
    learners = make_learners(job)
    run_block_local(job, seen, 0, learners)
    states = {n: l.state() for n, l in learners.items()}
    write_snapshot(tmp_path / "runs" / job.name, 0, {n: s["weights"] for n, s in states.items()}, {
        "job": job.name, "job_spec": job.to_dict(), "plan_id": plan.plan_id, "store": str(store.root),
        "model_info": {n: {"num_users": s["num_users"], "num_items": s["num_items"]} for n, s in states.items()}})

    res = cli("recommend", "--runs", tmp_path / "runs", "--user", "u1", "--user", "u2", "-k", "3", "--explain",
              "--json", "-")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["path_model"] == "teacher:path"
    recs = data["recommendations"]["u1"]
    assert len(recs) == 3 and all(r["reasons"] for r in recs)
    first = recs[0]["reasons"][0]
    assert first["text"].startswith(("you rated *item f", "users who rated *item f"))
    assert {p["type"] for r in recs for rs in r["reasons"] for p in rs["paths"]} <= {
        "film.film.directed_by", "movielens.genre", "collaborative"}
    for r in recs:  # the reasons shown are a part of the item's path score (every path weighs > 0)
        assert 0 < sum(rs["share"] for rs in r["reasons"]) <= 1 + 1e-6
    rated = set(store.external_ids("item", seen.items[seen.users == store.dense_ids("user", ["u1"])[0]]))
    for r in recs:
        target = int(r["item"][1:])
        for rs in r["reasons"]:
            cited = int(rs["item"][1:])
            assert rs["item"] in rated and rs["item"] != r["item"]  # a film u1 rated, not the one recommended
            assert rs["weight"] == pytest.approx(sum(p["weight"] for p in rs["paths"]), rel=1e-5)
            assert rs["share"] == pytest.approx(rs["weight"] / r["path_score"], rel=1e-5)
            for path in rs["paths"]:  # each knowledge path is a fact both films share in the triples
                if path["type"] == "movielens.genre":
                    assert target % 3 == cited % 3 and path["entity"] == f"Genre{target % 3}"
                elif path["type"] == "film.film.directed_by":
                    assert target % 4 == cited % 4
    f = data["faithfulness"]
    assert f["cases"] == 6 and 0.5 <= f["cited_wins"] <= 1.0
    # k past the user's unseen items: those items and no others, each case of the summary one of them
    res = cli("recommend", "--runs", tmp_path / "runs", "--user", "u1", "-k", "1000", "--explain", "--json", "-")
    assert res.exit_code == 0, res.stderr
    every = json.loads(res.stdout)
    unseen = seen.num_items - len(rated)
    assert len(every["recommendations"]["u1"]) == unseen and every["faithfulness"]["cases"] == unseen
    assert not {r["item"] for r in every["recommendations"]["u1"]} & rated
    # the human output says it in words
    res = cli("recommend", "--runs", tmp_path / "runs", "--user", "u1", "-k", "2", "--explain")
    assert res.exit_code == 0, res.stderr
    assert "you rated *item f" in res.stdout or "users who rated *item f" in res.stdout
    assert "faithfulness:" in res.stdout
