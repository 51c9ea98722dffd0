"""One Ray actor per model (``teacher:<name>``, ``student``): a thin wrapper over ``Learner``.

Block data arrives as object references (put once by the coordinator); knowledge travels from
teacher actors to the student actor by reference too, never through the driver.
"""

from __future__ import annotations

import math
import re
import time

import ray
import torch

from ..config import ModelSpec
from ..continual import Learner, resolve_device
from ..types import Interactions


class StaleActorError(RuntimeError):
    """This actor was restarted by Ray (its process died) and holds the state it was started with, not
    the last committed one: every call but ``ping`` / ``restore`` refuses until the coordinator restores it."""


class LearnerActor:
    def __init__(self, spec: ModelSpec, seed: int, device: str, state: dict | None = None, role: str = "student"):
        torch.set_num_threads(max(1, int(spec.resources.num_cpus)))
        device = resolve_device(device, has_gpu=spec.resources.num_gpus > 0)
        self.learner = Learner(spec, seed, device, role)
        if state is not None:
            self.learner.load(state)
        self._seen_key: tuple | None = None
        self._seen: Interactions | None = None
        self._gauges = None
        # a process that died when no call was pending comes back silently: refuse work until restored
        self._stale = ray.get_runtime_context().was_current_actor_reconstructed

    def _check_fresh(self) -> None:
        if self._stale:
            raise StaleActorError(f"model actor {self.learner.spec.name!r} was restarted and not restored yet")

    def _interactions(self, block_refs: list) -> Interactions:
        """Blocks 0..k concatenated (cached for the stages of one block)."""
        key = tuple(r.hex() for r in block_refs)
        if key != self._seen_key:
            self._seen = Interactions.concat(ray.get(block_refs))
            self._seen_key = key
        return self._seen

    def restore(self, state: dict | None) -> None:
        """Go back to a committed state (None: no model yet), e.g. after this or another actor died."""
        if state is None:
            self.learner.reset()
        else:
            self.learner.load(state)
        self._seen_key = self._seen = None
        self._stale = False

    def ping(self) -> dict:
        return {"device": self.learner.device, "block": self.learner.block, "name": self.learner.spec.name}

    def run(self, method: str, block: int, block_refs: list, kwargs: dict):
        """Call ``Learner.<method>(seen, block, **kwargs)``; ``kwargs["knowledge"]`` may hold object
        references from other actors (fetched here: knowledge goes actor→actor, not via the driver)."""
        self._check_fresh()
        if kwargs.get("knowledge"):
            kwargs = {**kwargs, "knowledge": ray.get(list(kwargs["knowledge"]))}
        out = getattr(self.learner, method)(self._interactions(block_refs), block, **kwargs)
        if method == "evaluate_block":
            self._report(block, {**out["test"], **{k: v for k, v in out["continual"].items() if v is not None}})
        return out

    def state(self) -> dict:
        self._check_fresh()
        return self.learner.state()

    def _report(self, block: int, metrics: dict) -> None:
        """Export the block's metrics to the Ray dashboard (Metrics tab / Prometheus), see ``gauge_name``."""
        if self._gauges is None:
            self._gauges = MetricGauges()
        self._gauges.report(self.learner.spec.name, metrics)


def gauge_name(key: str) -> tuple[str, str]:
    """A metric key → (valid Prometheus gauge name, ``group`` tag).

    The part with ``@`` and the parts before it name the gauge; parts after it are the group:
    ``"recall@20/head"`` → ``("ckd_recall_at_20", "head")``, ``"ndcg@20"`` → ``("ckd_ndcg_at_20", "all")``,
    ``"plasticity/ndcg@20"`` → ``("ckd_plasticity_ndcg_at_20", "all")``.
    """
    parts = [p for p in key.split("/") if p]
    at = next((i for i, p in enumerate(parts) if "@" in p), len(parts) - 1)
    metric = "_".join(parts[: at + 1]).replace("@", "_at_")
    name = re.sub(r"[^a-z0-9_]+", "_", metric.lower()).strip("_")
    group = "/".join(parts[at + 1:]) or "all"
    return f"ckd_{name}", group


class MetricGauges:
    """One Ray gauge per metric name (tags ``model`` and ``group``), created on first use."""

    def __init__(self):
        self._gauges: dict = {}

    def report(self, model: str, metrics: dict) -> list[tuple[str, str, float]]:
        """Set every finite numeric metric; returns the (name, group, value) set (NaN/None are skipped)."""
        from ray.util.metrics import Gauge

        done = []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name, group = gauge_name(key)
            gauge = self._gauges.get(name)
            if gauge is None:
                metric = key if group == "all" else key[: -len(group) - 1]
                gauge = self._gauges[name] = Gauge(name, description=f"{metric} of the last block, per model and group",
                                                   tag_keys=("model", "group"))
            gauge.set(float(value), tags={"model": model, "group": group})
            done.append((name, group, float(value)))
        return done


def spawn_learner(role_name: str, spec: ModelSpec, seed: int, device: str, state: dict | None = None,
                  max_restarts: int = 3, scheduling_strategy=None):
    """Start the named actor ``role_name`` with the resources its spec asks for.

    ``scheduling_strategy``: where it goes, e.g. ``reserve_actors(...).strategies[role_name]`` (its
    bundle of the job's placement group); None: Ray's default placement.

    Ray restarts it up to ``max_restarts`` times if its process dies (re-running ``__init__`` with
    the state it started the job with); the coordinator then calls ``restore`` with the last
    committed state. Calls are not retried by Ray: the coordinator retries whole blocks.
    """
    cls = ray.remote(LearnerActor).options(
        name=role_name,
        num_cpus=spec.resources.num_cpus,
        num_gpus=spec.resources.num_gpus,
        max_concurrency=1,
        max_restarts=max_restarts,
        max_task_retries=0,
        **({"scheduling_strategy": scheduling_strategy} if scheduling_strategy is not None else {}),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            return cls.remote(spec, seed, device, state, "student" if role_name == "student" else "teacher")
        except ValueError as e:  # the name is still held by the actor of a driver that just died
            if "already taken" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
