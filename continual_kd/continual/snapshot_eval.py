"""Evaluate the models of a saved snapshot on the test part of every block it has seen."""

from __future__ import annotations

from ..config import parse_job
from ..eval import plasticity_stability
from ..errors import CkdError
from ..eval.metrics import defined_mean, users_per_chunk
from ..sparse import UserItemSet
from ..types import Interactions
from .learner import Learner
from .stages import model_key


def learner_states(snapshot) -> dict[str, dict]:
    """Per model, the state ``Learner.load`` takes: weights (weights-only load) + id-space sizes; every
    model's tensors are checked against the model its manifest describes first (``check_fit``)."""
    weights = snapshot.load_states()
    job = parse_job(snapshot.manifest["job_spec"], f"{snapshot.path}/manifest.json")
    specs = {model_key("teacher", t.name): t for t in job.teachers}
    specs["student"] = job.student
    states = {}
    for name, info in snapshot.manifest["model_info"].items():
        if name not in specs or name not in weights:
            raise CkdError(f"Snapshot {snapshot.path}: its manifest lists model {name!r}, which its job spec or "
                           f"files do not hold; use another snapshot (--snapshot N) or rewrite it with "
                           f"`ckd submit --restart`.")
        state = {"block": snapshot.block, "num_users": info["num_users"], "num_items": info["num_items"],
                 "weights": weights[name]}
        check_fit(specs[name], state, snapshot.path / snapshot.manifest["models"][name])
        states[name] = state
    return states


def check_fit(spec, state: dict, path) -> None:
    """Refuse, in one sentence naming the file, weights whose tensor names or shapes are not those of the
    model ``spec`` builds at the state's id-space sizes (a file from another job or another version).
    The model is built on the meta device (no memory) where the backbone allows it."""
    import torch

    from ..models.base import build_backbone
    from .learner import AUX

    nu, ni = int(state["num_users"]), int(state["num_items"])
    try:
        with torch.device("meta"):
            model = build_backbone(spec.backbone, nu, ni, **spec.backbone_params())
    except (RuntimeError, NotImplementedError):  # a backbone that draws numbers at init: build it for real
        with torch.random.fork_rng(devices=[]):
            model = build_backbone(spec.backbone, nu, ni, **spec.backbone_params())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state["weights"].items() if not k.startswith(AUX)}
    problems = [f"{k} is {_shape(got[k])}, expected {_shape(expected[k])}" for k in expected
                if k in got and got[k] != expected[k]]
    problems += [f"{k} is missing" for k in expected if k not in got]
    problems += [f"{k} is not a tensor of this model" for k in got if k not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CkdError(f"Snapshot file {path} does not fit the model its manifest describes ({spec.backbone}, "
                       f"dim {spec.dim}, {nu:,} users × {ni:,} items): {problems[0]}{more}; it was written for "
                       f"another model, so use another snapshot (--snapshot N) or rewrite this job's snapshots "
                       f"with `ckd submit --restart`.")


def _shape(shape: tuple) -> str:
    return "×".join(map(str, shape)) or "a scalar"


def learners_from_snapshot(snapshot, device: str = "cpu") -> dict[str, Learner]:
    """Rebuild every model of a snapshot from its manifest (specs) and weights."""
    job = parse_job(snapshot.manifest["job_spec"], f"{snapshot.path}/manifest.json")
    specs = {model_key("teacher", t.name): t for t in job.teachers}
    specs["student"] = job.student
    learners = {}
    for name, state in learner_states(snapshot).items():
        learners[name] = Learner(specs[name], job.seed, device)
        learners[name].load(state)
    return learners


def evaluate_snapshot(snapshot, seen: Interactions, device: str = "cpu", mask: str | None = None,
                      truth=None, mar=None, overrides: dict | None = None) -> dict:
    """{"block": k, "ks": [...], "mask": the evaluation mask, "models": {name: {"blocks": {j: metrics},
    "mean": metrics, "mean_blocks": metric → over how many blocks its mean runs, "continual": plasticity
    (block k) / stability (blocks < k) / H-mean, "pooled": metrics on every block's test pairs as one
    test set, "truth" / "mar" when given}}} for j ≤ k. A metric undefined for a block (None) is skipped by
    the mean, which then runs over fewer blocks (None when it is undefined everywhere).

    Beside the logged metrics, every block and the pooled set carry ``ips_recall@K`` / ``ips_ndcg@K``
    (self-normalised inverse-propensity estimates) and ``iv_recall@K`` / ``iv_ndcg@K`` (the intervened
    test split: every item equally likely): see ``eval.estimates``. ``mask`` (default: the job's
    ``eval.mask``) and ``overrides`` (other ``eval`` fields) change how the snapshot is evaluated.
    ``truth``: (a ``data.simulate.SimulationTruth``, store user → truth row, store item → truth column), the
    maps from ``truth_index``; ``mar``: (users, items, labels) of a labelled set (``eval.estimates``)."""
    import torch

    from ..eval import evaluate_ranking
    from ..eval.bias import popularity_groupings
    from ..eval.estimates import intervened_split, popularity_propensity
    from ..eval.protocol import MASK_LABELS, eval_sets, training_popularity
    from ..types import HOLDOUT, TEST

    job = parse_job(snapshot.manifest["job_spec"], f"{snapshot.path}/manifest.json")
    spec = job.eval.model_copy(update={**(overrides or {}), **({"mask": mask} if mask else {})})
    ks = tuple(spec.ks)
    blocks = sorted(int(b) for b in set(seen.block.tolist()))
    popularity = training_popularity(seen, device)
    weight = 1.0 / popularity_propensity(popularity, spec.ips_exponent, spec.ips_clip)
    groups = popularity_groupings(popularity, spec.mass_groups)
    targets = {}
    for b in [*blocks, None]:
        relevant, exclude = eval_sets(seen, b, TEST, device, spec.mask)
        keep = intervened_split(relevant.users.cpu().numpy(), relevant.items.cpu().numpy(),
                                spec.intervened_per_item, job.seed)
        iv = UserItemSet(relevant.users[torch.as_tensor(keep, device=relevant.users.device)].cpu().numpy(),
                         relevant.items[torch.as_tensor(keep, device=relevant.items.device)].cpu().numpy(),
                         seen.num_users, seen.num_items, device)
        targets[b] = (relevant, exclude, iv)
    label_ks = tuple(sorted({5, *ks}))
    truth_set = _truth_inputs(truth, seen, spec, device, job.seed) if truth is not None else None
    out = {"block": snapshot.block, "ks": list(ks), "mask": spec.mask, "mask_label": MASK_LABELS[spec.mask],
           "estimates": {"ips_exponent": spec.ips_exponent, "ips_clip": spec.ips_clip,
                         "intervened_per_item": spec.intervened_per_item},
           "pooled_users": float((targets[None][0].degree > 0).sum()), "models": {}}
    held = bool((seen.split == HOLDOUT).any())  # blocks.holdout: the held-out share judged like test
    for name, learner in learners_from_snapshot(snapshot, device).items():
        per_block = learner.evaluate(seen, blocks, spec)  # observes the seen pairs (graph / input rows)
        if held:
            for b, m in learner.evaluate(seen, blocks, spec, split=HOLDOUT).items():
                per_block[b].update({f"holdout_{k}": v for k, v in m.items()
                                     if k == "users" or k.startswith(("ndcg@", "recall@"))})
        model = learner.model
        step = users_per_chunk(model.num_items, spec.chunk_size, spec.memory_mb, device)  # eval.memory_mb honoured
        pooled = {}
        for b in [*blocks, None]:
            relevant, exclude, iv = targets[b]
            if b is None:
                pooled = evaluate_ranking(model, relevant, exclude, ks, step, device,
                                          item_popularity=popularity, item_group=groups, item_weight=weight)
                extra = pooled
            else:
                extra = {k: v for k, v in evaluate_ranking(model, relevant, exclude, ks, step, device,
                                                           item_weight=weight).items() if k.startswith("ips_")}
            ivm = evaluate_ranking(model, iv, exclude, ks, step, device)
            extra.update({f"iv_{k}": v for k, v in ivm.items() if k != "users"})
            extra["iv_users"] = ivm["users"]
            if b is not None:
                per_block[b].update(extra)
        keys = [k for k in next(iter(per_block.values())) if k not in ("users", "iv_users", "holdout_users")] \
            if per_block else []
        means = {k: defined_mean(m.get(k) for m in per_block.values()) for k in keys}
        out["models"][name] = {"blocks": per_block, "mean": {k: v for k, (v, _) in means.items()},
                               "mean_blocks": {k: n for k, (_, n) in means.items()},
                               "parameters": learner.num_parameters(),
                               "continual": plasticity_stability(per_block, snapshot.block),
                               "pooled": pooled}
        if truth_set is not None:
            out["models"][name]["truth"] = _truth_figures(model, truth_set, ks, label_ks, spec.chunk_size)
        if mar is not None:
            from ..eval.estimates import labelled_metrics

            m = labelled_metrics(model, *(x.to(device) for x in mar), ks=label_ks, chunk_size=spec.chunk_size)
            out["models"][name]["mar"] = {("mar_users" if k == "users" else f"mar_{k}"): v for k, v in m.items()}
    if truth_set is not None:
        out["truth"] = {"users": int(len(truth_set["users"])), "labelled_per_user": spec.truth_items,
                        "items_known_to_truth": truth_set["items_known"]}
    return out


def truth_index(truth, user_ids: list[str], item_ids: list[str]) -> tuple:
    """Store dense id → truth row / column (-1 where the truth has no such id), from external ids."""
    import numpy as np

    tu = {u: r for r, u in enumerate(truth.user_ids())}
    ti = {i: c for c, i in enumerate(truth.item_ids())}
    users = np.array([tu.get(str(u), -1) for u in user_ids], dtype=np.int64)
    items = np.array([ti.get(str(i), -1) for i in item_ids], dtype=np.int64)
    if not (users >= 0).any() or not (items >= 0).any():
        raise CkdError("--truth: none of the store's user or item ids are the truth's (u0, u1, … / i0, i1, …); "
                       "give the truth of the simulated stream this store was ingested from")
    return truth, users, items


def check_truth_fits(truth_in: tuple, seen: Interactions, where: str = "--truth") -> None:
    """Refuse a truth that is not this stream's: in a simulated stream no user clicks before the period it arrived
    and no item is clicked before the period it was born; a truth of another simulation (the same u0, u1, … ids)
    contradicts the store's timestamps for many of them (more than 1% of the pairs it covers)."""
    import numpy as np

    truth, rows, cols = truth_in
    start, length = truth.config.get("start_ts"), truth.config.get("period_seconds")
    if start is None or not length or len(seen) == 0:
        return
    period = (np.asarray(seen.ts, dtype=np.int64) - int(start)) // int(length)
    u = rows[np.minimum(seen.users, len(rows) - 1)]
    i = cols[np.minimum(seen.items, len(cols) - 1)]
    known = (seen.users < len(rows)) & (seen.items < len(cols)) & (u >= 0) & (i >= 0)
    if not known.any():
        return
    early = (period[known] < truth.user_arrival[u[known]]) | (period[known] < truth.item_birth[i[known]])
    if early.mean() > 0.01:
        raise CkdError(f"{where}: {early.mean():.0%} of the store's interactions it covers happen before their user "
                       f"arrived or their item was born in it: the truth of another simulation; give the truth.npz "
                       f"written with the stream this store ingested")


def _truth_inputs(truth, seen: Interactions, spec, device, seed: int) -> dict:
    """The truth's preference as a function of store ids, the users it is measured on (with a training pair
    and known to the truth), the mask, and the uniformly drawn labelled set (the same for every model)."""
    import numpy as np
    import torch

    from ..eval.estimates import truth_labelled_set
    from ..eval.protocol import eval_sets
    from ..types import TEST, TRAIN

    truth, rows, cols = truth
    n_items = seen.num_items
    cols = np.concatenate([cols[:n_items], np.full(max(0, n_items - len(cols)), -1)])
    known_item = torch.as_tensor(cols >= 0, device=device)
    col_t = torch.as_tensor(np.maximum(cols, 0), device=device)

    def preference(users: torch.Tensor) -> torch.Tensor:  # (B,) store users → (B, I) in store item ids
        r = rows[users.cpu().numpy()]
        pref = torch.as_tensor(truth.preference(np.maximum(r, 0)), device=device)[:, col_t]
        return pref.masked_fill(~known_item, 0.0)

    trained = np.unique(seen.users[seen.split == TRAIN])
    users = torch.as_tensor(trained[(trained < len(rows)) & (rows[np.minimum(trained, len(rows) - 1)] >= 0)],
                            dtype=torch.int64, device=device)
    _, exclude = eval_sets(seen, None, TEST, device, spec.mask)
    unknown_items = torch.nonzero(~known_item).flatten()
    if len(unknown_items):  # items the truth does not know are not drawn into the labelled set
        exclude = exclude.union(UserItemSet(users.repeat_interleave(len(unknown_items)).cpu().numpy(),
                                            unknown_items.repeat(len(users)).cpu().numpy(),
                                            seen.num_users, seen.num_items, device))
    _, items, labels = truth_labelled_set(preference, users, n_items, exclude, spec.truth_items, seed,
                                          spec.chunk_size)
    return {"preference": preference, "users": users, "exclude": exclude, "items": items, "labels": labels,
            "items_known": int(known_item.sum())}


def _truth_figures(model, t: dict, ks, label_ks, chunk_size: int) -> dict:
    from ..eval.estimates import labelled_metrics, relevance_share

    out = relevance_share(model, t["preference"], t["users"], t["exclude"], ks, chunk_size)
    m = labelled_metrics(model, t["users"], t["items"], t["labels"], label_ks, chunk_size)
    out.update({("truth_users" if k == "users" else f"truth_{k}"): v for k, v in m.items()})
    return out


def recommend_from_snapshot(snapshot, seen: Interactions, users, k: int, model_name: str = "student",
                            device: str = "cpu"):
    """Top-k items (dense ids, scores) of ``model_name`` for dense ``users``, excluding every item
    they have interacted with so far (all splits: when serving, everything seen is known)."""
    import torch

    from ..eval import known_pairs, top_k_items

    learners = learners_from_snapshot(snapshot, device)
    if model_name not in learners:
        from ..errors import CkdError

        raise CkdError(f"--model {model_name!r}: not in snapshot {snapshot.path.name}; it has {', '.join(learners)}")
    model = learners[model_name].model
    known = known_pairs(seen, device)
    model.observe(known.users, known.items)
    return top_k_items(model, torch.as_tensor(users, dtype=torch.int64, device=device), k, known)
