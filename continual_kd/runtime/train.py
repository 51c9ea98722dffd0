"""Data-parallel updates of one model on Ray Train workers (``workers: N`` in the model's job entry).

The model's actor (``runtime/actors.py``) hands its ``update`` to a ``TorchTrainer`` of N workers, each
asking for the model's ``resources`` (the process group is gloo on CPU, NCCL on GPU), and loads the
trained state that rank 0 returns. Every worker rebuilds the same ``Learner`` from the actor's state,
reads the same blocks and knowledge (object references, fetched on the worker) and runs the same
``Learner.update``; inside ``continual.training.train_epochs`` every worker draws each epoch's
permutation and negatives from the same seeded generator, trains on its part of every batch
(``DataParallel.shard``: the batch's rows cut in N), and DDP sums the gradients in backward
(``DataParallel.synced``). So each optimiser step is the single worker's step up to the order of float
sums, for every loss that is a sum over the batch's rows (BPR, L2, the per-row KD terms); a term that
couples the rows of a batch (FTD / HTD topology) sees each worker's part only. Validation (best epoch)
runs on every worker on identical weights, so all take the same early-stopping decision.

The in-process executor (tests, bench, ``ckd tune`` trials) trains every model on one worker.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid

import ray
import torch
from torch import nn

from ..continual import Learner
from ..distill.base import Batch
from ..errors import CkdError
from ..types import Interactions


class _LossOf(nn.Module):
    """What DDP wraps: the model and the KD terms' own parameters (DE's experts, …). Its forward returns
    the batch loss already computed by the training loop, so DDP's bookkeeping (which parameters took part,
    the gradient buckets to all-reduce in backward) runs on that loss's graph."""

    def __init__(self, model: nn.Module, terms):
        super().__init__()
        self.model = model
        self.terms = nn.ModuleList(terms)

    def forward(self, loss_fn):
        return loss_fn()


class DataParallel:
    """One Ray Train worker's part of ``train_epochs`` (its ``parallel`` argument)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.ddp = None

    def attach(self, model: nn.Module, terms) -> None:
        """Wrap the model and terms in DDP for this training run (all workers hold identical weights)."""
        from ray.train.torch import prepare_model

        self.ddp = prepare_model(_LossOf(model, terms), move_to_device=False,
                                 parallel_strategy_kwargs={"find_unused_parameters": True, "broadcast_buffers": False})

    def shard(self, batch: Batch) -> Batch:
        """This worker's contiguous part of the batch (sizes differ by at most one row)."""
        parts = [torch.tensor_split(t, self.world)[self.rank] for t in (batch.users, batch.pos, batch.neg)]
        return Batch(*parts)

    def synced(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss through DDP, times the number of workers: DDP averages the gradients over the workers and
        every loss is a sum over rows, so the all-reduced gradient is the whole batch's, as on one worker."""
        return self.ddp(lambda: loss * self.world)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """An epoch's loss sum over every worker's rows (for the update log)."""
        out = value.detach().clone()
        torch.distributed.all_reduce(out)
        return out


def _update_on_worker(config: dict):
    """The training function of every Ray Train worker: the model's ``Learner.update`` on its shard."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    payload = ray.get(config["payload"])
    spec = payload["spec"]
    torch.set_num_threads(max(1, int(spec.resources.num_cpus)))
    device = str(ray.train.torch.get_device()) if config["cuda"] else "cpu"
    learner = Learner(spec, payload["seed"], device, payload["role"])
    if payload["state"] is not None:
        learner.load(payload["state"])
    seen = Interactions.concat(ray.get(list(payload["blocks"])))
    kwargs = dict(payload["kwargs"])
    if kwargs.get("knowledge"):
        kwargs["knowledge"] = ray.get(list(kwargs["knowledge"]))
    learner.parallel = DataParallel(rank, world)
    log = learner.update(seen, payload["block"], **kwargs)
    if rank != 0:
        return None
    state = learner.state()  # tensors cannot be a Ray Train return value: numpy arrays, turned back in the actor
    state["weights"] = {k: v.numpy() for k, v in state["weights"].items()}
    return {"state": state, "trajectory": list(learner._trajectory),
            "trajectory_of": learner._trajectory_of, "log": log}


def worker_resources(spec) -> dict[str, float]:
    """What each Ray Train worker of ``spec`` asks for: the model's own resources."""
    out = {"CPU": float(spec.resources.num_cpus)}
    if spec.resources.num_gpus > 0:
        out["GPU"] = float(spec.resources.num_gpus)
    return out


def data_parallel_update(learner: Learner, block: int, block_refs: list, kwargs: dict) -> dict:
    """Run ``learner.update(seen, block, **kwargs)`` on ``learner.spec.workers`` Ray Train workers and load
    the result into ``learner``. ``block_refs``: the object references of blocks 0..k; ``kwargs["knowledge"]``
    may hold references too (each worker fetches them). Returns the update log (``workers``, and ``seconds``
    counting the workers' start-up, ``worker_seconds`` the training itself)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    spec = learner.spec
    cuda = learner.device.startswith("cuda")
    payload = ray.put({"spec": spec, "seed": learner.seed, "role": learner.role, "block": block,
                       "state": learner.state() if learner.model is not None else None,
                       "blocks": list(block_refs), "kwargs": kwargs})
    storage = tempfile.mkdtemp(prefix="ckd-train-")  # nothing is checkpointed: the state comes back as a value
    trainer = TorchTrainer(
        _update_on_worker,
        train_loop_config={"payload": payload, "cuda": cuda},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=cuda, resources_per_worker=worker_resources(spec)),
        run_config=RunConfig(name=f"ckd-{spec.name}-block{block}-{uuid.uuid4().hex[:8]}", storage_path=storage),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # a worker's error, wrapped by Ray Train: the block is retried by the coordinator
        raise RuntimeError(f"data-parallel update of {spec.name} on {spec.workers} workers failed: {e}") from e
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    out = result.return_value
    if out is None:
        raise CkdError(f"the data-parallel update of {spec.name} returned nothing from its rank-0 worker; "
                       f"set workers: 1 for it and report this")
    state = out["state"]
    learner.load({**state, "weights": {k: torch.from_numpy(v) for k, v in state["weights"].items()}})
    learner._trajectory, learner._trajectory_of = out["trajectory"], out["trajectory_of"]
    return {**out["log"], "workers": spec.workers, "worker_seconds": out["log"].get("seconds"),
            "seconds": time.perf_counter() - t0}
