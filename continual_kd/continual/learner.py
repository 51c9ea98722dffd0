"""A model and what the per-block algorithm does with it: grow, update, teach, be evaluated.

``Learner`` is plain Python and runs in one process; ``runtime/`` wraps one per Ray actor. Every call
takes the interactions seen so far and the block index, so a call can be repeated (idempotent given
the model state it starts from) and the same code gives the same numbers in-process and under Ray.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DistillSpec, EvalSpec, ModelSpec
from ..distill import RRDConfig, RRDTargets
from ..eval import eval_sets, evaluate_ranking, top_k_items
from ..models import build_backbone, num_parameters
from ..sparse import UserItemSet
from ..types import TEST, TRAIN, VALID, Interactions
from .training import train_epochs


def derive_seed(*parts) -> int:
    """A 63-bit seed from the job seed and names (stable across processes, unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(requested: str = "auto", has_gpu: bool | None = None) -> str:
    if requested == "cpu":
        return "cpu"
    cuda = torch.cuda.is_available() and (has_gpu is None or has_gpu)
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is cuda but no CUDA device is visible to this process")
    return "cuda" if cuda else "cpu"


@dataclass(frozen=True)
class Knowledge:
    """A model's top-N unobserved items for a set of users (numpy: small, crosses processes)."""

    source: str
    block: int
    users: np.ndarray  # (U,) int64
    items: np.ndarray  # (U, N) int64, best first
    scores: np.ndarray  # (U, N) float32


class Learner:
    def __init__(self, spec: ModelSpec, seed: int, device: str = "cpu"):
        self.spec = spec
        self.seed = seed
        self.device = device
        self.model = None
        self.block = -1  # last block this model was updated on

    # ------------------------------------------------------------------ state
    def _build(self, num_users: int, num_items: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.spec.name, "init"))
            return build_backbone(self.spec.backbone, num_users, num_items, **self.spec.backbone_params()).to(self.device)

    def state(self) -> dict:
        """Everything needed to rebuild the model: weights (CPU tensors) and id-space sizes."""
        return {
            "block": self.block, "num_users": self.model.num_users, "num_items": self.model.num_items,
            "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }

    def load(self, state: dict) -> None:
        self.model = self._build(int(state["num_users"]), int(state["num_items"]))
        self.model.load_state_dict(state["weights"])
        self.model.eval()
        self.block = int(state["block"])

    def num_parameters(self) -> int:
        return num_parameters(self.model) if self.model is not None else 0

    # ------------------------------------------------------------------ per-block stages
    def _tensors(self, part: Interactions) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.as_tensor(part.users, dtype=torch.int64, device=self.device)
        i = torch.as_tensor(part.items, dtype=torch.int64, device=self.device)
        return u, i

    def _known(self, seen: Interactions) -> UserItemSet:
        """Pairs a model may know while training: every non-test pair seen so far."""
        ok = seen.split != TEST
        return UserItemSet(seen.users[ok], seen.items[ok], seen.num_users, seen.num_items, self.device)

    def observe(self, seen: Interactions) -> UserItemSet:
        """Hand the model the interactions it may use at scoring time (graph / input rows)."""
        known = self._known(seen)
        self.model.observe(known.users, known.items)
        return known

    def update(self, seen: Interactions, block: int, knowledge: list[Knowledge] | None = None,
               distill: DistillSpec | None = None) -> dict:
        """Grow to the block's id spaces, then train on the block's train part (warm start).

        With ``knowledge`` and an active ``distill`` spec the loss is BPR + λ·KD.
        """
        t0 = time.perf_counter()
        train = seen.part(TRAIN, block)
        u, i = self._tensors(train)
        if self.model is None:
            self.model = self._build(seen.num_users, seen.num_items)
        else:
            grow_gen = torch.Generator().manual_seed(derive_seed(self.seed, self.spec.name, "grow", block))
            self.model.grow(seen.num_users, seen.num_items, u, i, init=self.spec.init, generator=grow_gen)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.spec.name, "train", block))
        known = self._known(seen)
        self.model.observe(known.users, known.items)
        kd, kd_weight = None, 0.0
        if knowledge and distill is not None and distill.method == "rrd" and distill.weight > 0:
            kd = self._rrd_targets(knowledge[0], distill, known)
            kd_weight = distill.weight
        epochs = self.spec.train.epochs_base if block == 0 else self.spec.train.epochs_block
        logs = train_epochs(self.model, u, i, known, epochs, self.spec.train, gen, kd, kd_weight)
        self.block = block
        return {
            "model": self.spec.name, "block": block, "epochs": epochs, "train_rows": len(train),
            "seconds": time.perf_counter() - t0,
            "base_loss": logs[-1].base_loss if logs else float("nan"),
            "kd_loss": logs[-1].kd_loss if logs else float("nan"),
        }

    def _rrd_targets(self, k: Knowledge, distill: DistillSpec, known: UserItemSet) -> RRDTargets:
        cfg = RRDConfig(weight=distill.weight, k=distill.k, pool=distill.pool, uninteresting=distill.uninteresting,
                        mode=distill.mode, temperature=distill.temperature, score_clamp=distill.score_clamp)
        return RRDTargets(cfg, torch.as_tensor(k.users, device=self.device), torch.as_tensor(k.items, device=self.device),
                          known, self.model.num_users, self.model.num_items)

    @torch.no_grad()
    def knowledge(self, seen: Interactions, block: int, size: int) -> Knowledge:
        """Top-``size`` unobserved items for every user with training data in ``block``."""
        users = torch.as_tensor(np.unique(seen.part(TRAIN, block).users), dtype=torch.int64, device=self.device)
        known = self.observe(seen)
        items, scores = top_k_items(self.model, users, min(size, self.model.num_items), known)
        return Knowledge(self.spec.name, block, users.cpu().numpy(), items.cpu().numpy(),
                         scores.float().cpu().numpy())

    @torch.no_grad()
    def evaluate(self, seen: Interactions, blocks: list[int], spec: EvalSpec, split: int = TEST) -> dict[int, dict]:
        """Full-ranking metrics on ``split`` of each of ``blocks`` (everything else seen is masked)."""
        out = {}
        self.observe(seen)
        for b in blocks:
            relevant, exclude = eval_sets(seen, b, split, self.device)
            out[b] = evaluate_ranking(self.model, relevant, exclude, spec.ks, spec.chunk_size, self.device)
        return out

    def validate(self, seen: Interactions, block: int, spec: EvalSpec) -> dict:
        return self.evaluate(seen, [block], spec, VALID)[block]
