"""Issue 12: state kept between blocks equals state rebuilt from scratch; chunked, sampled evaluation."""

import numpy as np
import pytest
import torch

from continual_kd.continual.learner import Learner, item_counts
from continual_kd.continual.pairs import PairState
from continual_kd.config import parse_job
from continual_kd.eval.metrics import evaluate_ranking, top_k_items, users_per_chunk
from continual_kd.eval.protocol import eval_sets, model_pairs, training_popularity
from continual_kd.models.lightgcn import LightGCN, normalized_adjacency, pairs_adjacency
from continual_kd.models.multvae import MultVAE
from continual_kd.sparse import UserItemSet
from continual_kd.types import TEST, TRAIN, VALID, Interactions


def stream(blocks: int = 4, rows: int = 400, seed: int = 0) -> list[Interactions]:
    """seen_k (blocks 0..k) for k = 0..blocks-1: new users and items in every block, duplicates included."""
    rng = np.random.default_rng(seed)
    parts, out = [], []
    for b in range(blocks):
        nu, ni = 30 + 10 * b, 20 + 8 * b
        n = rows
        users, items = rng.integers(0, nu, n), rng.integers(0, ni, n)
        split = rng.choice([TRAIN, VALID, TEST], n, p=[0.8, 0.1, 0.1]).astype(np.int8)
        parts.append(Interactions(users, items, np.arange(n) + 1000 * b, np.ones(n, np.float32),
                                  np.full(n, b, np.int16), split, nu, ni))
        out.append(Interactions.concat(parts))  # a new object each block, as the store / an actor reads it
    return out


def same(a: UserItemSet, b: UserItemSet) -> bool:
    return a.same_as(b) and torch.equal(a.degree, b.degree) and torch.equal(a.users, b.users)


def test_added_merges_like_one_build():
    s = UserItemSet([2, 0], [1, 3], num_users=3, num_items=4)
    t = s.added([0, 4, 2, 0], [0, 5, 1, 3], num_users=5, num_items=6)  # (2,1), (0,3) already there
    assert t.keys.tolist() == [0 * 6 + 0, 0 * 6 + 3, 2 * 6 + 1, 4 * 6 + 5]
    assert t.indptr.tolist() == [0, 2, 2, 3, 3, 4] and t.degree.tolist() == [2, 0, 1, 0, 1]
    assert same(t, UserItemSet([2, 0, 0, 4], [1, 3, 0, 5], 5, 6))
    assert t.without(UserItemSet([0, 4], [3, 5], 5, 6)).keys.tolist() == [0, 13]


def test_pair_state_equals_rebuild_after_several_blocks():
    state = PairState()
    for k, seen in enumerate(stream()):
        for block in ([k - 1, k] if k else [k]):  # CCD's order asks for block k-1's pairs too
            known = state.known(seen, block, by_item=True)
            assert same(known, model_pairs(seen, block))
            assert same(known.by_item, model_pairs(seen, block).transposed())
        assert torch.equal(state.item_counts(seen, k), item_counts(seen))
        assert torch.equal(state.popularity(seen), training_popularity(seen))
        for b in [*range(k + 1), None]:
            for split in (TEST, VALID):
                for mask in ("standard", "train", "all_seen"):
                    rel, hid = state.eval_sets(seen, b, split, mask, exact=True)
                    want_rel, want_hid = eval_sets(seen, b, split, mask=mask)
                    assert same(rel, want_rel) and same(hid, want_hid)
    assert state.rebuilds == 1  # built once at block 0, then only the blocks' rows were added
    assert state.known_block == 3


def test_pair_state_rebuilds_when_seen_is_not_an_extension():
    a, b = stream(2, seed=0), stream(2, seed=1)
    state = PairState()
    state.known(a[1], 1)
    known = state.known(b[1], 1)  # other data (e.g. a restore onto another plan): rebuilt, still right
    assert same(known, model_pairs(b[1], 1)) and state.rebuilds == 2


def test_graph_and_rows_from_the_kept_set_equal_a_full_rebuild():
    seen = stream()[-1]
    known = PairState().known(stream()[0], 0)  # a state carried from block 0 …
    state = PairState()
    for s in stream():
        known = state.known(s, None, by_item=True)  # … to block 3
    full = model_pairs(seen)
    fast = pairs_adjacency(known, seen.num_users, seen.num_items)
    slow = normalized_adjacency(full.users, full.items, seen.num_users, seen.num_items)
    assert torch.equal(fast.crow_indices(), slow.crow_indices())
    assert torch.equal(fast.col_indices(), slow.col_indices())
    assert torch.allclose(fast.values(), slow.values(), rtol=0, atol=0)

    torch.manual_seed(0)
    g1 = LightGCN(seen.num_users, seen.num_items, dim=4)
    g2 = LightGCN(seen.num_users, seen.num_items, dim=4)
    g2.load_state_dict(g1.state_dict())
    g1.observe(full.users, full.items)
    g2.observe(known.users, known.items, pairs=known)
    users = torch.arange(seen.num_users)
    assert torch.equal(g1.full_scores(users), g2.full_scores(users))

    torch.manual_seed(0)
    v1 = MultVAE(seen.num_users, seen.num_items, dim=4, hidden=6)
    v2 = MultVAE(seen.num_users, seen.num_items, dim=4, hidden=6)
    v2.load_state_dict(v1.state_dict())
    v2._noise_seed = v1._noise_seed
    v1.observe(full.users, full.items)
    v2.observe(known.users, known.items, pairs=known)
    assert torch.equal(v1._indptr, v2._indptr) and torch.equal(v1._cols, v2._cols)
    assert v1._seed_now == v2._seed_now


class Table:
    """Scores from a fixed (U, I) table."""

    def __init__(self, scores):
        self.scores = torch.as_tensor(scores, dtype=torch.float32)
        self.num_users, self.num_items = self.scores.shape

    def full_scores(self, users):
        return self.scores[users].clone()


def test_sampled_evaluation_equals_full_when_the_sample_is_every_user():
    gen = torch.Generator().manual_seed(0)
    model = Table(torch.rand(40, 30, generator=gen))
    seen = stream(1)[0]
    relevant, exclude = eval_sets(seen, 0, TEST)
    full = evaluate_ranking(model, relevant, exclude, (5, 10), chunk_size=7)
    n = int((relevant.degree > 0).sum())
    for size in (n, n + 100):
        sampled = evaluate_ranking(model, relevant, exclude, (5, 10), chunk_size=7, sample=size, seed=3)
        assert sampled.pop("users_of") == n
        assert sampled == full
    # a smaller sample: the figures of exactly those users (as if only they had test items), seeded
    part = evaluate_ranking(model, relevant, exclude, (5, 10), sample=5, seed=3)
    assert part["users"] == 5 and part["users_of"] == n
    assert part == evaluate_ranking(model, relevant, exclude, (5, 10), sample=5, seed=3)
    chosen = torch.nonzero(relevant.degree > 0).flatten()
    chosen = chosen[torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(3))[:5]).values]
    keep = torch.isin(relevant.users, chosen)
    only = UserItemSet(relevant.users[keep], relevant.items[keep], relevant.num_users, relevant.num_items)
    want = evaluate_ranking(model, only, exclude, (5, 10))
    assert {k: v for k, v in part.items() if k != "users_of"} == want


def test_mask_holding_the_targets_keeps_them_ranked():
    # user 0: scores 0.9 0.8 0.7 0.1; trained item 0 and item 1, item 1 is also its test target
    model = Table([[0.9, 0.8, 0.7, 0.1]])
    relevant = UserItemSet([0], [1], 1, 4)
    hidden = UserItemSet([0, 0], [0, 1], 1, 4)
    got = evaluate_ranking(model, relevant, hidden, (1,), keep_relevant=True)
    assert got["recall@1"] == 1.0  # item 0 masked, item 1 (the target) first
    assert got == evaluate_ranking(model, relevant, hidden.without(relevant), (1,))
    assert evaluate_ranking(model, relevant, hidden, (1,))["recall@1"] == 0.0  # the old rule: caller removes targets


def test_chunks_are_sized_to_the_memory_budget():
    assert users_per_chunk(20_000) == 1118  # 256 MB / (3 × 4 bytes × 20k items)
    assert users_per_chunk(100_000, memory_mb=64) == 55
    assert users_per_chunk(100_000, chunk_size=9) == 9
    model = Table(torch.rand(50, 8, generator=torch.Generator().manual_seed(1)))
    known = UserItemSet([0, 0, 3], [1, 2, 7], 50, 8)
    users = torch.arange(50)
    one = top_k_items(model, users, 3, known, chunk_size=50)
    many = top_k_items(model, users, 3, known, chunk_size=4)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert not ({1, 2} & set(one[0][0].tolist()))
    only = top_k_items(model, torch.tensor([0, 1]), 3, only=known, chunk_size=1)[0]
    assert sorted(only[0, :2].tolist()) == [1, 2] and only[0, 2] == -1 and only[1].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("backbone", ["mf", "lightgcn", "multvae"])
def test_learner_keeps_its_state_and_gives_the_numbers_of_a_fresh_learner(backbone):
    """A Learner carried through blocks (state kept) evaluates exactly as one that rebuilds everything."""
    params = {"mf": {"dim": 4}, "lightgcn": {"dim": 4, "layers": 1}, "multvae": {"dim": 4, "hidden": 8}}[backbone]
    job = parse_job({"name": "t", "source": {"dataset": "synthetic", "store": "unused"},
                     "student": {"name": "student", "backbone": backbone, **params,
                                 "train": {"epochs_base": 1, "epochs_block": 1, "batch_size": 256}},
                     "eval": {"ks": [5]}})
    carried = Learner(job.student, 0)
    seens = stream(3)
    for k, seen in enumerate(seens):
        carried.update(seen, k)
    fresh = Learner(job.student, 0)
    fresh.load(carried.state())  # a restored actor: new model, new (empty) pair state
    assert fresh.pairs.known_block is None
    a = carried.evaluate_block(seens[-1], 2, job.eval)
    b = fresh.evaluate_block(seens[-1], 2, job.eval)
    assert a == b
    assert carried.pairs.rebuilds == 1 and fresh.pairs.rebuilds == 1


def test_submit_table_shows_the_sample_beside_the_figures():
    from rich.console import Console

    from continual_kd.tables import history_tables

    sampled = {"ndcg@20": 0.1, "users": 1000.0, "users_of": 5000.0}
    history = [{"block": 0, "metrics": {"student": sampled}, "seconds": 1.0},
               {"block": 1, "metrics": {"student": {**sampled, "users": 800.0, "users_of": 800.0}}, "seconds": 1.0}]
    tables, _ = history_tables(history, 120)
    console = Console(width=120, record=True)
    for t in tables:
        console.print(t)
    text = console.export_text()
    assert "test users" in text and "1,000/5,000" in text and "800/800" in text
    plain, _ = history_tables([{"block": 0, "metrics": {"student": {"ndcg@20": 0.1, "users": 9.0}}, "seconds": 1.0}], 120)
    console = Console(width=120, record=True)
    console.print(plain[0])
    assert "test users" not in console.export_text()  # every user evaluated: no column


def test_bd_full_mode_past_its_memory_budget_draws_from_the_same_weights_without_users_x_items():
    """BD's full mode for a block too large to rank at once: per refresh, `draws` items per user drawn from
    the exact weights (same hand example as tests/test_distill_bd.py: exp(1), 0, 1, exp(-1)); no (U, I)
    tensor is kept."""
    import math

    from continual_kd.distill.base import Batch, TermContext
    from continual_kd.distill.bd import BDTerm
    from continual_kd.types import Knowledge
    from types import SimpleNamespace

    from continual_kd.models import build_backbone

    own = build_backbone("mf", 1, 4, dim=1)
    with torch.no_grad():
        own.user_emb.copy_(torch.tensor([[1.0]]))
        own.item_emb.copy_(torch.tensor([[4.0], [3.0], [2.0], [1.0]]))
    spec = SimpleNamespace(name="bd", weight=0.5, temperature=5.0, eps_teacher=0.5, eps_student=1e-2, sign="code",
                           refresh=10)
    k = Knowledge("t", 1, np.array([0]), np.array([[3, 2]]), np.array([[4.0, 3.0]], np.float32),
                  user_vectors=np.array([[1.0]], np.float32),
                  item_vectors=np.array([[1.0], [2.0], [3.0], [4.0]], np.float32))
    ctx = TermContext(model=own, knowledge=[k], known=UserItemSet([0], [1], 1, 4), num_users=1, num_items=4,
                      block=1, epochs=1, role="teacher")
    term = BDTerm.__new__(BDTerm)
    term.memory_mb, term.draws = 0, 20_000  # every block is "too large"
    BDTerm.__init__(term, spec, ctx)
    assert term.full and term.bounded and term.other_rank is None
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.sample_weights is None and term.own_rank is None and term.drawn.shape == (1, 20_000)
    freq = torch.bincount(term.drawn[0], minlength=4).double() / 20_000
    w = torch.tensor([math.exp(1), 0.0, 1.0, math.exp(-1)], dtype=torch.float64)
    assert freq[1] == 0  # the known item is never drawn
    assert torch.allclose(freq, w / w.sum(), atol=0.015)
    loss = term.loss(own, Batch(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([2, 2])), 1)
    # by hand: the term's generator (seed 0) picks one of the user's draws per pair; the label is the teacher's
    # σ(<user vector, item vector> / T), the logit the student's own score
    pick = term.drawn[0, torch.randint(20_000, (2,), generator=torch.Generator().manual_seed(0))]
    own_score = own.item_emb.detach()[pick, 0]
    label = torch.sigmoid(torch.tensor([1.0, 2.0, 3.0, 4.0])[pick] / 5.0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(own_score, label, reduction="sum")
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_chunk_budget_follows_the_device():
    """On the CPU the default budget is 256 MB; on a CUDA device an eighth of its free memory, kept between the
    CPU's budget and 4 GB (a GPU left with small chunks waits on kernel launches)."""
    from continual_kd.eval.metrics import cuda_budget_mb, device_of, score_budget_mb
    assert score_budget_mb("cpu") == score_budget_mb(None) == 256
    assert users_per_chunk(20_000, device="cpu") == users_per_chunk(20_000) == 1118
    assert cuda_budget_mb(16 * 2**30) == 2048  # an eighth of 16 GB free
    assert cuda_budget_mb(80 * 2**30) == 4096  # capped
    assert cuda_budget_mb(2**28) == 256  # never below the CPU's budget
    model = torch.nn.Linear(2, 2)
    assert device_of(model) == torch.device("cpu") and device_of(object()) is None
