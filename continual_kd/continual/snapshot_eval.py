"""Evaluate the models of a saved snapshot on the test part of every block it has seen."""

from __future__ import annotations

from ..config import parse_job
from ..eval import plasticity_stability
from ..errors import CkdError
from ..eval.metrics import defined_mean
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


def evaluate_snapshot(snapshot, seen: Interactions, device: str = "cpu") -> dict:
    """{"block": k, "ks": [...], "models": {name: {"blocks": {j: metrics}, "mean": metrics, "mean_blocks":
    metric → over how many blocks its mean runs, "continual": plasticity (block k) / stability (blocks < k) /
    H-mean}}} for j ≤ k. A metric undefined for a block (None) is skipped by the mean, which then runs over
    fewer blocks (None when it is undefined everywhere)."""
    job = parse_job(snapshot.manifest["job_spec"], f"{snapshot.path}/manifest.json")
    blocks = sorted(int(b) for b in set(seen.block.tolist()))
    out = {"block": snapshot.block, "ks": list(job.eval.ks), "models": {}}
    for name, learner in learners_from_snapshot(snapshot, device).items():
        per_block = learner.evaluate(seen, blocks, job.eval)
        keys = [k for k in next(iter(per_block.values())) if k != "users"] if per_block else []
        means = {k: defined_mean(m.get(k) for m in per_block.values()) for k in keys}
        out["models"][name] = {"blocks": per_block, "mean": {k: v for k, (v, _) in means.items()},
                               "mean_blocks": {k: n for k, (_, n) in means.items()},
                               "parameters": learner.num_parameters(),
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
