import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from continual_kd.distill import TERMS
from continual_kd.distill.base import Batch, TermContext, build_terms
from continual_kd.distill.bd import BDTerm, bd_sampling_weights, fuse_scored_lists
from continual_kd.models import build_backbone
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge


def bd_spec(**kw):
    base = dict(name="bd", weight=0.5, temperature=5.0, eps_teacher=1e-4, eps_student=1e-2, sign="code", refresh=10)
    base.update(kw)
    return SimpleNamespace(**base)


def bce(logit: float, label: float) -> float:
    return -(label * math.log(1 / (1 + math.exp(-logit))) + (1 - label) * math.log(1 - 1 / (1 + math.exp(-logit))))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("role, sign, expected", [
    ("teacher", "code", [math.e, 1 / math.e]),  # exp(0.5 · (own - other)) = exp(±1)
    ("student", "code", [math.tanh(1.0), 0.0]),  # tanh(max(0.5 · (own - other), 0))
    ("teacher", "paper", [1 / math.e, math.e]),  # exp(0.5 · (other - own))
    ("student", "paper", [0.0, math.tanh(1.0)]),
])
def test_sampling_weights_by_hand(role, sign, expected):
    own, other = torch.tensor([5.0, 2.0]), torch.tensor([3.0, 4.0])  # own - other = [2, -2]
    w = bd_sampling_weights(own, other, role, 0.5, sign)
    assert w.tolist() == pytest.approx(expected, rel=1e-6)


def test_sampling_weights_refuse_unknown_role_and_sign():
    with pytest.raises(ValueError, match="role"):
        bd_sampling_weights(torch.zeros(1), torch.zeros(1), "critic", 0.1)
    with pytest.raises(ValueError, match="sign"):
        bd_sampling_weights(torch.zeros(1), torch.zeros(1), "student", 0.1, "both")


def one_user_case(role: str, sign: str):
    """1 user, 3 items; scores item0 = 1, item1 = 2, item2 = 5 but (0, 2) is known (masked).
    The other side lists [item0, item1] with scores [3, 1]."""
    model = build_backbone("mf", num_users=1, num_items=3, dim=1)
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor([[1.0]]))
        model.item_emb.copy_(torch.tensor([[1.0], [2.0], [5.0]]))
    known = UserItemSet([0], [2], 1, 3)
    other = Knowledge("other", 1, np.array([0]), np.array([[0, 1]]), np.array([[3.0, 1.0]], np.float32))
    ctx = TermContext(model, [other], known, num_users=1, num_items=3, block=1, epochs=1, role=role)
    term = build_terms([bd_spec(sign=sign)], ctx)[0]
    term.resample(torch.Generator().manual_seed(0), 0)
    return model, term


def test_own_ranks_mask_known_pairs_and_weights_follow_the_role():
    _, term = one_user_case("student", "code")
    assert isinstance(term, BDTerm) and TERMS["bd"] is BDTerm
    # ascending over [1, 2, -inf]: item0 → 1, item1 → 2; the other's ranks (I = 3): position 0 → 2, 1 → 1
    assert term.own_rank.tolist() == [[1, 2]]
    assert term.sample_weights[0].tolist() == pytest.approx([0.0, math.tanh(0.01)])
    _, teacher = one_user_case("teacher", "code")
    assert teacher.sample_weights[0].tolist() == pytest.approx([math.exp(-1e-4), math.exp(1e-4)])


def test_bd_loss_by_hand_with_fixed_sampling():
    batch = Batch(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1, 0]))
    # student, code sign: only item1 (own rank 2 > other rank 1) can be drawn: 2 pairs × BCE(σ(2), σ(1/5))
    model, term = one_user_case("student", "code")
    loss = term.loss(model, batch, 0).detach()
    assert float(loss) == pytest.approx(2 * bce(2.0, sig(1.0 / 5.0)), rel=1e-5)
    assert float(loss) == pytest.approx(2.054520, abs=1e-5)
    # student, paper sign: only item0 (the other ranks it higher): label σ(3/5), score 1
    model, term = one_user_case("student", "paper")
    assert float(term.loss(model, batch, 0).detach()) == pytest.approx(2 * bce(1.0, sig(3.0 / 5.0)), rel=1e-5)
    # the label is detached: the gradient reaches the model's item only through its own score
    loss = term.loss(model, batch, 0)
    loss.backward()
    assert float(model.item_emb.grad[0, 0]) == pytest.approx(2 * (sig(1.0) - sig(0.6)) * 1.0, rel=1e-5)
    assert float(model.item_emb.grad[1, 0]) == 0.0 and float(model.item_emb.grad[2, 0]) == 0.0


def test_users_without_lists_or_weight_are_skipped():
    model, term = one_user_case("student", "code")
    with torch.no_grad():
        model.item_emb.copy_(torch.tensor([[2.0], [1.0], [5.0]]))  # now agrees with the other: all weights 0
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.sample_weights.sum() == 0
    assert float(term.loss(model, Batch(torch.tensor([0]), torch.tensor([0]), torch.tensor([1])), 0)) == 0.0


def test_fused_lists_take_the_weighted_mean_of_the_scores_that_exist():
    a_items, a_scores = torch.tensor([[0, 1]]), torch.tensor([[4.0, 2.0]])
    b_items, b_scores = torch.tensor([[1, 2]]), torch.tensor([[8.0, 3.0]])
    # rank fusion, weights 3:1: item1 = .75·(1/2)^.05 + .25 = .974, item0 = .75, item2 = .25·(1/2)^.05 = .24
    items, scores = fuse_scored_lists([a_items, b_items], [a_scores, b_scores], 3, "rank", [3.0, 1.0], 5)
    assert items.tolist() == [[1, 0, 2]]
    assert scores[0].tolist() == pytest.approx([(3 * 2.0 + 1 * 8.0) / 4, 4.0, 3.0])
    # distill.fusion_popularity's penalty (item1 .974 - .3 < item0 .75) reorders them; each keeps its own label
    penalty = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0])
    items, scores = fuse_scored_lists([a_items, b_items], [a_scores, b_scores], 3, "rank", [3.0, 1.0], 5, penalty)
    assert items.tolist() == [[0, 1, 2]]
    assert scores[0].tolist() == pytest.approx([4.0, (3 * 2.0 + 1 * 8.0) / 4, 3.0])


def test_refresh_recomputes_own_ranks_every_refresh_epochs():
    model = build_backbone("mf", num_users=4, num_items=12, dim=3)
    scores = np.tile(np.linspace(5, 0, 6, dtype=np.float32), (4, 1))
    other = Knowledge("t", 1, np.arange(4), np.tile(np.arange(6), (4, 1)), scores)
    ctx = TermContext(model, [other], UserItemSet([], [], 4, 12), 4, 12, 1, 4)
    term = build_terms([bd_spec(refresh=2)], ctx)[0]
    g = torch.Generator().manual_seed(0)
    term.resample(g, 0)
    first = term.own_rank
    term.resample(g, 1)
    assert term.own_rank is first
    term.resample(g, 2)
    assert term.own_rank is not first


def concordance(scores: torch.Tensor) -> float:
    """Fraction of pairs (a before b in the list) with score[a] > score[b], over all rows."""
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (U, N, N): [u, a, b] = s_a - s_b
    upper = torch.triu(torch.ones(scores.shape[1], scores.shape[1], dtype=torch.bool), 1)
    return float((diff[:, upper] > 0).float().mean())


@pytest.mark.parametrize("role, sign", [("teacher", "code"), ("student", "paper")])
def test_training_moves_the_ranking_toward_the_other_list(role, sign):
    torch.manual_seed(0)
    nu, ni, n = 12, 40, 8
    model = build_backbone("mf", num_users=nu, num_items=ni, dim=8)
    gen = torch.Generator().manual_seed(1)
    lists = torch.stack([torch.randperm(ni, generator=gen)[:n] for _ in range(nu)])  # (U, N)
    scores = torch.linspace(10.0, -10.0, n).expand(nu, -1)  # labels σ(score/5) all distinct
    other = Knowledge("t", 1, np.arange(nu), lists.numpy(), scores.numpy().astype(np.float32))
    ctx = TermContext(model, [other], UserItemSet([], [], nu, ni), nu, ni, 1, 60, role=role)
    term = build_terms([bd_spec(sign=sign, refresh=5, eps_student=0.5)], ctx)[0]

    def agreement():
        with torch.no_grad():
            return concordance(model.score(torch.arange(nu), lists))

    before = agreement()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    users = torch.arange(nu).repeat_interleave(n)
    batch = Batch(users, lists.reshape(-1), lists.reshape(-1))
    for epoch in range(60):
        term.resample(gen, epoch)
        opt.zero_grad()
        term.loss(model, batch, epoch).backward()
        opt.step()
    after = agreement()
    assert before < 0.7 and after > 0.9, (before, after)


def test_ascending_ranks_count_strictly_lower_entries():
    from continual_kd.distill.bd import ascending_ranks

    s = torch.tensor([[0.5, 2.0, -1.0, float("-inf")], [1.0, 1.0, 3.0, 0.0]])
    assert ascending_ranks(s).tolist() == [[2, 3, 1, 0], [1, 1, 3, 0]]
    # rows with runs of ties and of -inf: each rank is the count of strictly lower entries in its row
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (7, 40), generator=g).float()
    s[s == 0] = float("-inf")
    s[3] = 2.0  # one row all tied
    lower = (s.unsqueeze(1) < s.unsqueeze(2)).sum(2)  # [b, i] = #{j: s[b, j] < s[b, i]}
    assert torch.equal(ascending_ranks(s), lower)


def _mf(num_users, num_items, user_rows, item_rows):
    m = build_backbone("mf", num_users, num_items, dim=len(user_rows[0]))
    with torch.no_grad():
        m.user_emb.copy_(torch.tensor(user_rows, dtype=torch.float32))
        m.item_emb.copy_(torch.tensor(item_rows, dtype=torch.float32))
    return m


def test_full_mode_ranks_every_item_and_labels_from_the_other_vectors():
    """With the other side's user/item vectors every item is a candidate (the reference's BD): weights
    by hand from both full rankings, known pairs never drawn, labels σ(u·v / τ) of the other side."""
    own = _mf(1, 4, [[1.0]], [[4.0], [3.0], [2.0], [1.0]])  # own order 0 > 1 > 2 > 3
    other_u, other_i = np.array([[1.0]], np.float32), np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)  # 3 > 2 > 1 > 0
    k = Knowledge("t", 1, np.array([0]), np.array([[3, 2]]), np.array([[4.0, 3.0]], np.float32),
                  user_vectors=other_u, item_vectors=other_i)
    known = UserItemSet([0], [1], 1, 4)  # item 1 is known: rank 0 (at -inf) on both sides, never drawn
    ctx = TermContext(model=own, knowledge=[k], known=known, num_users=1, num_items=4, block=1, epochs=1,
                      role="teacher")
    term = BDTerm(bd_spec(eps_teacher=0.5), ctx)
    assert term.full
    term.resample(torch.Generator().manual_seed(0), 0)
    # ascending ranks with item 1 at -inf: own scores [4, -inf, 2, 1] → [3, 0, 2, 1];
    # other scores [1, -inf, 3, 4] → [1, 0, 2, 3]; teacher/code weight exp(0.5 · (own - other))
    assert term.own_rank.tolist() == [[3, 0, 2, 1]]
    assert term.other_rank.tolist() == [[1, 0, 2, 3]]
    expected = [math.exp(0.5 * 2), 0.0, 1.0, math.exp(0.5 * -2)]
    assert term.sample_weights[0].tolist() == pytest.approx(expected, rel=1e-6)
    # the loss of one pair equals BCE(own score, σ(other score / τ)) of whichever item was drawn
    draws = set()
    for seed in range(40):
        term._generator = torch.Generator().manual_seed(seed)
        value = float(term.loss(own, Batch(torch.tensor([0]), torch.tensor([0]), torch.tensor([2])), 1).detach())
        item = min(range(4), key=lambda i: abs(bce(float(own.item_emb[i].detach()), sig(float(other_i[i, 0]) / 5.0)) - value))
        assert value == pytest.approx(bce(float(own.item_emb[item].detach()), sig(float(other_i[item, 0]) / 5.0)), rel=1e-5)
        draws.add(item)
    assert 1 not in draws and 0 in draws  # the known item never; the heaviest one surely


@pytest.mark.parametrize("backbone, params", [("mf", {"dim": 8}), ("lightgcn", {"dim": 8, "layers": 2}),
                                              ("multvae", {"dim": 8, "hidden": 16})])
def test_knowledge_vectors_factorise_the_scores(backbone, params):
    """What BD receives as vectors reproduces the model's own scores for every backbone."""
    torch.manual_seed(0)
    model = build_backbone(backbone, 6, 9, **params).eval()
    users, items = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5]), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    model.observe(users, items)
    with torch.no_grad():
        u, v = model.embeddings()
        assert torch.allclose(u @ v.T, model.full_scores(torch.arange(6)), atol=1e-5)


def test_row_categorical_draws_follow_each_rows_weights():
    from continual_kd.distill.bd import RowCategorical

    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 2.0]])
    sampler = RowCategorical(weights)
    gen = torch.Generator().manual_seed(0)
    for row in (0, 2, 3):  # row 1 has no weight: never asked for
        rows = torch.full((40_000,), row)
        picked = sampler.draw(rows, gen)
        freq = torch.bincount(picked, minlength=4).double() / len(rows)
        expected = weights[row].double() / weights[row].sum()
        assert torch.allclose(freq, expected, atol=0.01), (row, freq, expected)
        assert freq[expected == 0].sum() == 0  # a zero-weight entry is never drawn
    mixed = torch.tensor([3, 0, 2, 0, 3])
    assert sampler.draw(mixed, gen)[[0, 4]].tolist() == [3, 3]
    assert set(sampler.draw(mixed, gen)[[1, 3]].tolist()) <= {1, 2}
