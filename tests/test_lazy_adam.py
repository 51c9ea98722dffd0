"""Row-sparse Adam (train.optimizer: lazy_adam): the Adam step on the rows a batch touches, nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual_kd.config import TrainSpec
from continual_kd.continual.optim import LazyAdam
from continual_kd.continual.training import train_epochs
from continual_kd.models.mf import BPRMF
from continual_kd.sparse import UserItemSet


def test_every_row_touched_is_exactly_adam():
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    dense, lazy = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_d, opt_l = torch.optim.Adam([dense], lr=0.01), LazyAdam([lazy], lr=0.01)
    ids = torch.tensor([0, 1, 2, 3, 4, 2])  # every row, row 2 twice (its gradients summed)
    target = torch.randn(6, 3)
    for _ in range(4):
        for p, opt, rows in ((dense, opt_d, lambda p: p[ids]), (lazy, opt_l, lambda p: F.embedding(ids, p, sparse=True))):
            opt.zero_grad()
            ((rows(p) - target) ** 2).sum().backward()
            opt.step()
    assert lazy.grad is None or lazy.grad.is_sparse
    assert torch.allclose(lazy, dense, atol=1e-6)


@pytest.mark.parametrize("rows", [5, 40, 1000])  # ids ≥ rows / 4: the whole table masked; ids × 16 ≥ rows: scratch
# table and mask, touched rows gathered; < rows: sorted ids
def test_tape_rows_step_exactly_like_adam_and_untouched_rows_stay(rows):
    torch.manual_seed(0)
    start = torch.randn(rows, 3)
    dense, lazy = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_d, opt_l = torch.optim.Adam([dense], lr=0.01), LazyAdam([lazy], lr=0.01)
    ids = torch.tensor([[0, 1, 2], [3, 4, 2]])  # row 2 looked up twice in one lookup, row 4 in two lookups
    target = torch.randn(2, 3, 3)
    for step in range(4):
        opt_d.zero_grad()
        ((dense[ids] - target) ** 2).sum().backward()
        opt_d.step()
        # dense Adam moves rows without gradient by their momentum only after they had one: none here
        opt_l.zero_grad()
        out = opt_l.tape.lookup(lazy, ids)
        assert out.shape == (2, 3, 3)
        (((out - target) ** 2).sum() + opt_l.tape.lookup(lazy, torch.tensor([4])).sum() * 0).backward()
        opt_l.step()
        assert not opt_l.tape.entries  # forgotten after each step
    assert lazy.grad is None
    assert torch.allclose(lazy.detach(), dense.detach(), atol=1e-6)
    assert torch.equal(lazy.detach()[5:], start[5:])
    # the scratch table is left all zeros for the next step
    for total, touched in opt_l.tape._scratch.values():
        assert not total.any() and not touched.any()


def test_masked_step_equals_the_gathered_rows_step_with_slow_rows(monkeypatch):
    """A table whose ids cover most of it steps under the touched mask (optim.MASKED_ABOVE): the same weights and
    moments as gathering the touched rows, the untouched rows bit for bit as they were, slow rows included."""
    from continual_kd.continual import optim
    from continual_kd.continual.optim import SlowRows

    torch.manual_seed(0)
    start = torch.randn(50, 4)
    steps = [(torch.randint(0, 50, (30,)), torch.randn(30, 4)) for _ in range(5)]
    out = {}
    for name, above in (("masked", 0.0), ("rows", 1e9)):
        monkeypatch.setattr(optim, "MASKED_ABOVE", above)
        table = torch.nn.Parameter(start.clone())
        opt = LazyAdam([table], lr=0.05)
        stepper = SlowRows(opt, {table: 20}, 0.2)  # rows [0, 20) at a fifth of the rate
        buffers = set()
        for ids, target in steps:
            opt.zero_grad()
            ((opt.tape.lookup(table, ids) - target) ** 2).sum().backward()
            stepper.step()
            buffers |= {b.data_ptr() for b in opt._work.values()}
        out[name] = (table.detach().clone(), opt.state[table]["m"].clone(), opt.state[table]["v"].clone())
        # the masked step's denominator lives in one buffer kept between steps (no table-sized temporary a step)
        assert len(buffers) == (1 if name == "masked" else 0)
    for a, b in zip(out["masked"], out["rows"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    never = torch.ones(50, dtype=torch.bool)
    never[torch.cat([ids for ids, _ in steps])] = False
    assert never.any() and torch.equal(out["masked"][0][never], start[never])


def test_rows_not_touched_do_not_move_and_dense_gradients_take_adam():
    start = torch.randn(6, 2)
    table = torch.nn.Parameter(start.clone())
    extra = torch.nn.Parameter(torch.ones(2))
    opt = LazyAdam([table, extra], lr=0.1)
    ids = torch.tensor([1, 4])
    for _ in range(3):
        opt.zero_grad()
        (F.embedding(ids, table, sparse=True) * extra).sum().backward()
        opt.step()
    moved = (table.detach() != start).any(1)
    assert moved.tolist() == [False, True, False, False, True, False]
    # each Adam step moves a parameter by ~lr against its gradient's sign (here: +1 per element)
    assert torch.allclose(table.detach()[ids], start[ids] - 0.3, atol=0.01)
    assert (extra.detach() != 1).all()
    # a row read both sparsely and densely in one step: the summed (dense) gradient, Adam's step
    opt.zero_grad()
    (F.embedding(ids, table, sparse=True).sum() + table[0].sum()).backward()
    opt.step()
    assert (table.detach()[0] != start[0]).all()
    # the same through the tape: the tape's rows added into the dense gradient
    before = table.detach().clone()
    opt.zero_grad()
    (opt.tape.lookup(table, torch.tensor([2])).sum() * 1e3 + table[0].sum()).backward()
    opt.step()
    moved = (table.detach() != before).any(1)
    assert moved[0] and moved[2] and not moved[3]  # rows 1 and 4 still move by their momentum (dense step)


def _pairs(users=60, items=40, n=600, seed=0):
    g = np.random.default_rng(seed)
    u = g.integers(0, users, n)
    i = (u * 7 + g.integers(0, 5, n)) % items  # each user likes a few neighbouring items: learnable
    return torch.as_tensor(u), torch.as_tensor(i), UserItemSet(u, i, users, items)


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_mf_learns_with_either_optimizer_and_leaves_dense_gradients_after(optimizer):
    u, i, known = _pairs()
    torch.manual_seed(0)
    model = BPRMF(60, 40, 8)
    spec = TrainSpec(optimizer=optimizer, lr=0.05, batch_size=128, weight_decay=1e-4)
    logs = train_epochs(model, u, i, known, 15, spec, torch.Generator().manual_seed(0), [])
    assert logs[-1].base_loss < 0.6 * logs[0].base_loss
    assert model.row_tape is None  # plain lookups again once the update is over
    loss = model.base_loss(u[:4], i[:4], i[4:8])
    loss.backward()
    assert not model.user_emb.grad.is_sparse


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam([p], lr=0.1), lambda p: LazyAdam([p], lr=0.1)])
def test_warmup_ramps_the_rate_and_then_gives_it_back(make):
    """train.warmup_block: the first steps of an update take lr·t/T (Adam's first step moves each coordinate
    by about its rate, so step t moves ~0.1·t/4), then the full rate again, in either optimizer."""
    from continual_kd.continual.optim import SlowRows

    p = torch.nn.Parameter(torch.zeros(3))
    opt = make(p)
    stepper = SlowRows(opt, None, 1.0)
    stepper.ramp(4)
    moves, rates = [], []
    for _ in range(6):
        before = p.detach().clone()
        opt.zero_grad()
        (p * torch.tensor([1.0, -2.0, 3.0])).sum().backward()  # constant gradient: Adam's step is its rate
        stepper.step()
        rates.append(opt.param_groups[0]["lr"])
        moves.append(float((p.detach() - before).abs().max()))
    assert moves[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1], rel=1e-3)
    assert moves[4:] == pytest.approx([0.1, 0.1], rel=1e-3)
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])  # the group's rate: lr again after the ramp
