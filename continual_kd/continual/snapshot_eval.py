"""Evaluate the models of a saved snapshot on the test part of every block it has seen."""

from __future__ import annotations

from ..config import parse_job
from ..eval import plasticity_stability
from ..eval.metrics import nan_mean
from ..types import Interactions
from .learner import Learner
from .stages import model_key


def learner_states(snapshot) -> dict[str, dict]:
    """Per model, the state ``Learner.load`` takes: weights (weights-only load) + id-space sizes."""
    weights = snapshot.load_states()
    return {
        name: {"block": snapshot.block, "num_users": info["num_users"], "num_items": info["num_items"],
               "weights": weights[name]}
        for name, info in snapshot.manifest["model_info"].items()
    }


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


def evaluate_snapshot(snapshot, seen: Interactions, device: str = "cpu") -> dict:
    """{"block": k, "ks": [...], "models": {name: {"blocks": {j: metrics}, "mean": metrics, "continual":
    plasticity (block k) / stability (blocks < k) / H-mean}}} for j ≤ k."""
    job = parse_job(snapshot.manifest["job_spec"], f"{snapshot.path}/manifest.json")
    blocks = sorted(int(b) for b in set(seen.block.tolist()))
    out = {"block": snapshot.block, "ks": list(job.eval.ks), "models": {}}
    for name, learner in learners_from_snapshot(snapshot, device).items():
        per_block = learner.evaluate(seen, blocks, job.eval)
        keys = [k for k in next(iter(per_block.values())) if k != "users"] if per_block else []
        mean = {k: nan_mean(m[k] for m in per_block.values()) for k in keys}
        out["models"][name] = {"blocks": per_block, "mean": mean, "parameters": learner.num_parameters(),
                               "continual": plasticity_stability(per_block, snapshot.block)}
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
