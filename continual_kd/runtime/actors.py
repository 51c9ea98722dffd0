"""One Ray actor per model (``teacher:<name>``, ``student``): a thin wrapper over ``Learner``.

Block data arrives as object references (put once by the coordinator); knowledge travels from
teacher actors to the student actor by reference too, never through the driver.
"""

from __future__ import annotations

import time

import ray
import torch

from ..config import ModelSpec
from ..continual import Learner, resolve_device
from ..types import Interactions


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

    def ping(self) -> dict:
        return {"device": self.learner.device, "block": self.learner.block, "name": self.learner.spec.name}

    def run(self, method: str, block: int, block_refs: list, kwargs: dict):
        """Call ``Learner.<method>(seen, block, **kwargs)``; ``kwargs["knowledge"]`` may hold object
        references from other actors (fetched here: knowledge goes actor→actor, not via the driver)."""
        if kwargs.get("knowledge"):
            kwargs = {**kwargs, "knowledge": ray.get(list(kwargs["knowledge"]))}
        out = getattr(self.learner, method)(self._interactions(block_refs), block, **kwargs)
        if method == "evaluate_block":
            self._report(block, {**out["test"], **{k: v for k, v in out["continual"].items() if v is not None}})
        return out

    def state(self) -> dict:
        return self.learner.state()

    def _report(self, block: int, metrics: dict) -> None:
        """Export the block's test metrics to the Ray dashboard (Metrics tab / Prometheus)."""
        from ray.util.metrics import Gauge

        if self._gauges is None:
            self._gauges = {
                key: Gauge(f"ckd_{key.replace('@', '_at_')}", description=f"test {key} of the last block",
                           tag_keys=("model",))
                for key in metrics if "@" in key
            }
        for key, gauge in self._gauges.items():
            gauge.set(metrics[key], tags={"model": self.learner.spec.name})


def spawn_learner(role_name: str, spec: ModelSpec, seed: int, device: str, state: dict | None = None,
                  max_restarts: int = 3):
    """Start the named actor ``role_name`` with the resources its spec asks for.

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
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            return cls.remote(spec, seed, device, state, "student" if role_name == "student" else "teacher")
        except ValueError as e:  # the name is still held by the actor of a driver that just died
            if "already taken" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
