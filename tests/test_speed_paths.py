"""The faster code paths of issue 11 compute what the plain ones do (values and gradients)."""

from __future__ import annotations

import pytest
import torch

import continual_kd.distill.experts as experts
from continual_kd import sparse
from continual_kd.gather import LARGE_GATHER, gather_rows
from continual_kd.sparse import UserItemSet, sample_excluding


@pytest.mark.parametrize("shape", [(5, 3), (LARGE_GATHER // 4 + 1, 4)])  # index_select / index_put backward
def test_gather_rows_matches_indexing_with_negative_ids(shape):
    gen = torch.Generator().manual_seed(0)
    # float64: the two backward passes sum thousands of rows in different orders (threads)
    table = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-7, 7, shape, generator=gen)
    weight = torch.randn(*shape, 3, generator=gen, dtype=torch.float64)
    (gather_rows(table, ids) * weight).sum().backward()
    got = table.grad.clone()
    table.grad = None
    (table[ids] * weight).sum().backward()
    assert torch.equal(gather_rows(table, ids), table[ids])
    assert torch.allclose(got, table.grad, rtol=1e-9, atol=1e-9)


def test_gather_rows_by_hand():
    table = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    out = gather_rows(table, torch.tensor([[2, -1], [0, 0]]))  # -1 is row 2
    assert out.tolist() == [[[5.0, 6.0], [5.0, 6.0]], [[1.0, 2.0], [1.0, 2.0]]]
    out.sum().backward()
    assert table.grad.tolist() == [[2.0, 2.0], [0.0, 0.0], [2.0, 2.0]]


def _outputs(student, choice, w1, b1, w2, b2):
    order, out = experts._expert_outputs(student, choice, w1, b1, w2, b2)
    loss = (out * torch.linspace(-1, 1, out.shape[1])).pow(2).sum()
    grads = torch.autograd.grad(loss, [student, w1, b1, w2, b2])
    return order, out.detach(), grads


def test_grouped_experts_match_the_loop_over_experts(monkeypatch):
    if experts._grouped_mm is None:
        pytest.skip("torch without grouped_mm: only the loop exists")
    gen = torch.Generator().manual_seed(1)
    e, d_s, h, d_t = 5, 4, 8, 12
    w1, b1 = torch.randn(e, d_s, h, generator=gen), torch.randn(e, h, generator=gen)
    w2, b2 = torch.randn(e, h, d_t, generator=gen), torch.randn(e, d_t, generator=gen)
    params = [p.requires_grad_() for p in (w1, b1, w2, b2)]
    student = torch.randn(40, d_s, generator=gen, requires_grad=True)
    choice = torch.randint(0, e - 1, (40,), generator=gen)  # the last expert gets nobody
    assert experts._aligned(student, w1, w2)
    order, grouped, g_grouped = _outputs(student, choice, *params)
    monkeypatch.setattr(experts, "_grouped_mm", None)
    order_loop, looped, g_loop = _outputs(student, choice, *params)
    assert torch.equal(order, order_loop)
    assert torch.allclose(grouped, looped, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_grouped, g_loop):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # entity 0's output is its expert's MLP, by hand
    k = int(choice[order[0]])
    x = student[order[0]]
    assert torch.allclose(looped[0], torch.relu(x @ w1[k] + b1[k]) @ w2[k] + b2[k], atol=1e-5)


def test_unaligned_experts_fall_back_to_the_loop():
    w1 = torch.zeros(2, 1, 3)  # rows of 1 float: grouped_mm refuses them
    assert not experts._aligned(torch.zeros(4, 1), w1)
    order, out = experts._expert_outputs(torch.ones(3, 1), torch.tensor([1, 0, 1]), w1, torch.ones(2, 3),
                                         torch.ones(2, 3, 2), torch.zeros(2, 2))
    assert order.tolist() == [1, 0, 2] and out.tolist() == [[3.0, 3.0]] * 3  # relu(0 + 1)·3 ones


def test_negatives_avoid_known_pairs_and_the_bit_table_changes_no_draw(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    users, items = torch.randint(0, 30, (400,), generator=gen), torch.randint(0, 20, (400,), generator=gen)
    known = UserItemSet(users, items, 30, 20)
    batch = torch.randint(0, 30, (500,), generator=gen)
    fast = sample_excluding(batch, 3, 20, [known], torch.Generator().manual_seed(4))
    monkeypatch.setattr(sparse, "DENSE_TABLE_PAIRS", 0)  # binary search of the keys instead
    slow = sample_excluding(batch, 3, 20, [known], torch.Generator().manual_seed(4))
    assert torch.equal(fast, slow)
    room = known.degree[batch] < 20
    hit = known.contains(batch.unsqueeze(1).expand(-1, 3), fast)
    assert not bool(hit[room].any())
    # a user who knows every item keeps its first draws (left as drawn after the rounds)
    full = UserItemSet(torch.zeros(4, dtype=torch.int64), torch.arange(4), 1, 4)
    assert sample_excluding(torch.tensor([0]), 2, 4, [full], torch.Generator().manual_seed(5), rounds=3).shape == (1, 2)
