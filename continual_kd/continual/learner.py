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
from ..distill import (RRDConfig, RRDTargets, UnKDConfig, UnKDTargets, fuse_group_rankings, fuse_rankings,
                       popularity_groups, teacher_group_rankings)
from ..distill.hetcomp import HetCompConfig, HetCompTargets
from ..eval import eval_sets, evaluate_ranking, top_k_items
from ..eval.bias import item_popularity_groups
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
    """What a teacher hands the student for one block (numpy: small, crosses processes)."""

    source: str
    block: int
    users: np.ndarray  # (U,) int64: the users of the block
    items: np.ndarray  # (U, N) int64: top-N unobserved items, best first
    scores: np.ndarray  # (U, N) float32
    group_items: np.ndarray | None = None  # (U, G, M) top items inside each popularity group (UnKD), -1 padded
    trajectory: tuple[np.ndarray, ...] = ()  # (U, N) top lists at checkpoints of the block's training (HetComp)
    observed_items: np.ndarray | None = None  # (U, P) the users' known items, best first by this teacher, -1 padded


def item_counts(seen: Interactions, device="cpu") -> torch.Tensor:
    """(I,) training popularity: interactions per item over every non-test pair seen so far."""
    ok = seen.split != TEST
    counts = np.bincount(seen.items[ok], minlength=seen.num_items)
    return torch.as_tensor(counts, dtype=torch.float32, device=device)


class Learner:
    def __init__(self, spec: ModelSpec, seed: int, device: str = "cpu"):
        self.spec = spec
        self.seed = seed
        self.device = device
        self.model = None
        self.block = -1  # last block this model was updated on
        self._trajectory: list[np.ndarray] = []  # checkpoints' top lists of the last update (teachers)

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

    def _block_users(self, seen: Interactions, block: int) -> torch.Tensor:
        return torch.as_tensor(np.unique(seen.part(TRAIN, block).users), dtype=torch.int64, device=self.device)

    def update(self, seen: Interactions, block: int, knowledge: list[Knowledge] | None = None,
               distill: DistillSpec | None = None, teacher_weights: list[float] | None = None,
               trajectory: tuple[int, int] | None = None) -> dict:
        """Grow to the block's id spaces, then train on the block's train part (warm start).

        With ``knowledge`` (one per teacher) and a ``distill`` spec the student's loss gets the KD
        terms (RRD or HetComp on the fused teachers, plus UnKD when its weight is > 0).
        ``trajectory=(checkpoints, size)`` makes a teacher keep its top-``size`` lists for the block's
        users at ``checkpoints`` evenly spaced epochs (HetComp's trajectories).
        """
        t0, started = time.perf_counter(), time.time()
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
        epochs = self.spec.train.epochs_base if block == 0 else self.spec.train.epochs_block
        kd_terms, base_weight, hooks = [], 1.0, []
        if knowledge and distill is not None:
            kd_terms, base_weight, hooks = self._kd_terms(knowledge, distill, teacher_weights, known)
        self._trajectory = []
        if trajectory is not None and epochs > 0:
            hooks.append(self._checkpoint_hook(seen, block, epochs, *trajectory, known))
        on_epoch_end = (lambda e: [h(e) for h in hooks]) if hooks else None
        logs = train_epochs(self.model, u, i, known, epochs, self.spec.train, gen, kd_terms, base_weight, on_epoch_end)
        self.block = block
        return {
            "model": self.spec.name, "block": block, "epochs": epochs, "train_rows": len(train),
            "seconds": time.perf_counter() - t0, "started_at": started, "ended_at": time.time(),
            "base_loss": logs[-1].base_loss if logs else float("nan"),
            "kd_loss": logs[-1].kd_loss if logs else float("nan"),
        }

    def _checkpoint_hook(self, seen, block, epochs, checkpoints, size, known):
        users = self._block_users(seen, block)
        at = {max(1, round(epochs * (c + 1) / checkpoints)) for c in range(checkpoints)}

        def record(epoch: int) -> None:
            if epoch in at:
                items, _ = top_k_items(self.model, users, min(size, self.model.num_items), known)
                self._trajectory.append(items.cpu().numpy())

        return record

    def _kd_terms(self, knowledge: list[Knowledge], distill: DistillSpec, weights: list[float] | None,
                  known: UserItemSet):
        """(kd terms, weight of the student's own loss, per-epoch hooks) from the teachers' knowledge."""
        dev, nu, ni = self.device, self.model.num_users, self.model.num_items
        users = torch.as_tensor(knowledge[0].users, device=dev)
        terms, base_weight, hooks = [], 1.0, []
        if distill.method == "rrd" and distill.weight > 0:
            lists = [torch.as_tensor(k.items, device=dev) for k in knowledge]
            fused = lists[0] if len(lists) == 1 else fuse_rankings(
                lists, max(distill.pool, distill.k), distill.fusion, weights, num_items=ni)[0]
            cfg = RRDConfig(weight=distill.weight, k=distill.k, pool=distill.pool, uninteresting=distill.uninteresting,
                            mode=distill.mode, temperature=distill.temperature, score_clamp=distill.score_clamp)
            terms.append((RRDTargets(cfg, users, fused, known, nu, ni), distill.weight))
        elif distill.method == "hetcomp":
            h = distill.hetcomp
            cfg = HetCompConfig(k=h.k, observed=h.observed, early_weight=h.early_weight, late_weight=h.late_weight,
                                dkc_every=h.dkc_every)
            trajectories = [[torch.as_tensor(c, device=dev) for c in (k.trajectory or (k.items,))] for k in knowledge]
            observed_ranked = None
            if all(k.observed_items is not None for k in knowledge):  # teachers' order of the known items
                lists = [torch.as_tensor(k.observed_items, device=dev) for k in knowledge]
                observed_ranked = fuse_rankings(lists, h.observed, "importance", weights, num_items=ni)[0]
            target = HetCompTargets(cfg, users, trajectories, known, nu, ni, observed_ranked=observed_ranked)
            terms.append((target, 1.0))
            hooks.append(lambda epoch: target.update(epoch, self.model))
            base_weight = 1.0 if h.with_bpr else 0.0
        if distill.unkd.weight > 0 and all(k.group_items is not None for k in knowledge):
            un = distill.unkd
            groups = [torch.as_tensor(k.group_items, device=dev) for k in knowledge]
            fused = groups[0] if len(groups) == 1 else fuse_group_rankings(
                groups, un.per_group, distill.fusion, weights, num_items=ni)
            cfg = UnKDConfig(weight=un.weight, groups=fused.shape[1], pairs=un.pairs, per_group=un.per_group,
                             temperature=un.temperature)
            terms.append((UnKDTargets(cfg, users, fused), un.weight))
        return terms, base_weight, hooks

    @torch.no_grad()
    def knowledge(self, seen: Interactions, block: int, size: int, unkd_groups: int = 0,
                  per_group: int = 0, observed: int = 0) -> Knowledge:
        """Top-``size`` unobserved items for every user with training data in ``block``; with
        ``unkd_groups`` also the top-``per_group`` items inside each popularity group; with
        ``observed`` the teacher's ranking of the user's own known items (HetComp's ordered
        observed targets)."""
        users = self._block_users(seen, block)
        known = self.observe(seen)
        items, scores = top_k_items(self.model, users, min(size, self.model.num_items), known)
        group_items = None
        if unkd_groups:
            item_group = popularity_groups(item_counts(seen, self.device), unkd_groups)
            group_items = teacher_group_rankings(self.model, users, item_group, per_group, known).cpu().numpy()
        observed_items = None
        if observed:
            observed_items = top_k_items(self.model, users, observed, only=known)[0].cpu().numpy()
        return Knowledge(self.spec.name, block, users.cpu().numpy(), items.cpu().numpy(),
                         scores.float().cpu().numpy(), group_items, tuple(self._trajectory), observed_items)

    @torch.no_grad()
    def evaluate(self, seen: Interactions, blocks: list[int], spec: EvalSpec, split: int = TEST) -> dict[int, dict]:
        """Full-ranking metrics on ``split`` of each of ``blocks`` (everything else seen is masked)."""
        out = {}
        self.observe(seen)
        popularity = item_counts(seen, self.device)
        groups = item_popularity_groups(popularity)
        for b in blocks:
            relevant, exclude = eval_sets(seen, b, split, self.device)
            out[b] = evaluate_ranking(self.model, relevant, exclude, spec.ks, spec.chunk_size, self.device,
                                      item_popularity=popularity, item_group=groups)
        return out

    def validate(self, seen: Interactions, block: int, spec: EvalSpec) -> dict:
        return self.evaluate(seen, [block], spec, VALID)[block]
