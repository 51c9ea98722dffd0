"""CCD: stability / plasticity proxies (continual.proxies) and proxy-guided replay (distill.replay)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from continual_kd.continual.proxies import SOURCES, Proxies, proxy_knowledge
from continual_kd.distill.base import TERMS, Batch, TermContext, build_terms
from continual_kd.distill.replay import model_ranks, replay_probabilities
from continual_kd.models.mf import BPRMF
from continual_kd.models.multvae import MultVAE
from continual_kd.sparse import UserItemSet
from continual_kd.types import Knowledge


def set_mf(model: BPRMF, users, items) -> BPRMF:
    with torch.no_grad():
        model.user_emb.copy_(torch.tensor(users, dtype=torch.float32))
        model.item_emb.copy_(torch.tensor(items, dtype=torch.float32))
    return model


def replay_spec(**kw):
    base = dict(name="replay", weight=0.5, decay=10.0, top=3, eps=1e-4, every=5, per_user=10, source="proxies")
    return SimpleNamespace(**{**base, **kw})


def knowledge(source, users, items, scores):
    return Knowledge(source=source, block=1, users=np.asarray(users, np.int64), items=np.asarray(items, np.int64),
                     scores=np.asarray(scores, np.float32))


# ---------------------------------------------------------------------------------------------- proxies
def test_proxies_ema_after_two_updates_by_hand():
    model = set_mf(BPRMF(2, 3, dim=2), [[1.0, 2.0], [0.0, -1.0]], [[1.0, 0.0], [2.0, 2.0], [-1.0, 4.0]])
    proxies = Proxies(stability=0.9, plasticity=0.1)
    proxies.update(model)  # first update: both proxies = D1
    for name in ("stability", "plasticity"):
        assert torch.equal(proxies.params[name]["user_emb"], model.user_emb.detach())
    set_mf(model, [[3.0, 0.0], [10.0, 1.0]], [[0.0, 0.0], [2.0, 12.0], [9.0, 4.0]])
    proxies.update(model)
    # S = 0.9·D1 + 0.1·D2, P = 0.1·D1 + 0.9·D2
    s, p = proxies.params["stability"], proxies.params["plasticity"]
    close = lambda a, b: torch.allclose(a, torch.tensor(b), atol=1e-6)  # noqa: E731
    assert close(s["user_emb"], [[1.2, 1.8], [1.0, -0.8]])
    assert close(s["item_emb"], [[0.9, 0.0], [2.0, 3.0], [0.0, 4.0]])
    assert close(p["user_emb"], [[2.8, 0.2], [9.0, 0.8]])
    assert close(p["item_emb"], [[0.1, 0.0], [2.0, 11.0], [8.0, 4.0]])
    assert proxies.updates == 2 and s["user_emb"].device.type == "cpu"
    # the proxy models score with those parameters: stability's s(0, 1) = (1.2, 1.8)·(2, 3) = 7.8
    stab, plas = proxies.models(lambda nu, ni: BPRMF(nu, ni, dim=2))
    assert not stab.training
    assert stab.score(torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(7.8)
    assert plas.score(torch.tensor([1]), torch.tensor([2])).item() == pytest.approx(9.0 * 8.0 + 0.8 * 4.0)


def test_proxies_grow_with_the_model_new_rows_start_as_the_models():
    model = set_mf(BPRMF(2, 2, dim=1), [[1.0], [2.0]], [[4.0], [6.0]])
    proxies = Proxies(stability=0.5, plasticity=0.0)
    proxies.update(model)
    model.grow(3, 4, init="random", generator=torch.Generator().manual_seed(0))
    set_mf(model, [[3.0], [4.0], [7.0]], [[0.0], [2.0], [8.0], [-5.0]])
    proxies.update(model)
    s, p = proxies.params["stability"], proxies.params["plasticity"]
    # old rows: EMA; rows new to the model (user 2, items 2-3): D's rows
    assert torch.allclose(s["user_emb"], torch.tensor([[2.0], [3.0], [7.0]]))
    assert torch.allclose(s["item_emb"], torch.tensor([[2.0], [4.0], [8.0], [-5.0]]))
    assert torch.equal(p["user_emb"], model.user_emb.detach())  # p_w = 0: the plasticity proxy is D
    assert (proxies.num_users, proxies.num_items) == (3, 4)
    stab, _ = proxies.models(lambda nu, ni: BPRMF(nu, ni, dim=1))
    assert stab.full_scores(torch.tensor([2])).tolist() == [[14.0, 28.0, 56.0, -35.0]]


def test_proxies_grow_item_sized_layers_of_multvae():
    torch.manual_seed(0)
    model = MultVAE(4, 5, dim=2, hidden=3)
    proxies = Proxies(stability=0.9, plasticity=0.1)
    proxies.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.grow(4, 7, init="random", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    proxies.update(model)
    s = proxies.params["stability"]
    d = model.state_dict()
    assert s["item_in"].shape == (7, 3) and s["item_bias"].shape == (7,)
    assert torch.allclose(s["item_in"][:5], 0.9 * before["item_in"] + 0.1 * d["item_in"][:5])
    assert torch.equal(s["item_in"][5:], d["item_in"][5:])  # new items: D's rows
    assert torch.allclose(s["enc.weight"], 0.9 * before["enc.weight"] + 0.1 * d["enc.weight"])
    stab, _ = proxies.models(lambda nu, ni: MultVAE(nu, ni, dim=2, hidden=3))
    assert stab.num_items == 7


def test_proxies_refuse_a_shrinking_table():
    proxies = Proxies()
    proxies.update(BPRMF(3, 3, dim=2))
    with pytest.raises(ValueError, match="cannot grow"):
        proxies.update(BPRMF(2, 3, dim=2))
    with pytest.raises(ValueError, match="stability"):
        Proxies(stability=1.5)


def test_proxies_state_round_trip_through_torch_save(tmp_path):
    model = set_mf(BPRMF(2, 3, dim=2), [[1.0, 2.0], [0.0, -1.0]], [[1.0, 0.0], [2.0, 2.0], [-1.0, 4.0]])
    proxies = Proxies(stability=0.9, plasticity=0.1)
    proxies.update(model)
    model.grow(3, 3, init="random", generator=torch.Generator().manual_seed(0))
    proxies.update(model)
    path = tmp_path / "proxies.pt"
    torch.save(proxies.state(), path)
    back = Proxies.from_state(torch.load(path, weights_only=True))
    assert back.weights == proxies.weights and back.updates == 2 and (back.num_users, back.num_items) == (3, 3)
    for name in ("stability", "plasticity"):
        assert back.params[name].keys() == proxies.params[name].keys()
        for key, value in proxies.params[name].items():
            assert torch.equal(back.params[name][key], value)
    # and it keeps averaging where the original would
    proxies.update(model)
    back.update(model)
    assert torch.equal(back.params["stability"]["user_emb"], proxies.params["stability"]["user_emb"])


def test_proxy_knowledge_lists_are_named_for_replay():
    model = set_mf(BPRMF(1, 4, dim=1), [[1.0]], [[4.0], [3.0], [2.0], [1.0]])
    proxies = Proxies(stability=1.0, plasticity=0.0)
    proxies.update(model)
    known = UserItemSet([0], [0], 1, 4)
    lists = proxy_knowledge(proxies.models(lambda nu, ni: BPRMF(nu, ni, dim=1)), torch.tensor([0]), 2, known, 3)
    assert [k.source for k in lists] == list(SOURCES)
    assert lists[0].items.tolist() == [[1, 2]] and lists[0].scores.tolist() == [[3.0, 2.0]]


# ---------------------------------------------------------------------------------------------- replay
def test_replay_probabilities_by_hand():
    # eps = ln 2: weight 2^(rank_M - rank_X) for items the source ranks in its top 3 and better than M
    rank_model = torch.tensor([[5, 1, 3, 10], [0, 1, 2, 3]])
    rank_source = torch.tensor([[0, 2, 1, 3], [0, 1, 2, 3]])
    p = replay_probabilities(rank_model, rank_source, top=3, eps=math.log(2))
    # row 0: item 0 → 2^5 = 32, item 1 ranked better by M, item 2 → 2^2 = 4, item 3 outside the top 3
    assert torch.allclose(p[0], torch.tensor([8 / 9, 0.0, 1 / 9, 0.0]))
    # row 1: M ties or beats the source everywhere but item 3, which the source ranks outside its top 3
    assert p[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    p = replay_probabilities(torch.tensor([2, 3, 9]), torch.tensor([0, 0, 1]), top=50, eps=1e-4)
    w = torch.tensor([math.exp(2e-4), math.exp(3e-4), math.exp(8e-4)])
    assert torch.allclose(p, w / w.sum())


def test_replay_weight_decays_by_hand():
    spec = replay_spec(weight=0.5, decay=10.0)
    ctx = TermContext(model=BPRMF(1, 3, dim=1), knowledge=[], known=UserItemSet([], [], 1, 3), num_users=1,
                      num_items=3, block=1, epochs=20)
    term = TERMS["replay"](spec, ctx)
    assert term.weight_at(0) == pytest.approx(0.5)
    assert term.weight_at(5) == pytest.approx(0.5 * math.exp(-0.5)) == pytest.approx(0.303265, abs=1e-6)
    assert term.weight_at(10) == pytest.approx(0.5 / math.e)


def ranked_model(num_users: int = 1) -> BPRMF:
    # user · item scores 4, 3, 2, 1, 0: M ranks item 0 best ... item 4 worst
    return set_mf(BPRMF(num_users, 5, dim=1), [[1.0]] * num_users, [[4.0], [3.0], [2.0], [1.0], [0.0]])


def test_model_ranks_mask_known_pairs():
    model = ranked_model()
    known = UserItemSet([0], [0], 1, 5)  # item 0 known: the unknown items rank 1 → 0, 2 → 1, ...
    ranks = model_ranks(model, torch.tensor([0]), torch.tensor([[4, 3, 1, 2]]), known)
    assert ranks.tolist() == [[3, 2, 0, 1]]


def test_replay_candidates_labels_and_loss_by_hand():
    model = ranked_model()
    known = UserItemSet([0], [0], 1, 5)
    # M's ranks (item 0 known): 1 → 0, 2 → 1, 3 → 2, 4 → 3. The stability proxy ranks 4, 3, 0 (known to M:
    # dropped), 1 → its top 3 holds 4 (rank_X 0 < 3) and 3 (rank_X 1 < 2): both eligible. The plasticity
    # proxy's 1 (rank_X 0, rank_M 0) is not, its 4 (rank_X 1 < 3) is.
    lists = [knowledge("proxy:stability", [0], [[4, 3, 0, 1]], [[2.0, 1.0, 1.5, 0.5]]),
             knowledge("proxy:plasticity", [0], [[1, 4]], [[3.0, -1.0]]),
             knowledge("teacher", [0], [[2]], [[9.0]])]  # not a proxy: ignored with source "proxies"
    ctx = TermContext(model=model, knowledge=[], known=known, num_users=1, num_items=5, block=1, epochs=10, own=lists)
    (term,) = build_terms([replay_spec(top=3, per_user=10)], ctx)
    term.resample(torch.Generator().manual_seed(0), 0)
    chosen = sorted(zip(term.items[term.chosen].tolist(), term.labels[term.chosen].tolist()))
    # pooled: item 4 from both proxies (each with its own label), item 3 from the stability proxy
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert [c[0] for c in chosen] == [3, 4, 4]
    assert sorted(c[1] for c in chosen if c[0] == 4) == pytest.approx(sorted([sig(2.0), sig(-1.0)]))
    assert [c[1] for c in chosen if c[0] == 3] == pytest.approx([sig(1.0)])
    # summed BCE(σ(s), label): s(0, 4) = 0 → ln 2 per entry; s(0, 3) = 1
    expected = 2 * math.log(2) - (sig(1.0) * math.log(sig(1.0)) + (1 - sig(1.0)) * math.log(1 - sig(1.0)))
    batch = Batch(users=torch.tensor([0, 0]), pos=torch.tensor([1, 2]), neg=torch.tensor([3, 4]))
    assert term.loss(model, batch, 0).item() == pytest.approx(expected, rel=1e-5)


def test_replay_users_without_candidates_contribute_nothing():
    model = ranked_model(num_users=2)
    known = UserItemSet([], [], 2, 5)
    # user 0's proxy agrees with M (no item ranked better than M does); user 1 has no list
    lists = [knowledge("proxy:stability", [0], [[0, 1, 2]], [[1.0, 1.0, 1.0]])]
    ctx = TermContext(model=model, knowledge=[], known=known, num_users=2, num_items=5, block=1, epochs=10, own=lists)
    (term,) = build_terms([replay_spec()], ctx)
    term.resample(torch.Generator().manual_seed(0), 0)
    assert not term.chosen.any()
    loss = term.loss(model, Batch(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1, 1])), 0)
    assert loss.item() == 0.0


def test_replay_draws_follow_the_distribution_and_redraw_every_few_epochs():
    n = 4000
    model = ranked_model(num_users=n)
    known = UserItemSet([], [], n, 5)
    users = np.arange(n)
    # source ranks 4, 3, 0: rank_M 4, 3, 0 → eligible 4 (diff 4) and 3 (diff 2); eps = ln 2 → p = 16/20, 4/20
    lists = [knowledge("student", users, np.tile([4, 3, 0], (n, 1)), np.zeros((n, 3)))]
    ctx = TermContext(model=model, knowledge=lists, known=known, num_users=n, num_items=5, block=1, epochs=10)
    (term,) = build_terms([replay_spec(source="peers", eps=math.log(2), per_user=1, every=5)], ctx)
    gen = torch.Generator().manual_seed(0)
    term.resample(gen, 0)
    assert term.chosen.all()
    first = term.items.clone()
    assert (first == 4).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert set(first.unique().tolist()) == {3, 4}
    term.resample(gen, 3)  # not a re-draw epoch
    assert torch.equal(term.items, first)
    term.resample(gen, 5)
    assert not torch.equal(term.items, first)
    assert (term.items == 4).float().mean().item() == pytest.approx(0.8, abs=0.03)


def test_replay_adam_steps_move_replayed_scores_toward_labels():
    torch.manual_seed(0)
    model = BPRMF(6, 12, dim=4)
    with torch.no_grad():
        model.item_emb.mul_(100)  # scores of order 0.01: ranks well defined
    proxy = BPRMF(6, 12, dim=4)
    with torch.no_grad():
        proxy.user_emb.normal_(0, 1)
        proxy.item_emb.normal_(0, 1)
    known = UserItemSet(np.arange(6), np.arange(6), 6, 12)
    users = torch.arange(6)
    own = proxy_knowledge((proxy, proxy), users, 6, known, 1)
    ctx = TermContext(model=model, knowledge=[], known=known, num_users=6, num_items=12, block=1, epochs=10, own=own)
    (term,) = build_terms([replay_spec(top=6, per_user=3, eps=1e-2)], ctx)
    term.resample(torch.Generator().manual_seed(0), 0)
    assert term.chosen.sum() > 0
    rows = torch.arange(len(term.users))

    def gap():
        with torch.no_grad():
            s = torch.sigmoid(model.score(term.users, term.items[rows]))
        return (s - term.labels)[term.chosen].abs().mean().item()

    before = gap()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = Batch(users=users, pos=users, neg=users)
    for _ in range(30):
        opt.zero_grad()
        term.loss(model, batch, 0).backward()
        opt.step()
    assert gap() < 0.5 * before
