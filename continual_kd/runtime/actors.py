"""One Ray actor per model (``teacher:<name>``, ``student``): a thin wrapper over ``Learner``.

Block data arrives as object references (put once by the coordinator); knowledge travels from
teacher actors to the student actor by reference too, never through the driver.
"""

from __future__ import annotations

import time

import ray
import torch

from ..config import ModelSpec
from ..continual import Learner
from ..errors import CkdError
from ..types import Interactions
from .metrics import MetricGauges, gauge_name  # noqa: F401  (the per-model gauges, exported by the driver)


class StaleActorError(RuntimeError):
    """This actor was restarted by Ray (its process died) and holds the state it was started with, not
    the last committed one: every call but ``ping`` / ``restore`` refuses until the coordinator restores it."""


def actor_device(requested: str, num_gpus: float, who: str, cuda_available: bool, where: str = "") -> str:
    """The torch device of a model actor: its GPU when it was given one, never a silent CPU fallback.

    ``requested`` is ``runtime.device``: ``cpu`` keeps every model on the CPU (an explicit choice);
    ``auto`` / ``cuda`` put an actor with ``num_gpus > 0`` on CUDA, and refuse in one sentence when its
    process sees no CUDA device. ``cuda`` for an actor given no GPU is refused too (Ray hides every GPU
    from an actor that asked for none).
    """
    if requested == "cpu":
        return "cpu"
    if num_gpus > 0:
        if not cuda_available:
            raise CkdError(
                f"{who} asks for resources.num_gpus {num_gpus:g} but its process{where} sees no CUDA device (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); install a CUDA build of torch on "
                f"the GPU nodes, or set resources.num_gpus: 0 (or runtime.device: cpu) to train it on the CPU"
            )
        return "cuda"
    if requested == "cuda":
        raise CkdError(f"runtime.device is cuda but {who} asks for no GPU (resources.num_gpus 0); give it "
                       f"resources.num_gpus > 0 (e.g. 1 or 0.5) or set runtime.device: auto")
    return "cpu"


class LearnerActor:
    def __init__(self, spec: ModelSpec, seed: int, device: str, state: dict | None = None, role: str = "student"):
        torch.set_num_threads(max(1, int(spec.resources.num_cpus)))
        self.name = spec.name
        self._error: str | None = None  # why this actor cannot work (ping reports it; the driver stops in one line)
        self.learner = None
        try:
            ctx = ray.get_runtime_context()
            where = f" on node {ray.util.get_node_ip_address()} (Ray GPU ids {ctx.get_accelerator_ids().get('GPU', [])})"
            device = actor_device(device, spec.resources.num_gpus, f"the model {spec.name}", torch.cuda.is_available(),
                                  where)
        except CkdError as e:
            self._error = str(e)
        else:
            self.learner = Learner(spec, seed, device, role)
            if state is not None:
                self.learner.load(state)
        self._seen_key: tuple | None = None
        self._seen: Interactions | None = None
        # a process that died when no call was pending comes back silently: refuse work until restored
        self._stale = ray.get_runtime_context().was_current_actor_reconstructed

    def _check_fresh(self) -> None:
        if self._error:
            raise CkdError(self._error)
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
        if self._error:
            raise CkdError(self._error)
        if state is None:
            self.learner.reset()
        else:
            self.learner.load(state)
        self._seen_key = self._seen = None
        self._stale = False

    def ping(self) -> dict:
        """Where this actor runs (node id, its ckd_node_* resource of `ckd cluster up`) and on which device;
        ``error``: why it cannot work."""
        ctx = ray.get_runtime_context()
        node_id = ctx.get_node_id()
        labels = [r for n in ray.nodes() if n.get("NodeID") == node_id
                  for r in n.get("Resources", {}) if r.startswith("ckd_node_")]
        return {"name": self.name, "error": self._error, "node_id": node_id, "node": labels[0] if labels else None,
                "device": self.learner.device if self.learner else None,
                "block": self.learner.block if self.learner else None}

    def run(self, method: str, block: int, block_refs: list, kwargs: dict):
        """Call ``Learner.<method>(seen, block, **kwargs)``; ``kwargs["knowledge"]`` may hold object
        references from other actors (fetched here: knowledge goes actor→actor, not via the driver)."""
        self._check_fresh()
        if method == "update" and self.learner.spec.workers > 1:  # on Ray Train workers (runtime/train.py)
            from .train import data_parallel_update

            return data_parallel_update(self.learner, block, block_refs, kwargs)
        if kwargs.get("knowledge"):
            kwargs = {**kwargs, "knowledge": ray.get(list(kwargs["knowledge"]))}
        return getattr(self.learner, method)(self._interactions(block_refs), block, **kwargs)

    def state(self) -> dict:
        self._check_fresh()
        return self.learner.state()

def spawn_learner(role_name: str, spec: ModelSpec, seed: int, device: str, state: dict | None = None,
                  max_restarts: int = 3, scheduling_strategy=None):
    """Start the named actor ``role_name`` with the resources its spec asks for.

    ``scheduling_strategy``: where it goes, e.g. ``reserve_actors(...).strategies[role_name]`` (its
    bundle of the job's placement group); None: Ray's default placement.

    Ray restarts it up to ``max_restarts`` times if its process dies (re-running ``__init__`` with the
    arguments it was started with: the coordinator passes no ``state`` and hands the committed one over by
    ``restore``, at the start and after a restart). Calls are not retried by Ray: the coordinator retries
    whole blocks.
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
