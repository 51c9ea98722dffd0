"""What a committed block records, without Ray: the snapshot's manifest, its digest, and the per-model rows
of the catalog's ``block_results`` (used by the coordinator and by the benches that commit blocks in one
process)."""

from __future__ import annotations

import math
from pathlib import Path

from .checksums import file_sha256
from .config import JobSpec
from .continual import BlockResult, model_key
from .eval.metrics import undefined_as_none
from .snapshots import MANIFEST
from .stream import BlockPlan, StreamStore


def manifest_digest(snapshot_path: Path) -> str:
    """The manifest's sha256: it lists every file's checksum, so it identifies the whole snapshot."""
    return file_sha256(Path(snapshot_path) / MANIFEST)


def update_choice(log: dict) -> dict:
    """What one model's update kept, as the snapshot history (``choice``) and the catalog (``choice/<key>``) record
    it: epochs run, the best validation epoch and its NDCG@20, the replayed rows; for a student that fused several
    teachers, the fusion's choices (``weight_power`` of ``teacher_weights: chosen``, −1 for ∞;
    ``fusion_popularity_beta`` and ``fusion_popularity_used`` (1 / 0) of ``fusion_popularity``, with ``served`` its
    target's correction ``fusion_popularity_scale``; ``teachers_left_out``
    of ``teacher_floor``)."""
    out = {"epochs": log.get("epochs"), "best_epoch": log.get("best_epoch"), "valid_ndcg@20": log.get("valid_ndcg@20"),
           "replay_rows": log.get("replay_rows")}
    if "weight_power" in log:  # ∞ (the best teacher alone) as -1: the history's JSON and the catalog take numbers
        out["weight_power"] = -1.0 if math.isinf(log["weight_power"]) else log["weight_power"]
    matched = log.get("fusion_popularity")
    if matched:
        out["fusion_popularity_beta"] = matched["beta"]
        out["fusion_popularity_used"] = 1.0 if matched["used"] else 0.0
        if "served_scale" in matched:  # fusion_popularity: served — the target's correction this update
            out["fusion_popularity_scale"] = matched["served_scale"]
    floor = log.get("teacher_floor")
    if floor:
        out["teachers_left_out"] = float(len(floor["left_out"]))
    return out


def block_results(entry: dict) -> dict[str, dict[str, float | None]]:
    """A history entry's numbers per model, as the catalog's ``block_results`` rows take them: the test
    metrics of the block, plasticity / stability / H-mean, ``valid/<metric>``, ``seconds/update``,
    ``pooled/<metric>`` (every block's test pairs at once) and ``choice/best_epoch`` (and epochs run)."""
    rows: dict[str, dict[str, float | None]] = {}
    for model, metrics in (entry.get("metrics") or {}).items():
        rows[model] = dict(metrics)
        rows[model].update((entry.get("continual") or {}).get(model) or {})
        rows[model].update({f"valid/{k}": v for k, v in ((entry.get("valid") or {}).get(model) or {}).items()})
        seconds = (entry.get("updates") or {}).get(model)
        if seconds is not None:
            rows[model]["seconds/update"] = seconds
        rows[model].update({f"pooled/{k}": v for k, v in ((entry.get("pooled") or {}).get(model) or {}).items()
                            if k != "users"})
        choice = (entry.get("choice") or {}).get(model) or {}
        rows[model].update({f"choice/{k}": v for k, v in choice.items() if isinstance(v, (int, float))})
    return rows



# what every reader of a block's snapshot takes from its manifest (``block_manifest`` writes them all): key → type
BLOCK_KEYS = {"job": str, "job_spec": dict, "plan_id": str, "store": str, "model_info": dict}
_KINDS = {str: "a string", dict: "an object", int: "an integer"}


def block_manifest_problem(manifest: dict, commit: bool = False) -> str | None:
    """What a block snapshot's manifest lacks for the stream's readers (``ckd evaluate``, ``recommend``, ``report``,
    serving, a resumed ``submit``), in words, or None: ``resolve_snapshot``'s ``check``. ``commit``: also what
    committing it takes (``rows_covered``: a resumed ``submit`` rolling a finished snapshot forward)."""
    for key, kind in (BLOCK_KEYS | {"rows_covered": int} if commit else BLOCK_KEYS).items():
        value = manifest.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key!r} is missing" if value is None else f"{key!r} is not {_KINDS[kind]}"
    for name in manifest["models"]:
        info = manifest["model_info"].get(name)
        if not isinstance(info, dict) or not all(isinstance(info.get(k), int) for k in ("num_users", "num_items")):
            return f"model_info[{name!r}] lacks its num_users / num_items"
    return None


def block_manifest(job: JobSpec, plan: BlockPlan, store: StreamStore, k: int, states: dict, res: BlockResult,
              history: list[dict]) -> dict:
    info = plan.blocks[k]
    specs = {model_key("teacher", t.name): ("teacher", t) for t in job.teachers}
    specs["student"] = ("student", job.student)
    return {
        "job": job.name,
        "config_hash": job.config_hash(),
        "job_spec": job.to_dict(),
        "plan_id": plan.plan_id,
        "store": str(Path(store.root).resolve()),
        "num_blocks": plan.num_blocks,
        "rows_covered": sum(b.rows for b in plan.blocks[: k + 1]),
        "ts_end": info.ts_end,
        "id_space": {"num_users": info.num_users, "num_items": info.num_items},
        "model_info": {
            n: {"role": role, "spec_name": spec.name, "backbone": spec.backbone, "dim": spec.dim,
                "num_users": states[n]["num_users"], "num_items": states[n]["num_items"],
                "parameters": res.updates[n]["parameters"],
                # settings train.grid chose on validation, and the epoch kept by best-epoch choice
                "chosen": res.updates[n].get("chosen", {}), "best_epoch": res.updates[n].get("best_epoch")}
            for n, (role, spec) in specs.items()
        },
        "metrics": undefined_as_none(res.metrics),
        "pooled": undefined_as_none(res.pooled),
        "continual": undefined_as_none(res.continual),
        "valid": undefined_as_none(res.valid),
        "history": history,
    }
