"""Plain data that crosses package boundaries: numpy arrays only (no torch, no duckdb, no ray).

``Interactions`` is what ``stream/`` reads out of the store and what ``continual/`` and ``eval/``
consume; the coordinator puts it in the Ray object store once per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TRAIN, VALID, TEST = 0, 1, 2
# held out for good (``blocks.holdout``): never trained on, never used to choose an epoch or a setting of the
# job itself, judged like test — a figure over every block that a choice between jobs may use
HOLDOUT = 3
SPLIT_NAMES = {TRAIN: "train", VALID: "valid", TEST: "test", HOLDOUT: "holdout"}


@dataclass(frozen=True)
class Interactions:
    """A set of interactions with dense ids, each tagged with its block and split.

    ``num_users`` / ``num_items`` are the sizes of the dense id spaces known when these
    interactions were read (ids are stable across ingests, so later blocks only add ids).
    """

    users: np.ndarray  # (n,) int64 dense user ids
    items: np.ndarray  # (n,) int64 dense item ids
    ts: np.ndarray  # (n,) int64 seconds since the epoch
    weight: np.ndarray  # (n,) float32 (rating or 1.0)
    block: np.ndarray  # (n,) int32 block index (0 = base block; a live plan may pass 32,767 blocks)
    split: np.ndarray  # (n,) int8 TRAIN / VALID / TEST / HOLDOUT
    num_users: int
    num_items: int
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.users)
        for name in ("items", "ts", "weight", "block", "split"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Interactions.{name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.users)

    def select(self, mask: np.ndarray) -> "Interactions":
        return Interactions(
            self.users[mask], self.items[mask], self.ts[mask], self.weight[mask],
            self.block[mask], self.split[mask], self.num_users, self.num_items, dict(self.meta),
        )

    def part(self, split: int, block: int | None = None) -> "Interactions":
        """Rows of one split (optionally of one block)."""
        mask = self.split == split
        if block is not None:
            mask &= self.block == block
        return self.select(mask)

    def of_block(self, block: int) -> "Interactions":
        return self.select(self.block == block)

    def up_to_block(self, block: int) -> "Interactions":
        return self.select(self.block <= block)

    @staticmethod
    def empty(num_users: int = 0, num_items: int = 0) -> "Interactions":
        z = np.zeros(0, dtype=np.int64)
        return Interactions(z, z, z, np.zeros(0, np.float32), np.zeros(0, np.int32),
                            np.zeros(0, np.int8), num_users, num_items)

    @staticmethod
    def concat(parts: list["Interactions"]) -> "Interactions":
        if not parts:
            return Interactions.empty()
        return Interactions(
            np.concatenate([p.users for p in parts]),
            np.concatenate([p.items for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.weight for p in parts]),
            np.concatenate([p.block for p in parts]),
            np.concatenate([p.split for p in parts]),
            max(p.num_users for p in parts),
            max(p.num_items for p in parts),
            # item knowledge (graph, rationales) and the labelled sample ride along with the blocks (the newest
            # read wins)
            {key: value for key in ("item_graph", "item_rationales", "labelled")
             if (value := next((p.meta[key] for p in reversed(parts) if p.meta.get(key) is not None), None)) is not None},
        )


@dataclass(frozen=True)
class Knowledge:
    """What one model hands another for one block, in either direction (numpy: small, crosses
    processes): a teacher's lists for the student, or the student's (and its proxies') for the teachers."""

    source: str
    block: int
    users: np.ndarray  # (U,) int64: the users of the block
    items: np.ndarray  # (U, N) int64: top-N unobserved items, best first
    scores: np.ndarray  # (U, N) float32
    group_items: np.ndarray | None = None  # (U, G, M) top items inside each popularity group (UnKD), -1 padded
    trajectory: tuple[np.ndarray, ...] = ()  # (U, N) top lists at checkpoints of the block's training (HetComp)
    observed_items: np.ndarray | None = None  # (U, P) the users' known items, best first by this teacher, -1 padded
    item_ids: np.ndarray | None = None  # (J,) items with per-item lists (IR-RRD)
    item_users: np.ndarray | None = None  # (J, M) top-M users of each of item_ids, best first
    user_vectors: np.ndarray | None = None  # (U, d) for ``users``: with item_vectors, score = u · v (BD)
    item_vectors: np.ndarray | None = None  # (I, d) every item's vector of the same factorisation


@dataclass(frozen=True)
class ItemGraph:
    """The item side of the knowledge graph, as read from the store's catalog for the items known so far:
    one edge per (item, entity) — item ``items[t]`` is linked to entity ``entities[t]`` by relation
    ``relations[t]`` (stable catalog ids). Path models score through it; it carries no interactions."""

    items: np.ndarray  # (T,) int64 dense item ids
    relations: np.ndarray  # (T,) int64 relation ids (catalog kg_relations)
    entities: np.ndarray  # (T,) int64 entity ids (catalog kg_entities)
    num_relations: int  # size of the relation id space

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class ItemRationales:
    """Short texts about each item, from the store's item attributes and knowledge graph (stream/rationale.py),
    read with the blocks for the items known so far: ``texts[i]`` for dense item i ('' where nothing is known),
    and the facts they were built from (``fact_items[f]`` has the fact keyed ``fact_keys[f]``, said as
    ``fact_texts[f]``, shared by ``fact_degrees[f]`` known items). Rationale distillation embeds the texts
    (distill/rationale.py); ``ckd recommend --explain`` shows them and the facts shared with a user's history."""

    texts: tuple[str, ...]  # (I,)
    fact_items: np.ndarray  # (F,) int64 dense item ids
    fact_keys: np.ndarray  # (F,) object: str key of the fact (relation and entity ids, or "genre:<name>")
    fact_texts: np.ndarray  # (F,) object: the fact in words
    fact_degrees: np.ndarray  # (F,) int64: known items with the same fact

    def __len__(self) -> int:
        return len(self.texts)
