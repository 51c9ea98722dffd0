"""Choice on validation (best epoch, a grid of settings recorded in the snapshot), replay of earlier
blocks, and the retrain-from-scratch reference (`continual.strategy: retrain`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from continual_kd.config import load_job, parse_job
from continual_kd.continual import Learner, make_learners, run_stream_local
from continual_kd.continual.training import BestEpoch
from continual_kd.data.sources import open_source
from continual_kd.errors import CkdError
from continual_kd.eval import model_pairs_mask
from continual_kd.sparse import UserItemSet
from continual_kd.types import TRAIN, VALID


class _Fixed(torch.nn.Module):
    """A model whose full scores are one (U, I) parameter: the test sets them per 'epoch'."""

    def __init__(self, scores):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(scores, dtype=torch.float32))

    def full_scores(self, users):
        return self.table[users]


def test_best_epoch_keeps_the_peak_and_stops_after_patience():
    # 2 users × 4 items; user 0's validation item is 2, user 1's is 3; item 0 is known for both
    relevant = UserItemSet(np.array([0, 1]), np.array([2, 3]), 2, 4)
    exclude = UserItemSet(np.array([0, 1]), np.array([0, 0]), 2, 4)
    model = _Fixed(np.zeros((2, 4)))
    best = BestEpoch(model, relevant, exclude, patience=2, every=1, cap=10, k=2)
    per_epoch = [
        [[9, 0, 1, 0], [9, 0, 0, 1]],  # both validation items first: NDCG@2 = 1
        [[9, 2, 1, 0], [9, 2, 0, 1]],  # both second: 1/log2(3) = 0.6309
        [[9, 2, 1, 0], [9, 2, 1, 0]],  # one second, one third (outside the top 2): 0.3155
        [[9, 1, 0, 2], [9, 5, 0, 1]],  # one missing, one second: 0.3155
    ]
    stops = []
    for epoch, scores in enumerate(per_epoch, start=1):
        with torch.no_grad():
            model.table.copy_(torch.tensor(scores, dtype=torch.float32))
        stops.append(best(epoch))
    assert best.best == pytest.approx(1.0) and best.best_epoch == 1
    assert [v for _, v in best.history] == pytest.approx([1.0, 1 / np.log2(3), 0.5 / np.log2(3), 0.5 / np.log2(3)])
    assert stops == [False, False, True, True]  # epoch 3 is 2 epochs past the best: stop
    best.restore()
    assert torch.equal(model.table.detach(), torch.tensor(per_epoch[0], dtype=torch.float32))


def test_best_epoch_never_stops_with_patience_zero_and_validates_every_n():
    relevant = UserItemSet(np.array([0]), np.array([1]), 1, 3)
    model = _Fixed(np.array([[0.0, 1.0, 0.0]]))
    best = BestEpoch(model, relevant, UserItemSet(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 1, 3),
                     patience=0, every=3, cap=7, k=2)
    assert [best(e) for e in range(1, 8)] == [False] * 7
    assert [e for e, _ in best.history] == [3, 6, 7]  # every 3rd epoch and the cap


def test_best_epoch_on_a_sample_of_validation_users_ranks_only_those_users():
    # user u's validation item is u % 4; the scores put it first for users 0..4 and last for users 5..9
    relevant = UserItemSet(np.arange(10), np.arange(10) % 4, 10, 4)
    empty = UserItemSet(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 10, 4)
    scores = np.zeros((10, 4))
    scores[np.arange(10), np.arange(10) % 4] = np.where(np.arange(10) < 5, 1.0, -1.0)
    model = _Fixed(scores)
    full = BestEpoch(model, relevant, empty, patience=0, every=1, cap=1, k=1)
    assert full.score() == pytest.approx(0.5)
    from continual_kd.eval.metrics import sample_users

    for seed in (0, 1, 2):
        picked = sample_users(torch.arange(10), 4, seed)
        sampled = BestEpoch(model, relevant, empty, patience=0, every=1, cap=1, k=1, sample=4, seed=seed)
        assert sampled.score() == pytest.approx(float((picked < 5).float().mean()))  # only those 4 users
        assert sampled.score() == sampled.score()  # the same users at every epoch
    assert BestEpoch(model, relevant, empty, patience=0, every=1, cap=1, k=1, sample=10).score() == full.score()


JOB = """
name: choice
seed: 0
source:
  dataset: synthetic
  store: stores/choice
  synthetic: {users: 150, items: 120, interactions: 4000, periods: 3, seed: 2}
blocks: {base_fraction: 0.5, incremental: 2}
teachers:
  - {name: mf, backbone: mf, dim: 16, train: {epochs_base: 12, epochs_block: 4, batch_size: 256, patience: 3}}
student: {dim: 8, train: {epochs_base: 12, epochs_block: 4, batch_size: 256}}
distill: {terms: [{name: rrd, k: 10, pool: 30, uninteresting: 10}]}
eval: {ks: [10, 20]}
"""


def _job(tmp_path, monkeypatch, extra: dict | None = None):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "choice.yaml"
    path.write_text(JOB)
    job = load_job(path)
    if extra:
        d = job.to_dict()
        for key, value in extra.items():
            d[key] = {**d[key], **value} if isinstance(value, dict) else value
        job = parse_job(d, str(path))
    store = open_source(job.source)
    plan = store.ensure_plan(0.5, 2, (0.8, 0.1, 0.1), job.seed)
    return job, store, plan


def test_update_keeps_the_best_validation_epoch(tmp_path, monkeypatch):
    job, store, plan = _job(tmp_path, monkeypatch)
    seen = store.read_blocks(plan.plan_id, 0)
    learner = Learner(job.teachers[0], job.seed, role="teacher")
    log = learner.update(seen, 0)
    assert 1 <= log["best_epoch"] <= log["epochs"] <= 12
    # the weights kept are the best epoch's: validating again gives the logged figure
    assert learner.validate(seen, 0, job.eval)["ndcg@20"] == pytest.approx(log["valid_ndcg@20"], abs=1e-6)
    # the same run without the choice (select: last, as many epochs as were run) ends on the last
    # validated epoch's weights, no better than the best one
    last = Learner(job.teachers[0].model_copy(update={"train": job.teachers[0].train.model_copy(
        update={"select": "last", "epochs_base": log["epochs"]})}), job.seed, role="teacher")
    last_log = last.update(seen, 0)
    assert last_log["best_epoch"] == last_log["epochs"] == log["epochs"] and last_log["valid_ndcg@20"] is None
    last_valid = last.validate(seen, 0, job.eval)["ndcg@20"]
    assert last_valid <= log["valid_ndcg@20"] + 1e-6
    if log["best_epoch"] < log["epochs"]:  # stopped by patience: the last epoch was not the best
        assert last_valid < log["valid_ndcg@20"]


def test_warm_updates_stop_on_their_own_patience(tmp_path, monkeypatch):
    job, store, plan = _job(tmp_path, monkeypatch)
    spec = job.teachers[0]
    spec = spec.model_copy(update={"train": spec.train.model_copy(
        update={"epochs_block": 40, "patience": 40, "patience_block": 1})})
    learner = Learner(spec, job.seed, role="teacher")
    base = learner.update(store.read_blocks(plan.plan_id, 0), 0)
    assert base["epochs"] == 12  # the base block keeps `patience` (40): it runs to its cap
    warm = learner.update(store.read_blocks(plan.plan_id, 1), 1)
    assert warm["epochs"] == min(warm["best_epoch"] + 1, 40) < 40  # one epoch without a gain ends the update


def test_grid_is_chosen_on_validation_and_recorded_in_the_state(tmp_path, monkeypatch):
    job, store, plan = _job(tmp_path, monkeypatch)
    spec = job.teachers[0]
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"grid": {"weight_decay": (1e-4, 0.3)}})})
    seen = store.read_blocks(plan.plan_id, 0)
    learner = Learner(spec, job.seed, role="teacher")
    log = learner.update(seen, 0)
    scores = {g["weight_decay"]: g["valid_ndcg@20"] for g in log["grid"]}
    winner = max(scores, key=scores.get)
    assert learner.chosen == {"weight_decay": winner} and log["chosen"] == {"weight_decay": winner}
    assert log["valid_ndcg@20"] == pytest.approx(scores[winner])
    # each candidate equals a run with that setting alone (same start, same seed)
    alone = Learner(spec.model_copy(update={"train": spec.train.model_copy(update={"grid": {}, "weight_decay": winner})}),
                    job.seed, role="teacher")
    assert alone.update(seen, 0)["valid_ndcg@20"] == pytest.approx(scores[winner], abs=1e-6)
    # the choice is saved with the weights and used by later updates (no new grid)
    restored = Learner(spec, job.seed, role="teacher")
    restored.load(learner.state())
    assert restored.chosen == {"weight_decay": winner}
    later = restored.update(store.read_blocks(plan.plan_id, 1), 1)
    assert later["grid"] == [] and later["chosen"] == {"weight_decay": winner}


def test_kd_scale_multiplies_every_term_weight_and_the_grid_chooses_it(tmp_path, monkeypatch):
    """train.kd_scale: the KD terms' weights × the scale (a scale of 2 trains exactly as the terms at twice their
    weight); in the grid it is chosen on the base block's validation like any other setting."""
    job, store, plan = _job(tmp_path, monkeypatch)
    seen = store.read_blocks(plan.plan_id, 0)
    teacher = Learner(job.teachers[0], job.seed, role="teacher")
    teacher.update(seen, 0)
    knowledge = [teacher.knowledge(seen, 0, 40)]
    rrd = job.distill.terms[0]

    def student(scale: float, weight: float, grid: dict | None = None):
        spec = job.student.model_copy(update={"train": job.student.train.model_copy(
            update={"kd_scale": scale, "grid": grid or {}})})
        learner = Learner(spec, job.seed, role="student")
        log = learner.update(seen, 0, knowledge, [rrd.model_copy(update={"weight": weight})])
        return learner, log

    scaled, _ = student(2.0, 0.5)
    doubled, _ = student(1.0, 1.0)
    plain, _ = student(1.0, 0.5)
    for name, value in scaled.model.state_dict().items():
        assert torch.equal(value, doubled.model.state_dict()[name])
    assert not torch.equal(scaled.model.item_emb, plain.model.item_emb)  # the scale acts
    chooser, log = student(1.0, 0.5, {"kd_scale": (0.0, 2.0)})
    scores = {g["kd_scale"]: g["valid_ndcg@20"] for g in log["grid"]}
    winner = max(scores, key=scores.get)
    assert chooser.chosen == {"kd_scale": winner} and log["valid_ndcg@20"] == pytest.approx(scores[winner])
    assert scores[2.0] == pytest.approx(student(2.0, 0.5)[1]["valid_ndcg@20"], abs=1e-6)


def test_less_popular_choice_trades_at_most_the_tolerance():
    from continual_kd.continual.learner import choose_fit

    fits = [({"negative_exponent": 0.0}, {"valid": 0.300, "valid_avgpop": 200.0}),
            ({"negative_exponent": 0.25}, {"valid": 0.298, "valid_avgpop": 180.0}),   # 0.67% below: within 1%
            ({"negative_exponent": 0.5}, {"valid": 0.290, "valid_avgpop": 150.0}),    # 3.3% below: outside
            ({"negative_exponent": 1.0}, {"valid": None, "valid_avgpop": None})]
    assert choose_fit(fits)[0] == {"negative_exponent": 0.0}                       # accuracy
    assert choose_fit(fits, "less_popular", 0.01)[0] == {"negative_exponent": 0.25}
    assert choose_fit(fits, "less_popular", 0.04)[0] == {"negative_exponent": 0.5}
    assert choose_fit(fits, "less_popular", 0.0)[0] == {"negative_exponent": 0.0}


def test_best_epoch_records_the_average_popularity_of_the_best_lists():
    relevant = UserItemSet(np.array([0, 1]), np.array([2, 3]), 2, 4)
    exclude = UserItemSet(np.array([0, 1]), np.array([0, 0]), 2, 4)
    model = _Fixed(np.zeros((2, 4)))
    popularity = torch.tensor([50.0, 10.0, 4.0, 2.0])
    best = BestEpoch(model, relevant, exclude, patience=0, every=1, cap=2, k=2, item_popularity=popularity)
    for epoch, scores in enumerate([[[9, 0, 1, 0], [9, 0, 0, 1]],      # tops {2, 1|3}, {3, 1|2}: NDCG 1
                                    [[9, 2, 1, 0], [9, 2, 0, 1]]], 1):  # tops {1, 2}, {1, 3}: NDCG .63
        with torch.no_grad():
            model.table.copy_(torch.tensor(scores, dtype=torch.float32))
        best(epoch)
    # epoch 1 is best; its top-2 (item 0 masked): user 0 → 2 then a tie of 1 and 3 at 0; user 1 → 3, tie
    assert best.best_epoch == 1
    tops = model.table.new_tensor([[9, 0, 1, 0], [9, 0, 0, 1]])
    tops[:, 0] = -1e9
    expected = popularity[tops.topk(2, dim=1).indices].mean().item()
    assert best.best_avgpop == pytest.approx(expected)


def test_grid_of_negative_exponents_needs_popularity_negatives():
    from continual_kd.config import TrainSpec
    from continual_kd.errors import CkdError

    assert TrainSpec(negatives="popularity", grid={"negative_exponent": [0, 0.25]}).grid["negative_exponent"] == (0, 0.25)
    with pytest.raises((CkdError, ValueError), match="negative exponent"):
        TrainSpec(grid={"negative_exponent": [0, 0.25]})
    with pytest.raises((CkdError, ValueError), match="learning rate ≤ 0"):
        TrainSpec(grid={"lr": [0.0, 0.01]})
    assert TrainSpec(grid={"lr": [0.001, 0.01]}).grid["lr"] == (0.001, 0.01)
    with pytest.raises((CkdError, ValueError), match="without validation"):
        TrainSpec(select="last", grid={"lr": [0.001, 0.01]})


def test_replay_draws_only_history_and_from_every_earlier_block(tmp_path, monkeypatch):
    job, store, plan = _job(tmp_path, monkeypatch)
    seen = store.read_blocks(plan.plan_id, 2)
    learner = Learner(job.teachers[0], job.seed, role="teacher")
    history = model_pairs_mask(seen, 2) & ~((seen.block == 2) & (seen.split == TRAIN))
    key = seen.users.astype(np.int64) * seen.num_items + seen.items
    block_of = dict(zip(key[history].tolist(), seen.block[history].tolist()))
    for by in ("user", "pair"):
        draw = learner._replay_sampler(seen, 2, 5000, by)
        u, i = draw(torch.Generator().manual_seed(0))
        drawn = (u.numpy() * seen.num_items + i.numpy()).tolist()
        assert len(drawn) == 5000 and all(k in block_of for k in drawn)  # only what the model may know of earlier blocks
        assert {block_of[k] for k in drawn} == {0, 1}
        users = np.unique(seen.users[history])
        per_user = np.bincount(u.numpy(), minlength=seen.num_users)[users]
        if by == "user":  # every history user about equally often (5000 / |users| each)
            assert per_user.std() / per_user.mean() < 0.35
    # a warm update with replay trains on the block plus that many replayed rows per epoch
    run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), 2, learners={"teacher:mf": learner,
                     "student": Learner(job.student, job.seed)})
    log = learner.update(seen, 2, replay=1.5)
    assert log["replay_rows"] == round(1.5 * log["train_rows"])
    # training alone is logged apart from the update (its per-epoch validation): every pair stepped, replay included
    assert log["trained_rows"] == log["epochs"] * (log["train_rows"] + log["replay_rows"])
    assert 0 < log["train_seconds"] < log["seconds"]
    # a model's own train.replay overrides the job's (continual.replay), 0 included
    for own in (3.0, 0.0):
        mine = Learner(job.teachers[0].model_copy(update={"train": job.teachers[0].train.model_copy(
            update={"replay": own})}), job.seed, role="teacher")
        run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), 2, learners={"teacher:mf": mine,
                         "student": Learner(job.student, job.seed)})
        log = mine.update(seen, 2, replay=1.5)
        assert log["replay_rows"] == round(own * log["train_rows"])


def test_retrain_equals_a_model_trained_from_scratch_on_everything(tmp_path, monkeypatch):
    job, store, plan = _job(tmp_path, monkeypatch, {"continual": {"strategy": "retrain"}, "distill": {"terms": []}})
    assert job.continual.strategy == "retrain"
    learners = make_learners(job)
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), 3, learners=learners)
    seen = store.read_blocks(plan.plan_id, 2)
    # a model that never saw blocks 0 and 1 one by one, trained once on everything up to block 2
    fresh = Learner(job.teachers[0], job.seed, role="teacher")
    log = fresh.update(seen, 2, strategy="retrain")
    assert log["train_rows"] == int(model_pairs_mask(seen, 2).sum())
    for a, b in zip(fresh.model.state_dict().values(), learners["teacher:mf"].model.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.evaluate(seen, [0, 1, 2], job.eval) == learners["teacher:mf"].evaluate(seen, [0, 1, 2], job.eval)
    assert results[-1].updates["teacher:mf"]["train_rows"] == log["train_rows"]
    # the old spelling still parses to the same strategy
    assert parse_job({"continual": {"strategy": "scratch"}}).continual.strategy == "retrain"


def test_popularity_negatives_follow_the_weights_and_avoid_known_pairs():
    from continual_kd.sparse import sample_excluding

    known = UserItemSet(np.array([0, 0]), np.array([0, 1]), 1, 4)  # user 0 knows items 0 and 1
    weights = torch.tensor([2.0, 2.0, 1.0, 3.0])  # of what is left, item 3 is 3× as likely as item 2
    users = torch.zeros(40000, dtype=torch.int64)
    draw = sample_excluding(users, 1, 4, [known], torch.Generator().manual_seed(0), weights=weights).flatten()
    counts = torch.bincount(draw, minlength=4)
    assert counts[0] == counts[1] == 0
    assert float(counts[3]) / float(counts[2]) == pytest.approx(3.0, rel=0.05)


def test_one_pass_evaluation_equals_a_pass_per_block(tmp_path, monkeypatch):
    """Learner.evaluate ranks every user once for all blocks' test sets (standard mask): the same figures
    as one evaluate_ranking pass per block, sampled or not."""
    from continual_kd.eval import evaluate_ranking
    from continual_kd.types import TEST
    from continual_kd.continual.learner import derive_seed

    job, store, plan = _job(tmp_path, monkeypatch)
    seen = store.read_blocks(plan.plan_id, 2)
    learner = Learner(job.teachers[0], job.seed, role="teacher")
    for b in range(3):
        learner.update(store.read_blocks(plan.plan_id, b), b)
    for sample in (None, 40):
        spec = job.eval.model_copy(update={"sample_users": sample})
        together = learner.evaluate(seen, [0, 1, 2, None], spec)
        popularity = learner.pairs.popularity(seen)
        from continual_kd.eval.bias import popularity_groupings

        groups = popularity_groupings(popularity, spec.mass_groups)
        for b in (0, 1, 2, None):
            relevant, exclude = learner.pairs.eval_sets(seen, b, TEST, spec.mask)
            alone = evaluate_ranking(learner.model, relevant, exclude, spec.ks, 64, "cpu", sample=sample,
                                     seed=derive_seed(learner.seed, "eval", b, TEST), keep_relevant=True,
                                     item_popularity=popularity, item_group=groups)
            assert together[b].keys() == alone.keys()
            for key, value in alone.items():
                assert together[b][key] == pytest.approx(value, abs=1e-6), (b, key)
        assert together[0]["users"] > 0 and together[None]["users"] >= together[2]["users"]


def test_warm_updates_step_old_rows_at_lr_block_and_new_rows_base_block_and_retrain_at_lr(tmp_path, monkeypatch):
    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    spec = job.teachers[0]

    def with_train(**kw):
        return spec.model_copy(update={"train": spec.train.model_copy(update={"select": "last", **kw})})

    def weights(learner):
        return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}

    tiny = Learner(with_train(lr_block=1e-7), job.seed, role="teacher")
    plain = Learner(with_train(), job.seed, role="teacher")
    tiny.update(seen0, 0), plain.update(seen0, 0)
    for a, b in zip(weights(tiny).values(), weights(plain).values()):
        assert torch.equal(a, b)  # the base block trains at lr: lr_block changes nothing there
    before = weights(tiny)
    n_users, n_items = tiny.model.num_users, tiny.model.num_items
    tiny.update(seen1, 1), plain.update(seen1, 1)
    assert seen1.num_users > n_users  # block 1 brings new users
    after = weights(tiny)
    old_moved = max(float((after["user_emb"][:n_users] - before["user_emb"]).abs().max()),
                    float((after["item_emb"][:n_items] - before["item_emb"]).abs().max()))
    plain_moved = float((weights(plain)["user_emb"][:n_users] - before["user_emb"]).abs().max())
    assert old_moved < 1e-4 < plain_moved  # what the model had steps at lr_block …
    new_rows = after["user_emb"][n_users:]
    assert float((new_rows - new_rows.mean(0)).abs().max()) > 1e-3  # … the new users' rows learn at lr
    # a retrain is a new model: trained at lr, as the from-scratch reference must be
    retrained = Learner(with_train(lr_block=1e-7), job.seed, role="teacher")
    reference = Learner(with_train(), job.seed, role="teacher")
    retrained.update(seen1, 1, strategy="retrain"), reference.update(seen1, 1, strategy="retrain")
    for a, b in zip(weights(retrained).values(), weights(reference).values()):
        assert torch.equal(a, b)


def test_grid_block_chooses_the_warm_rate_on_each_blocks_validation(tmp_path, monkeypatch):
    """train.grid_block: every warm update trains once per candidate from the same start and keeps the one
    with the better validation NDCG@20: the same weights as an update at that rate alone; the base block and
    the base grid's choice are untouched."""
    import copy

    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    spec = job.teachers[0]
    train = spec.train.model_copy(update={"grid": {"weight_decay": (1e-4, 1e-2)}, "grid_block": {"lr_block": (spec.train.lr, 1e-7)}})
    learner = Learner(spec.model_copy(update={"train": train}), job.seed, role="teacher")
    base = learner.update(seen0, 0)
    assert [set(g) - {"valid_ndcg@20", "valid_avgpop@20", "best_epoch", "epochs"} for g in base["grid"]] == [{"weight_decay"}] * 2
    chosen = dict(learner.chosen)
    start = copy.deepcopy(learner)
    log = learner.update(seen1, 1)
    assert learner.chosen == chosen  # the base grid's choice stays
    assert [g["lr_block"] for g in log["grid"]] == [spec.train.lr, 1e-7]
    best = max(log["grid"], key=lambda g: g["valid_ndcg@20"])
    assert log["chosen_block"] == {"lr_block": best["lr_block"]} and log["valid_ndcg@20"] == best["valid_ndcg@20"]
    alone = start  # the same start, that rate only
    alone.spec = alone.spec.model_copy(update={"train": alone.spec.train.model_copy(
        update={"grid_block": {}, "lr_block": best["lr_block"]})})
    alone.update(seen1, 1)
    for (k, a), b in zip(learner.model.state_dict().items(), alone.model.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(Exception, match="empty list of candidates"):
        spec.train.model_validate({**spec.train.model_dump(), "grid_block": {"lr_block": []}})


def test_shrink_and_perturb_starts_a_warm_update_from_a_shrunk_noisy_copy(tmp_path, monkeypatch):
    """train.shrink_block / perturb_block: before a warm update every parameter is θ·shrink + perturb·std(θ)·ε
    (seeded: the same learner twice gives the same weights); the base block and a retrain are untouched."""
    import copy

    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    spec = job.teachers[0].model_copy(update={"backbone": "multvae", "dim": 8, "hidden": 16})

    def learner(**train):
        return Learner(spec.model_copy(update={"train": spec.train.model_copy(update=train)}), job.seed, role="teacher")

    plain, shrunk = learner(), learner(shrink_block=0.5)
    plain.update(seen0, 0), shrunk.update(seen0, 0)
    before = {k: v.clone() for k, v in shrunk.model.state_dict().items()}
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the base block trains as without the setting
    still = copy.deepcopy(shrunk)
    still._shrink_perturb(1, 0.5)  # what a warm update starts from (then it grows to the block's ids)
    for k, v in still.model.state_dict().items():
        assert torch.allclose(v, 0.5 * before[k]), k
    noisy_a, noisy_b = copy.deepcopy(plain), copy.deepcopy(plain)
    for one in (noisy_a, noisy_b):
        one.spec = one.spec.model_copy(update={"train": one.spec.train.model_copy(
            update={"shrink_block": 1.0, "perturb_block": 0.1})})
        one._shrink_perturb(1, 1.0)
    w = "encoder.0.weight" if "encoder.0.weight" in before else max(before, key=lambda k: before[k].numel())
    diff = noisy_a.model.state_dict()[w] - before[w]
    assert float(diff.std()) == pytest.approx(0.1 * float(before[w].std()), rel=0.2)
    assert torch.equal(noisy_a.model.state_dict()[w], noisy_b.model.state_dict()[w])  # seeded
    log = shrunk.update(seen1, 1)  # a warm update with the setting trains and moves on from there
    assert log["epochs"] >= 1
    retrained = learner(shrink_block=0.5)
    reference = learner()
    retrained.update(seen1, 1, strategy="retrain"), reference.update(seen1, 1, strategy="retrain")
    for a, b in zip(retrained.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b)  # a retrain is a new model: nothing to shrink


def test_grid_block_chooses_the_shrink_of_each_warm_start_on_validation(tmp_path, monkeypatch):
    """train.grid_block.shrink_block: every warm update fits once per shrink from the same (grown) start, the
    rows the model had shrunk and perturbed, and keeps the better validation NDCG@20 — the same weights as
    that shrink alone; the new rows are not shrunk."""
    import copy

    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    spec = job.teachers[0].model_copy(update={"backbone": "multvae", "dim": 8, "hidden": 16})
    train = spec.train.model_copy(update={"grid_block": {"shrink_block": (1.0, 0.3)}, "perturb_block": 0.01})
    learner = Learner(spec.model_copy(update={"train": train}), job.seed, role="teacher")
    learner.update(seen0, 0)
    start = copy.deepcopy(learner)
    log = learner.update(seen1, 1)
    assert [g["shrink_block"] for g in log["grid"]] == [1.0, 0.3]
    assert log["grid"][0]["valid_ndcg@20"] != log["grid"][1]["valid_ndcg@20"]  # two different fits
    best = max(log["grid"], key=lambda g: g["valid_ndcg@20"])
    assert log["chosen_block"] == {"shrink_block": best["shrink_block"]}
    alone = start
    alone.spec = alone.spec.model_copy(update={"train": alone.spec.train.model_copy(
        update={"grid_block": {"shrink_block": (best["shrink_block"],)}})})
    alone.update(seen1, 1)
    for (k, a), b in zip(learner.model.state_dict().items(), alone.model.state_dict().values()):
        assert torch.equal(a, b), k
    # the start of a fit: the rows it had shrunk, the rows grown for the block (here: the last 10 items) as they were
    grown = copy.deepcopy(start)
    grown.grow(seen1, 1)
    had = grown.model.num_items - 10
    fresh = {k: v.clone() for k, v in grown.model.state_dict().items()}
    from continual_kd.models.base import rows_before

    grown.spec = grown.spec.model_copy(update={"train": grown.spec.train.model_copy(update={"perturb_block": 0.0})})
    grown._shrink_perturb(1, 0.3, rows_before(grown.model, grown.model.num_users, had))
    after = grown.model.state_dict()
    assert torch.allclose(after["item_out"][:had], 0.3 * fresh["item_out"][:had])
    assert torch.equal(after["item_out"][had:], fresh["item_out"][had:])
    with pytest.raises(Exception, match="shrink above 1"):
        spec.train.model_validate({**spec.train.model_dump(), "grid_block": {"shrink_block": [1.5]}})


@pytest.mark.parametrize("backbone", ["multvae", "lightgcn"])
def test_grid_block_probe_races_the_warm_starts_and_the_winner_is_its_own_run(tmp_path, monkeypatch, backbone):
    """train.grid_block_probe: every shrink trains `probe` epochs on its own copy of the model; the one with the
    best validation so far goes on to its end and its weights are those of that shrink alone; the others stop
    after the probe (their epochs in the log), and the full grid would have trained more."""
    import copy

    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    spec = job.teachers[0].model_copy(update={"backbone": backbone, "dim": 8, "hidden": 16})
    train = spec.train.model_copy(update={"grid_block": {"shrink_block": (1.0, 0.3)}, "perturb_block": 0.01,
                                          "grid_block_probe": 2, "epochs_block": 6, "patience_block": 0})
    learner = Learner(spec.model_copy(update={"train": train}), job.seed, role="teacher")
    learner.update(seen0, 0)
    start = copy.deepcopy(learner)
    full = copy.deepcopy(learner)
    log = learner.update(seen1, 1)
    assert [g["shrink_block"] for g in log["grid"]] == [1.0, 0.3]
    winner = log["chosen_block"]["shrink_block"]
    assert log["epochs"] == 6
    # each alone, for six epochs: the winner's run is the race's model; the probe's figures are the runs' first two
    alone = {}
    for shrink in (1.0, 0.3):
        other = copy.deepcopy(start)
        other.spec = other.spec.model_copy(update={"train": other.spec.train.model_copy(
            update={"grid_block": {"shrink_block": (shrink,)}})})
        alone[shrink] = other.update(seen1, 1)
        if shrink == winner:
            for (k, a), b in zip(learner.model.state_dict().items(), other.model.state_dict().values()):
                assert torch.equal(a, b), k
    loser = next(g for g in log["grid"] if g["shrink_block"] != winner)
    won = next(g for g in log["grid"] if g["shrink_block"] == winner)
    assert won["valid_ndcg@20"] == alone[winner]["valid_ndcg@20"]
    assert loser["epochs"] == 2 and loser["best_epoch"] <= 2 and won["epochs"] == 6  # stopped after the probe
    # without the probe every shrink runs its six epochs
    full.spec = full.spec.model_copy(update={"train": full.spec.train.model_copy(update={"grid_block_probe": 0})})
    assert [g["epochs"] for g in full.update(seen1, 1)["grid"]] == [6, 6]


def test_batch_size_block_is_the_warm_updates_batch_and_the_base_block_keeps_its_own(tmp_path, monkeypatch):
    """train.batch_size_block: the base block trains with batch_size, every warm update with batch_size_block —
    the same weights as a model whose batch_size is changed to it after the base block."""
    import copy

    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    spec = job.teachers[0].model_copy(update={"backbone": "lightgcn", "dim": 8})
    small = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": 64})})
    split = Learner(small.model_copy(update={"train": small.train.model_copy(update={"batch_size_block": 256})}),
                    job.seed, role="teacher")
    plain = Learner(small, job.seed, role="teacher")
    split.update(seen0, 0)
    plain.update(seen0, 0)
    for a, b in zip(split.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)  # the base block: batch_size
    same, other = copy.deepcopy(plain), plain
    same.spec = same.spec.model_copy(update={"train": same.spec.train.model_copy(update={"batch_size": 256})})
    split.update(seen1, 1)
    same.update(seen1, 1)
    other.update(seen1, 1)
    for (k, a), b, c in zip(split.model.state_dict().items(), same.model.state_dict().values(),
                            other.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, c) for a, c in zip(split.model.state_dict().values(),
                                                      other.model.state_dict().values()))


def test_choose_keep_takes_the_largest_weight_within_the_tolerance():
    from continual_kd.continual.learner import KEEP_WEIGHT, choose_keep, with_keep_weight
    from continual_kd.config import BDTermSpec, KeepTermSpec

    fits = [({KEEP_WEIGHT: 0.0}, {"valid": 0.200}), ({KEEP_WEIGHT: 0.001}, {"valid": 0.201}),
            ({KEEP_WEIGHT: 0.003}, {"valid": 0.198}), ({KEEP_WEIGHT: 0.01}, {"valid": 0.180})]
    assert choose_keep(fits, 0.0)[0] == {KEEP_WEIGHT: 0.001}        # the best fit alone
    assert choose_keep(fits, 0.02)[0] == {KEEP_WEIGHT: 0.003}       # .198 ≥ .98 × .201
    assert choose_keep(fits, 0.2)[0] == {KEEP_WEIGHT: 0.01}
    assert choose_keep([({KEEP_WEIGHT: 0.0}, {"valid": None}), ({KEEP_WEIGHT: 0.003}, {"valid": None})], 0.01)[0] == {
        KEEP_WEIGHT: 0.003}                                          # nothing to judge by: the largest
    specs = [BDTermSpec(), KeepTermSpec(weight=0.01, weights=(0.0, 0.003))]
    assert [s.name for s in with_keep_weight(specs, 0.0)] == ["bd"]  # weight 0: a fit without the term
    assert with_keep_weight(specs, 0.003)[1].weight == 0.003 and with_keep_weight(specs, None)[1].weight == 0.01


def test_keep_weights_are_chosen_on_each_blocks_validation(tmp_path, monkeypatch):
    """keep's `weights`: every warm update fits once per weight from the same start (0: without the term)
    and keeps the choose_keep fit — the same weights as an update with that weight alone; the base block
    has nothing to keep and fits once."""
    import copy

    from continual_kd.config import KeepTermSpec
    from continual_kd.continual.learner import KEEP_WEIGHT, choose_keep

    job, store, plan = _job(tmp_path, monkeypatch)
    seen0, seen1 = store.read_blocks(plan.plan_id, 0), store.read_blocks(plan.plan_id, 1)
    learner = Learner(job.teachers[0], job.seed, role="teacher")
    terms = [KeepTermSpec(weight=0.5, weights=(0.0, 0.05, 5.0), tolerance=0.05)]
    assert learner.update(seen0, 0, terms=terms)["grid"] == []
    start = copy.deepcopy(learner)
    log = learner.update(seen1, 1, terms=terms)
    assert [g[KEEP_WEIGHT] for g in log["grid"]] == [0.0, 0.05, 5.0]
    assert len({g["valid_ndcg@20"] for g in log["grid"]}) > 1  # the term changed what was learned
    fits = [({KEEP_WEIGHT: g[KEEP_WEIGHT]}, {"valid": g["valid_ndcg@20"]}) for g in log["grid"]]
    chosen = choose_keep(fits, 0.05)[0][KEEP_WEIGHT]
    assert log["chosen_block"] == {KEEP_WEIGHT: chosen}
    assert log["terms"] == ([] if chosen == 0 else ["keep"])
    alone = start.update(seen1, 1, terms=[] if chosen == 0 else [KeepTermSpec(weight=chosen)])
    assert alone["valid_ndcg@20"] == pytest.approx(log["valid_ndcg@20"], abs=1e-9)
    for (k, a), b in zip(learner.model.state_dict().items(), start.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("lazy", [False, True])
def test_slow_rows_scale_the_step_of_the_given_rows_only(lazy):
    from continual_kd.continual.optim import LazyAdam, SlowRows

    torch.manual_seed(0)
    start = torch.randn(6, 3)
    grads = [torch.randn(6, 3) for _ in range(4)]

    def run(ratio):
        table = torch.nn.Parameter(start.clone())
        opt = LazyAdam([table], lr=0.1) if lazy else torch.optim.Adam([table], lr=0.1)
        stepper = SlowRows(opt, {table: 4}, ratio)
        for g in grads:
            table.grad = g.to_sparse(1) if lazy else g.clone()
            stepper.step()
        return table.detach()

    full, slow = run(1.0), run(0.25)
    assert torch.allclose(slow[4:], full[4:])  # rows past n: the optimizer's own step
    one = run(0.25)  # the first step of slowed rows is a quarter of the full first step
    first_full = torch.nn.Parameter(start.clone())
    opt = LazyAdam([first_full], lr=0.1) if lazy else torch.optim.Adam([first_full], lr=0.1)
    first_full.grad = grads[0].to_sparse(1) if lazy else grads[0].clone()
    opt.step()
    first_slow = torch.nn.Parameter(start.clone())
    opt = LazyAdam([first_slow], lr=0.1) if lazy else torch.optim.Adam([first_slow], lr=0.1)
    stepper = SlowRows(opt, {first_slow: 4}, 0.25)
    first_slow.grad = grads[0].to_sparse(1) if lazy else grads[0].clone()
    stepper.step()
    assert torch.allclose(first_slow[:4] - start[:4], 0.25 * (first_full[:4] - start[:4]), atol=1e-6)
    assert torch.allclose(first_slow[4:], first_full[4:])
    assert not torch.allclose(slow[:4], full[:4]) and torch.equal(one, slow)


def test_min_batches_shrinks_the_batch_of_a_small_epoch_only():
    from continual_kd.config import TrainSpec
    from continual_kd.continual.training import epoch_batch_size, train_epochs
    from continual_kd.models.mf import BPRMF

    assert epoch_batch_size(TrainSpec(batch_size=1024), 300) == 1024  # off by default
    assert epoch_batch_size(TrainSpec(batch_size=1024, min_batches=8), 300) == 38  # ceil(300 / 8)
    assert epoch_batch_size(TrainSpec(batch_size=1024, min_batches=8), 40_000) == 1024  # a big epoch keeps it
    assert epoch_batch_size(TrainSpec(batch_size=1024, min_batches=8), 5) == 1
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, 50, 300), rng.integers(0, 80, 300)
    known = UserItemSet(u, i, 50, 80)
    for min_batches, sizes in ((0, [300]), (8, [38] * 7 + [34])):
        model = BPRMF(50, 80, 8)
        seen, loss = [], model.base_loss
        model.base_loss = lambda users, pos, neg, **kw: (seen.append(len(users)), loss(users, pos, neg, **kw))[1]
        spec = TrainSpec(batch_size=1024, min_batches=min_batches)
        train_epochs(model, torch.as_tensor(u), torch.as_tensor(i), known, 2, spec, torch.Generator().manual_seed(0))
        assert seen == sizes * 2  # every epoch: that many steps, every row once


def test_teacher_weights_chosen_on_validation_add_up_over_blocks_and_survive_a_restore(tmp_path, monkeypatch):
    import math
    import types

    from continual_kd.distill.fusion import WEIGHT_POWERS, choose_power, sharpened_weights

    teachers = [{"name": "a", "backbone": "mf", "dim": 16, "train": {"epochs_base": 12, "epochs_block": 4, "batch_size": 256}},
                {"name": "b", "backbone": "mf", "dim": 2, "train": {"epochs_base": 1, "epochs_block": 1, "batch_size": 256}}]
    job, store, plan = _job(tmp_path, monkeypatch, {"teachers": teachers, "distill": {"teacher_weights": "chosen"}})
    learners = make_learners(job)
    results = run_stream_local(job, lambda k: store.read_blocks(plan.plan_id, k), plan.num_blocks, learners=learners)
    student = learners["student"]
    ev = dict(student.fusion_evidence)
    seen = store.read_blocks(plan.plan_id, plan.num_blocks - 1)
    # counted: each block's users with teacher lists (training pairs in the block) and validation pairs there
    assert ev["users:a"] == ev["users:b"] == sum(len(set(seen.users[(seen.block == b) & (seen.split == VALID)].tolist())
                                                     & set(seen.users[(seen.block == b) & (seen.split == TRAIN)].tolist()))
                                                 for b in range(plan.num_blocks)) > 0
    ndcgs = [ev["teacher:a"] / ev["users:a"], ev["teacher:b"] / ev["users:b"]]  # kept under each teacher's name
    for r in results:
        log = r.updates["student"]
        assert log["weight_power"] in WEIGHT_POWERS and sum(log["teacher_weights"]) == pytest.approx(1.0)
    last = results[-1].updates["student"]
    # the last block's weights: the power with the most evidence so far, on every block's teacher NDCG so far
    assert last["weight_power"] == choose_power({p: ev[f"power{p}"] for p in WEIGHT_POWERS})
    assert last["teacher_weights"] == pytest.approx(sharpened_weights(ndcgs, last["weight_power"]))
    assert ndcgs[0] > ndcgs[1]  # one epoch of a 2-dim MF is the weaker teacher on validation
    if not math.isinf(last["weight_power"]) and last["weight_power"] > 0:
        assert last["teacher_weights"][0] > last["teacher_weights"][1]
    restored = Learner(job.student, job.seed, role="student")
    restored.load(student.state())
    assert restored.fusion_evidence == pytest.approx(ev)
    # evidence saved by position (before it was kept by name) is taken over by the teachers in their order
    old = {k: v for k, v in ev.items() if not k.startswith(("teacher:", "users:"))}
    old.update({"teacher0": ev["teacher:a"], "teacher1": ev["teacher:b"], "users": ev["users:a"]})
    restored.fusion_evidence = old
    restored._named_evidence([types.SimpleNamespace(source="a"), types.SimpleNamespace(source="b")])
    assert restored.fusion_evidence == pytest.approx(ev)


def test_rank_penalty_is_chosen_on_validation_ranks_everything_after_and_survives_a_restore(tmp_path, monkeypatch):
    """rank_penalty: the largest β whose validation NDCG@20 stays within the tolerance of β = 0's; the model then
    ranks by score − β·log(1 + count) (evaluation, knowledge), never while it trains, and a restored learner
    ranks the same way."""
    from continual_kd.eval import top_k_items

    job, store, plan = _job(tmp_path, monkeypatch)
    spec = job.teachers[0].model_copy(update={"rank_penalty": (0.01, 0.03, 0.1, 50.0), "rank_penalty_tolerance": 0.05})
    seen = store.read_blocks(plan.plan_id, 0)
    learner = Learner(spec, job.seed, role="teacher")
    log = learner.update(seen, 0)
    figures = {g["beta"]: g["valid_ndcg@20"] for g in log["rank_penalty_grid"]}
    assert set(figures) == {0.0, 0.01, 0.03, 0.1, 50.0}
    assert figures[50.0] < 0.95 * figures[0.0]  # a huge penalty ranks by unpopularity: out of the tolerance
    beta = max(b for b, v in figures.items() if v >= 0.95 * figures[0.0])
    assert beta > 0  # a small penalty costs less than the tolerance here
    assert log["rank_penalty"] == learner.penalty_beta == beta
    # the model ranks with the penalty: the validation figure is the chosen β's
    assert learner.validate(seen, 0, job.eval)["ndcg@20"] == pytest.approx(figures[beta], abs=1e-6)
    popularity = learner.pairs.popularity(seen)
    users = torch.arange(5)
    raw = learner.model.__class__.full_scores(learner.model, users)
    assert torch.allclose(learner.model.full_scores(users), raw - beta * torch.log1p(popularity), atol=1e-6)
    # saved with the weights, installed again on load: the same lists
    restored = Learner(spec, job.seed, role="teacher")
    restored.load(learner.state())
    assert restored.penalty_beta == beta
    known = learner.pairs.known(seen, 0)
    assert torch.equal(top_k_items(restored.model, users, 10, known)[0], top_k_items(learner.model, users, 10, known)[0])
    # a later update trains and validates on the model's own scores: the penalty is off until it is chosen again
    seen1 = store.read_blocks(plan.plan_id, 1)
    seen_during = []
    original = learner.model.__class__.base_loss

    def spy(model, *args, **kwargs):
        seen_during.append("full_scores" in model.__dict__)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(learner.model.__class__, "base_loss", spy)
    learner.update(seen1, 1)
    assert seen_during and not any(seen_during)


def test_hard_negatives_take_the_highest_scored_candidate_and_avoid_known_pairs(monkeypatch):
    """train.hard_negatives (dynamic negative sampling): each positive's negative is the candidate the model
    scores highest at that batch, the candidates drawn as train.negatives says (known pairs avoided)."""
    from continual_kd.config import TrainSpec
    from continual_kd.continual.training import hardest, train_epochs
    from continual_kd.models.mf import BPRMF

    model = BPRMF(3, 6, dim=2)
    with torch.no_grad():  # user u prefers items by a fixed order: item scores 0..5 along the first axis
        model.user_emb.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]))
        model.item_emb.copy_(torch.tensor([[float(i), 0.0] for i in range(6)]))
    users = torch.tensor([0, 1, 2])
    candidates = torch.tensor([[0, 3, 1], [0, 3, 1], [5, 4, 2]])
    assert hardest(model, users, candidates).tolist() == [3, 0, 5]
    # in training: with more candidates the drawn negatives are the harder ones, and never known pairs
    known = UserItemSet(np.array([0, 0]), np.array([5, 4]), 3, 6)  # user 0 knows its two best-scored items
    seen = []
    original = BPRMF.base_loss

    def spy(self, u, pos, neg, **kw):
        seen.append(neg.clone())
        return original(self, u, pos, neg, **kw)

    monkeypatch.setattr(BPRMF, "base_loss", spy)
    means = {}
    for m in (1, 4):
        seen.clear()
        model_m = BPRMF(3, 6, dim=2)
        model_m.load_state_dict(model.state_dict())
        spec = TrainSpec(lr=1e-9, batch_size=4096, weight_decay=0.0, hard_negatives=m)
        pos = torch.zeros(2000, dtype=torch.int64)  # user 0, item 0, 2000 times
        train_epochs(model_m, pos.clone(), pos, known, 1, spec, torch.Generator().manual_seed(0))
        neg = torch.cat(seen)
        assert len(neg) == 2000 and not bool(((neg == 5) | (neg == 4)).any())
        means[m] = float(neg.float().mean())
    # items 0-3 are drawn: one uniform draw averages 1.5, the best-scored (highest id) of four 2.62
    assert means[1] == pytest.approx(1.5, abs=0.1) and means[4] == pytest.approx(2.62, abs=0.05)


def test_grid_of_hard_negatives_takes_whole_counts():
    from continual_kd.config import TrainSpec
    from continual_kd.errors import CkdError

    assert TrainSpec(grid={"hard_negatives": [1, 4]}).grid["hard_negatives"] == (1, 4)
    with pytest.raises((CkdError, ValueError), match="whole number"):
        TrainSpec(grid={"hard_negatives": [1.5]})
    with pytest.raises((CkdError, ValueError), match="hard_negatives"):
        TrainSpec(hard_negatives=0)


def test_softmax_loss_is_the_positives_log_softmax_against_its_negatives():
    """train.softmax_negatives: −log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ e^{s⁻/τ})) summed over the batch, by hand."""
    from continual_kd.continual.training import softmax_loss
    from continual_kd.models.mf import BPRMF

    model = BPRMF(2, 5, dim=2)
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model.item_emb.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.5, 0.5]]))
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([[1, 3], [4, 3]])
    for tau in (1.0, 0.5):
        got = float(softmax_loss(model, users, pos, neg, tau).detach())
        # user 0: s⁺ = 1 (item 0), s⁻ = 2, -1; user 1: s⁺ = 2 (item 2), s⁻ = 1, 1
        want = (-np.log(np.exp(1 / tau) / (np.exp(1 / tau) + np.exp(2 / tau) + np.exp(-1 / tau)))
                - np.log(np.exp(2 / tau) / (np.exp(2 / tau) + 2 * np.exp(1 / tau))))
        assert got == pytest.approx(want, rel=1e-5)


def test_softmax_training_draws_unknown_negatives_and_learns_the_order(monkeypatch):
    """In training every positive meets softmax_negatives negatives, none of them known pairs, and the model
    learns to rank the positives first (a hand-made preference: each user likes one block of items)."""
    from continual_kd.config import TrainSpec
    from continual_kd.continual import training
    from continual_kd.continual.training import train_epochs
    from continual_kd.models.mf import BPRMF

    users = torch.arange(40).repeat_interleave(3)  # 40 users × 3 items each: user u likes items 3(u % 4) + 0..2
    items = (3 * (users % 4)).view(-1, 3).add(torch.arange(3)).reshape(-1)
    known = UserItemSet(users.numpy(), items.numpy(), 40, 12)
    seen = []
    original = training.softmax_loss

    def spy(model, u, pos, neg, tau):
        seen.append((u.clone(), neg.clone()))
        return original(model, u, pos, neg, tau)

    monkeypatch.setattr(training, "softmax_loss", spy)
    torch.manual_seed(0)
    model = BPRMF(40, 12, dim=4)
    spec = TrainSpec(lr=0.05, batch_size=32, weight_decay=0.0, softmax_negatives=5)
    train_epochs(model, users, items, known, 30, spec, torch.Generator().manual_seed(0))
    u = torch.cat([s[0] for s in seen])
    neg = torch.cat([s[1] for s in seen])
    assert neg.shape == (30 * 120, 5)
    assert not bool(known.contains(u.unsqueeze(1).expand_as(neg).reshape(-1), neg.reshape(-1)).any())
    top = model.full_scores(torch.arange(40)).topk(3, dim=1).indices.sort(1).values
    assert torch.equal(top, items.view(40, 3))


def test_softmax_negatives_are_refused_where_they_cannot_apply():
    from continual_kd.config import ModelSpec, TrainSpec
    from continual_kd.errors import CkdError

    assert TrainSpec(grid={"softmax_negatives": [0, 64]}).grid["softmax_negatives"] == (0, 64)
    with pytest.raises((CkdError, ValueError), match="whole number"):
        TrainSpec(grid={"softmax_negatives": [0.5]})
    with pytest.raises((CkdError, ValueError), match="hard negatives"):
        TrainSpec(softmax_negatives=8, hard_negatives=4)
    with pytest.raises((CkdError, ValueError), match="hard negatives"):
        TrainSpec(grid={"softmax_negatives": [0, 8], "hard_negatives": [1, 4]})
    with pytest.raises((CkdError, ValueError), match="de-biased"):
        TrainSpec(softmax_negatives=8, debias="ips")
    with pytest.raises((CkdError, ValueError), match="MultVAE"):
        ModelSpec(backbone="multvae", train={"softmax_negatives": 8})
    with pytest.raises((CkdError, ValueError), match="temperature without"):
        TrainSpec(softmax_temperature=0.5)
    assert TrainSpec(softmax_temperature=0.5, grid={"softmax_negatives": [0, 8]}).softmax_temperature == 0.5


def test_an_update_whose_training_diverges_stops_with_one_error_and_keeps_nothing(tmp_path, monkeypatch):
    # a rate no model survives: scores overflow float32 in the first epoch, the losses stop being finite
    job, store, plan = _job(tmp_path, monkeypatch)
    spec = job.teachers[0]
    seen = store.read_blocks(plan.plan_id, 0)
    wild = Learner(spec.model_copy(update={"train": spec.train.model_copy(update={"lr": 1e30})}), job.seed,
                   role="teacher")
    with pytest.raises(CkdError, match=r"teacher 'mf', block 0: training diverged at epoch 1: .*not finite"):
        wild.update(seen, 0)
    # the same settings at a sane rate train to the end, and every epoch is checked the same way
    log = Learner(spec, job.seed, role="teacher").update(seen, 0)
    assert log["epochs"] >= 1 and np.isfinite(log["base_loss"])


def test_check_finite_names_the_loss_or_the_weights_that_broke():
    from continual_kd.continual.training import EpochLog, TrainingDiverged, check_finite

    model = _Fixed(np.zeros((2, 3)))
    check_finite(model, EpochLog(0, 0.5, 0.1))  # all finite: nothing raised
    with pytest.raises(TrainingDiverged, match="epoch 3: KD loss not finite"):
        check_finite(model, EpochLog(2, 0.5, float("nan")))
    with torch.no_grad():
        model.table[1, 2] = float("inf")
    with pytest.raises(TrainingDiverged, match="epoch 1: weights table not finite"):
        check_finite(model, EpochLog(0, 0.5, 0.1))
