"""The job spec: YAML → strict, frozen pydantic models, with errors that name file and field.

Only ``yaml.safe_load`` is used; a job file is data, never code. Every key is checked (unknown keys
are refused), types are strict (no "3" → 3; an integer is accepted where a number is expected),
values are constrained, and the first problem ends in one ``CkdError`` sentence:
``<file>: <field.path>: <problem> (got <value>); <fix>``.

Distillation is a stack of KD terms: ``distill.terms`` (teachers → student) and ``distill.feedback``
(student → every teacher), each a list of term specs told apart by their ``name``.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .errors import CkdError

MAX_SEED = 2**63 - 1  # seeds are stored in the catalog as BIGINT and feed torch / numpy generators

DATASETS = ("movielens-100k", "synthetic", "store", "files")
SPLIT_FILES = ("train", "valid", "test")  # source.dataset files: the fixed split's files
# backbone name → the ModelSpec fields its constructor takes (kept in step with models.BACKBONES by
# tests; config must not import torch)
BACKBONE_PARAMS = {
    "mf": ("dim",),
    "lightgcn": ("dim", "layers"),
    "multvae": ("dim", "hidden", "dropout", "beta"),
    "pathrec": (),  # weights per path type only; its item graph comes with the blocks (models/pathrec.py)
}
BACKBONE_NAMES = tuple(BACKBONE_PARAMS)
FUSIONS = ("rank", "importance")
TEACHER_WEIGHTS = ("uniform", "valid_ndcg", "chosen")
# keys of the replaced one-method distill form (distill: {method: rrd, weight: ..., unkd: {...}})
OLD_DISTILL_KEYS = ("method", "weight", "k", "pool", "uninteresting", "mode", "temperature", "score_clamp",
                    "unkd", "hetcomp")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Bad(ValueError):
    """A failed cross-field check: ``field`` is relative to the model that raised it ("" = itself)."""

    def __init__(self, field: str, problem: str, got, fix: str):
        super().__init__(problem)
        self.field, self.problem, self.got, self.fix = field, problem, got, fix


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value  # YAML/JSON lists → the tuples of the spec


def _tuple(item):
    return Annotated[tuple[item, ...], BeforeValidator(_as_tuple)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _check_name(name: str, field: str = "name") -> None:
    """Names become path components (runs/<job>, <model>.pt) and actor names."""
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise _Bad(field, "not a safe name", name,
                   "use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit, without '..'")


# ---------------------------------------------------------------------------------------- data


class SyntheticSpec(_Spec):
    """The generated stream (data/synthetic.py's SyntheticConfig accepts every spec this admits)."""

    users: int = Field(2000, ge=2)
    items: int = Field(1000, ge=2)
    interactions: int = Field(60000, ge=1)
    periods: int = Field(6, ge=1)
    popularity_exponent: float = Field(1.0, ge=0)  # power-law (Zipf) item popularity
    drift: float = Field(0.3, ge=0, le=1)  # how far user tastes move per period (0 = static)
    new_user_fraction: float = Field(0.3, ge=0, lt=1)  # share of users first active after period 0
    new_item_fraction: float = Field(0.3, ge=0, lt=1)  # share of items first available after period 0
    latent_dim: int = Field(8, ge=1)
    temperature: float = Field(0.5, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _fits(self):
        if self.interactions < self.users:
            raise _Bad("interactions", f"every user interacts at least once, so it must be ≥ users ({self.users})",
                       self.interactions, "raise interactions or lower users")
        if self.interactions > self.users * self.items // 2:
            raise _Bad("interactions", f"must be ≤ users·items/2 ({self.users * self.items // 2})",
                       self.interactions, "lower interactions or add users/items")
        for name in ("new_user_fraction", "new_item_fraction"):
            if getattr(self, name) > 0 and self.periods == 1:
                raise _Bad(name, "must be 0 when periods is 1 (nothing can arrive later)", getattr(self, name),
                           "set periods ≥ 2 or the fraction to 0")
        return self


class SourceSpec(_Spec):
    # movielens-100k | synthetic | store (an existing store, filled by `ckd ingest`) | files (a fixed
    # train/valid/test split: one block whose splits are exactly the three files' rows, no stream)
    dataset: Literal[DATASETS] = "movielens-100k"
    # the stream store directory (built when missing); files: default stores/files-<hash of the three paths>
    store: str = Field("stores/ml-100k", min_length=1)
    synthetic: SyntheticSpec = SyntheticSpec()
    train: str = ""  # dataset files: CSV/TSV/Parquet files with user and item columns
    valid: str = ""
    test: str = ""

    @model_validator(mode="before")
    @classmethod
    def _files_store(cls, data):
        if isinstance(data, dict) and data.get("dataset") == "files" and "store" not in data:
            paths = "\0".join(str(data.get(k, "")) for k in SPLIT_FILES)
            data = {**data, "store": "stores/files-" + hashlib.sha256(paths.encode()).hexdigest()[:12]}
        return data

    @model_validator(mode="after")
    def _files(self):
        for k in SPLIT_FILES:
            if self.dataset == "files" and not getattr(self, k):
                raise _Bad(k, "dataset files needs the train, valid and test files", _Raw("no file"),
                           "write e.g. source: {dataset: files, train: train.csv, valid: valid.csv, test: test.csv}")
            if self.dataset != "files" and getattr(self, k):
                raise _Bad(k, f"only dataset files reads split files (dataset is {self.dataset})", getattr(self, k),
                           "set dataset: files or remove the key")
        return self


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text) -> float:
    """``30m``, ``6h``, ``1d``, ``7d``, ``2w``, ``90s`` or a plain number of seconds → seconds (> 0); ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if m is None or not float(m.group(1)) > 0:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * DURATION_UNITS[m.group(2) or "s"]


def _duration_text(value):
    """blocks.window: a duration (whole seconds) kept as written; a bare number means seconds."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise _Bad("", "not a duration", value, "write e.g. 30m, 6h, 1d or 7d (s, m, h, d, w)") from None
    if not seconds.is_integer():
        raise _Bad("", "must be a whole number of seconds", value, "write e.g. 30m, 6h, 1d or 7d")
    return value if isinstance(value, str) else f"{int(seconds)}s"


def _epoch_seconds(value):
    """blocks.base_until: epoch seconds, or an ISO-8601 time (YAML may hand over a date / datetime); UTC
    unless the time names its zone."""
    import datetime as dt

    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Bad("", "not a timestamp", value, "write epoch seconds or an ISO-8601 time such as "
                                                     "'2024-01-01T00:00:00Z'") from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return int(value.timestamp())
    raise _Bad("", "not a timestamp", value, "write epoch seconds or an ISO-8601 time such as '2024-01-01T00:00:00Z'")


class BlockSpec(_Spec):
    # The research protocol (a fixed plan, cut from the data present at the first submit) ...
    base_fraction: float | None = Field(0.5, gt=0, lt=1)  # the base block's share of interactions (by time)
    incremental: int | None = Field(5, ge=1)  # incremental blocks of equal size after the base block
    # ... or a live policy: blocks appended to the same lineage as data arrive (stream/live.py): one per
    # time `window` (30m, 6h, 1d, 7d, ...) or per `rows` new interactions, after an optional base block
    # (`base_fraction` of the data stored at the first cut, or every row before `base_until`)
    window: Annotated[str | None, BeforeValidator(_duration_text)] = None
    rows: int | None = Field(None, ge=1)
    base_until: Annotated[int | None, BeforeValidator(_epoch_seconds)] = None
    # per user inside each block: train / valid / test
    split: Annotated[tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)],
                           Annotated[float, Field(ge=0)]], BeforeValidator(_as_tuple)] = (0.8, 0.1, 0.1)
    # a share of every (block, user) group's rows, taken from train, held out for good: never trained on, never
    # used to choose an epoch or a grid setting, judged like test (`ckd evaluate`'s held-out figures). The
    # newest block's validation is all a streaming model can choose on; a choice between whole jobs (ckd tune,
    # a bench) can use this one, over every block of the final snapshot, without touching test (0: none)
    holdout: float = Field(0.0, ge=0, lt=1)

    @property
    def plan_split(self) -> tuple[float, ...]:
        """The plan's shares: (train, valid, test), or (train − holdout, valid, test, holdout)."""
        if not self.holdout:
            return tuple(self.split)
        return (self.split[0] - self.holdout, self.split[1], self.split[2], self.holdout)

    @model_validator(mode="before")
    @classmethod
    def _live_defaults(cls, data):
        """A live policy has no base block unless one is asked for, and no fixed number of blocks."""
        if isinstance(data, dict) and (data.get("window") is not None or data.get("rows") is not None):
            if data.get("incremental") is not None:
                raise _Bad("incremental", "a live policy (window / rows) appends blocks as data arrive, it has no "
                           "fixed number", data["incremental"], "drop incremental, or drop window / rows")
            data = {**data, "incremental": None, "base_fraction": data.get("base_fraction")}
        return data

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(sum(self.split) - 1) > 1e-6 or self.split[0] <= 0:
            raise _Bad("split", "three non-negative fractions (train, valid, test) summing to 1, train > 0",
                       list(self.split), "e.g. [0.8, 0.1, 0.1]")
        if self.holdout >= self.split[0]:
            raise _Bad("holdout", "the held-out share is taken from train and must leave some of it", self.holdout,
                       f"use a value below the train share {self.split[0]:g}, e.g. 0.05")
        if self.window is not None and self.rows is not None:
            raise _Bad("rows", "window and rows exclude each other", self.rows, "keep one block policy")
        if self.live and self.base_fraction is not None and self.base_until is not None:
            raise _Bad("base_until", "base_fraction and base_until exclude each other", self.base_until,
                       "keep one way to cut the base block")
        if not self.live:
            if self.base_until is not None:
                raise _Bad("base_until", "only a live policy has it", self.base_until,
                           "add window: 1d (or rows: N), or drop base_until")
            for name in ("base_fraction", "incremental"):
                if getattr(self, name) is None:
                    raise _Bad(name, "the research protocol needs it", None,
                               "give a value (e.g. base_fraction: 0.5, incremental: 5) or a live policy (window / rows)")
        return self

    @property
    def live(self) -> bool:
        """A live policy: blocks are appended as data arrive (``ckd submit --follow``)."""
        return self.window is not None or self.rows is not None

    @property
    def window_seconds(self) -> int | None:
        return None if self.window is None else int(parse_duration(self.window))


# -------------------------------------------------------------------------------------- models


GRID_FIELDS = ("lr", "weight_decay", "negative_exponent", "hard_negatives", "softmax_negatives", "kd_scale")  # TrainSpec fields a grid may choose on validation


class TrainSpec(_Spec):
    epochs_base: int = Field(40, ge=0)  # epochs on the base block (from scratch): the cap with select best_valid
    epochs_block: int = Field(10, ge=0)  # epochs on each incremental block (warm-started): the cap likewise
    lr: float = Field(0.005, gt=0)
    # the learning rate of warm updates (a trained model continuing on a new block); None: lr. A model
    # that has converged is perturbed by Adam's first steps at the from-scratch rate (each coordinate moves
    # ~lr per step whatever its gradient's size) and forgets what the block does not repeat
    lr_block: float | None = Field(None, gt=0)
    # warm updates ramp their rate linearly from ~0 up to lr over this many epochs' worth of steps (the
    # first epoch's batches; 0: none): Adam's restart moves without its shake, then the full rate
    warmup_block: float = Field(0.0, ge=0)
    # warm updates start from a shrunk, perturbed copy of what the model had ("shrink and perturb", Ash & Adams,
    # NeurIPS'20): every parameter θ ← shrink_block · θ + perturb_block · std(θ) · ε, ε ~ N(0, 1), seeded (None:
    # as it was). A network warm-started from a converged state generalises worse than one trained afresh, and
    # shrinking restores its gradients' reach while keeping what it knew (MultVAE, λ 0.7: pooled NDCG@20 on the
    # synthetic stream 0.965 → 1.006 of retraining, but the student's MovieLens validation −1%; the default jobs
    # choose it per update instead, grid_block: {shrink_block: [1.0, 0.7]} — RESULTS.md)
    shrink_block: float | None = Field(None, gt=0, le=1)
    perturb_block: float = Field(0.0, ge=0)
    weight_decay: float = Field(1e-4, ge=0)  # L2 on the rows a batch touches (summed), not on absent users/items
    batch_size: int = Field(1024, ge=1)
    # the batch size of warm updates (None: batch_size). A graph model's step propagates the whole graph whatever
    # the batch, so its update's cost follows its steps, and the graph grows with the history
    batch_size_block: int | None = Field(None, ge=1)
    # an epoch has at least this many batches: on a small block (or a small data set) the batch shrinks to
    # ceil(rows / min_batches) so that the epochs still take enough steps to learn (0: always batch_size).
    # Batches of 1024 over a 3,000-pair block are 3 Adam steps an epoch: the cap and the patience then
    # count a few dozen steps, and the model stops before it has learned the block
    min_batches: int = Field(0, ge=0)
    # best_valid: every update keeps the epoch with the best NDCG@20 on the block's validation pairs
    # (stopping after `patience` epochs without a gain; 0 = run to the cap) | last: the last epoch
    select: Literal["best_valid", "last"] = "best_valid"
    # BPR negatives: uniform over unknown items | popularity: p ∝ (training count + 1)^negative_exponent
    # (popular items are drawn more often as negatives, which pushes against popularity bias)
    negatives: Literal["uniform", "popularity"] = "uniform"
    negative_exponent: float = Field(0.5, ge=0)
    # dynamic negative sampling (DNS, Zhang et al. SIGIR'13): each positive's negative is the one the model scores
    # highest, at that batch, of this many candidates drawn as `negatives` says (1: the draw itself). Hard
    # negatives are the items the model wrongly ranks near the top — often popular ones
    hard_negatives: int = Field(1, ge=1)
    # the model's own loss: 0 — BPR on one negative per positive; N > 0 — a sampled softmax, each positive against
    # N negatives drawn as `negatives` says (unknown items only): −log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ e^{s⁻/τ})), τ
    # softmax_temperature. Uncorrected for the sampler, so popularity negatives push popular items down harder (Wu
    # et al., TOIS'23: the sampled softmax also lifts the tail). Every backbone scored per pair (MF, LightGCN, PathRec);
    # MultVAE already has a softmax over every item; softmax_temperature matters only with it
    softmax_negatives: int = Field(0, ge=0)
    softmax_temperature: float = Field(1.0, gt=0)
    # de-biasing of the model's own loss (continual/debias.py): none | ips: each positive pair's term
    # weighted by 1/p of its item, p = clip((training count / max)^ips_exponent, ips_clip, 1), weights
    # self-normalised to mean 1 over the update's positives (Saito et al. WSDM'20) | pda: trained on
    # ELU'(score)·m^pda_gamma, m = (count + 1)/(max count + 1), scored without it (Zhang et al. SIGIR'21)
    debias: Literal["none", "ips", "pda"] = "none"
    ips_exponent: float = Field(0.5, ge=0)
    ips_clip: float = Field(0.05, gt=0, le=1)
    pda_gamma: float = Field(0.1, ge=0)
    # this model's replay of earlier blocks in warm updates (× the block's training rows per epoch); None:
    # continual.replay. A graph model, whose update re-propagates the whole history, may want more of it
    # than a model batched by user, whose replay already touches nearly every user
    replay: float | None = Field(None, ge=0)
    # every KD term this model learns by (distill.terms for the student, distill.feedback for a teacher) has its
    # weight multiplied by this (1: as the job writes them). In the grid it chooses on the base block's
    # validation how hard the model follows the other side's lists: a sparse stream's student gains from a
    # stronger pull where MovieLens-100K's does not (docs/RESULTS.md)
    kd_scale: float = Field(1.0, ge=0)
    patience: int = Field(10, ge=0)
    # patience of warm updates (a trained model continuing on a new block); None: patience. A warm model
    # often peaks within a few epochs of an update, and each further epoch of waiting costs a full pass
    patience_block: int | None = Field(None, ge=0)
    valid_every: int = Field(1, ge=1)  # epochs between validations
    # best-epoch choice on a seeded sample of this many of the block's validation users (the same users at
    # every epoch; None: all). Huge blocks: each validation ranks its users over every item
    valid_users: int | None = Field(None, ge=1)
    # adam | lazy_adam: row-sparse Adam (continual/optim.py) — an MF table's step costs the batch's rows,
    # not the table (large streams: 100k+ users or items); other backbones and Ray Train workers use Adam
    optimizer: Literal["adam", "lazy_adam"] = "adam"
    # settings chosen on the base block's validation (e.g. {weight_decay: [0.0001, 0.001, 0.01]}): one
    # model trained per combination, the best kept; the choice is recorded in the snapshot and used after
    grid: dict[Literal[GRID_FIELDS], _tuple(Annotated[float, Field(ge=0)])] = {}
    # which combination is best: accuracy (the highest validation NDCG@20) | less_popular (of those within
    # grid_tolerance of that NDCG@20, relative, the one whose validation top-20 has the lowest average
    # training popularity: bias traded for at most that much accuracy, measured on validation)
    grid_prefer: Literal["accuracy", "less_popular"] = "accuracy"
    grid_tolerance: float = Field(0.01, ge=0, lt=1)
    # chosen again at every warm update on that block's validation (not kept): e.g. {lr_block: [0.005,
    # 0.001]} trains the update once per warm rate and keeps the better (a value equal to lr: no slowing);
    # {shrink_block: [1.0, 0.9]}: once per shrink of the warm start (with perturb_block's noise), the better kept
    grid_block: dict[Literal["lr_block", "shrink_block"], _tuple(Annotated[float, Field(gt=0)])] = {}
    # > 0: grid_block's combinations race instead of each training to its end — every one trains this many epochs
    # (each on its own copy of the model), then only the one with the best validation NDCG@20 so far (grid_prefer
    # as for the grid) goes on; its model is the one its run alone would give. 0: every combination to its end
    grid_block_probe: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _grid(self):
        for name, values in self.grid.items():
            if not values:
                raise _Bad(f"grid.{name}", "an empty list of candidates", [], "give at least one value or drop the key")
            if name == "lr" and any(v <= 0 for v in values):
                raise _Bad(f"grid.{name}", "a learning rate ≤ 0", list(values), "use values > 0")
            if name == "hard_negatives" and any(v < 1 or v != int(v) for v in values):
                raise _Bad(f"grid.{name}", "a candidate count that is not a whole number ≥ 1", list(values),
                           "use whole numbers ≥ 1 (1: the drawn negative itself)")
            if name == "softmax_negatives" and any(v != int(v) for v in values):
                raise _Bad(f"grid.{name}", "a negative count that is not a whole number", list(values),
                           "use whole numbers ≥ 0 (0: BPR)")
        softmax = [self.softmax_negatives, *self.grid.get("softmax_negatives", ())]
        hard = [self.hard_negatives, *self.grid.get("hard_negatives", ())]
        if max(softmax) > 0 and max(hard) > 1:
            raise _Bad("softmax_negatives", "a sampled softmax beside hard negatives", {"softmax_negatives": softmax,
                       "hard_negatives": hard}, "use one: hard_negatives picks one negative for BPR, the softmax "
                       "weighs all of its negatives by their scores already")
        if max(softmax) == 0 and self.softmax_temperature != 1.0:  # (1.0, the default, is what a dumped spec repeats)
            raise _Bad("softmax_temperature", "a softmax temperature without a sampled softmax",
                       self.softmax_temperature, "set softmax_negatives: N > 0 (or grid it), or drop the temperature")
        if max(softmax) > 0 and self.debias != "none":
            raise _Bad("softmax_negatives", "a sampled softmax with a de-biased loss", self.debias,
                       "set debias: none (IPS and PDA shape BPR's terms)")
        for name, values in self.grid_block.items():
            if not values:
                raise _Bad(f"grid_block.{name}", "an empty list of candidates", [], "give at least one value or drop the key")
            if name == "shrink_block" and any(v > 1 for v in values):
                raise _Bad(f"grid_block.{name}", "a shrink above 1", list(values), "use values in (0, 1]")
        if (self.grid or self.grid_block) and self.select != "best_valid":
            raise _Bad("grid", "a grid without validation to choose by", self.select,
                       "set select: best_valid (the grid is chosen on the base block's validation NDCG@20)")
        if "negative_exponent" in self.grid and self.negatives != "popularity":
            raise _Bad("grid.negative_exponent", "a choice of negative exponent with uniform negatives",
                       self.negatives, "set negatives: popularity (exponent 0 is uniform over items)")
        return self


class ResourceSpec(_Spec):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class ModelSpec(_Spec):
    name: str = "student"
    backbone: Literal[BACKBONE_NAMES] = "mf"
    dim: int = Field(16, ge=1)  # embedding size (MultVAE: latent size)
    layers: int = Field(2, ge=1)  # LightGCN propagation layers
    hidden: int = Field(600, ge=1)  # MultVAE hidden width
    dropout: float = Field(0.5, ge=0, lt=1)  # MultVAE input dropout
    beta: float = Field(0.2, ge=0)  # MultVAE KL weight
    # new users/items start: neighbor_capped (1-hop mean, no longer than the own table's median row) | neighbor (the plain mean) | random
    init: Literal["neighbor", "neighbor_capped", "random"] = "neighbor_capped"
    # ranking after training: score − β · log(1 + training count of the item), β chosen after every update on the
    # block's validation among these candidates (0 always one): the largest whose validation NDCG@20 is within
    # rank_penalty_tolerance (relative) of β = 0's. Training never sees it; evaluation, knowledge and serving do
    rank_penalty: _tuple(Annotated[float, Field(ge=0)]) = ()
    rank_penalty_tolerance: float = Field(0.01, ge=0, lt=1)
    # mar: after every update the model's ranking is calibrated on the missing-at-random labelled sample in the
    # store (`ckd ingest-labelled`; rows collected up to the block): σ(a·score + b + β·log(1 + count) + δ_item)
    # fitted to the labels, the model then ranks by score + (β·log(1 + count) + δ_item) / a (continual/calibrate.py);
    # calibrate_l2: candidates for δ's L2, chosen by 4-fold log-loss on the sample. none: off
    calibrate: Literal["none", "mar"] = "none"
    calibrate_l2: _tuple(Annotated[float, Field(gt=0)]) = (0.3, 1.0, 3.0, 10.0, 30.0)
    train: TrainSpec = TrainSpec()
    resources: ResourceSpec = ResourceSpec()
    # > 1: under Ray (ckd submit) the model's updates run data-parallel on this many Ray Train workers
    # (runtime/train.py: DDP, gloo on CPU / NCCL on GPU), each asking for `resources`; in-process runs train on one
    workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _name(self):
        _check_name(self.name)
        if self.calibrate != "none" and self.rank_penalty:
            raise _Bad("calibrate", "both a calibration and a popularity penalty on one ranking",
                       f"{self.calibrate} with rank_penalty {list(self.rank_penalty)}",
                       "keep one: calibrate: mar learns its popularity term from the labelled sample")
        if self.calibrate != "none" and not self.calibrate_l2:
            raise _Bad("calibrate_l2", "no candidate", [], "give at least one L2 weight > 0")
        softmax = max(self.train.softmax_negatives, *self.train.grid.get("softmax_negatives", (0,)))
        if softmax > 0 and self.backbone == "multvae":
            raise _Bad("train.softmax_negatives", "a sampled softmax for MultVAE", softmax,
                       "drop it: MultVAE's own loss is a softmax over every item already")
        return self

    def backbone_params(self) -> dict:
        return {p: getattr(self, p) for p in BACKBONE_PARAMS[self.backbone]}


# ------------------------------------------------------------------------------------ KD terms
# Every term: ``name`` (its key in distill.base.TERMS) and ``weight`` (λ on its summed loss).


class _Term(_Spec):
    # distill.feedback only: the teachers (by name) this term trains; empty: every teacher. E.g. `keep` for the
    # teachers that forget, not for one that keeps up with retraining on its own
    models: _tuple(str) = ()


class RRDTermSpec(_Term):
    """RRD: the other side's top-k in order (Plackett-Luce) above sampled uninteresting items."""

    name: Literal["rrd"] = "rrd"
    weight: float = Field(0.01, ge=0)
    k: int = Field(40, ge=1)  # interesting items per user
    pool: int = Field(500, ge=1)  # top-N that uninteresting items avoid (and, mode sample, K are drawn from)
    uninteresting: int = Field(40, ge=1)
    mode: Literal["direct", "sample"] = "direct"  # direct: top-k as is | sample: k of the pool, p ∝ exp(-rank/T)
    temperature: float = Field(10.0, gt=0)
    score_clamp: float | None = Field(None, gt=0)  # scores clamped to ≤ this in the loss (CCD: 10)
    # uninteresting items drawn ∝ (training count + 1)^e instead of uniformly (0). Uniform draws from outside
    # the top-N are mostly unpopular items, so RRD also teaches that the tail ranks low
    uninteresting_exponent: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _pool(self):
        if self.pool < self.k:
            raise _Bad("pool", f"must be ≥ k ({self.k})", self.pool, "raise pool or lower k")
        return self


class IRRRDTermSpec(_Term):
    """IR-RRD: the same listwise loss item-side (each item's top users against uninteresting users)."""

    name: Literal["ir_rrd"] = "ir_rrd"
    weight: float = Field(0.01, ge=0)
    k: int = Field(40, ge=1)  # interesting users per item
    pool: int = Field(500, ge=1)
    uninteresting: int = Field(40, ge=1)
    score_clamp: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _pool(self):
        if self.pool < self.k:
            raise _Bad("pool", f"must be ≥ k ({self.k})", self.pool, "raise pool or lower k")
        return self


class UnKDTermSpec(_Term):
    """UnKD: pairs sampled inside popularity groups of equal interaction mass."""

    name: Literal["unkd"] = "unkd"
    weight: float = Field(0.05, ge=0)
    groups: int = Field(4, ge=1)  # popularity groups of equal interaction mass
    pairs: int = Field(32, ge=1)  # pairs per user and epoch, pairs // groups per group
    per_group: int = Field(200, ge=2)  # top items kept per group
    temperature: float = Field(20.0, gt=0)  # p(rank r) ∝ exp(-(r+1)/T)

    @model_validator(mode="after")
    def _pairs(self):
        if self.pairs < self.groups:
            raise _Bad("pairs", f"at least one pair per group is needed, so it must be ≥ groups ({self.groups})",
                       self.pairs, "raise pairs or lower groups")
        return self


class HetCompTermSpec(_Term):
    """HetComp: trajectories, dynamic knowledge construction, the two-phase loss."""

    name: Literal["hetcomp"] = "hetcomp"
    weight: float = Field(1.0, ge=0)
    checkpoints: int = Field(4, ge=1)  # checkpoints per model and block (its trajectory), evenly spaced
    k: int = Field(100, ge=1)  # target size: top-k of the summed importance
    observed: int = Field(10, ge=0)  # observed items added to the target
    early_weight: float = Field(0.01, gt=0)
    late_weight: float = Field(0.005, gt=0)
    dkc_every: int = Field(10, ge=1)  # epochs between dynamic knowledge construction steps
    with_bpr: bool = False  # the authors' student learns from the KD loss only


class BDTermSpec(_Term):
    """BD: BCE towards σ(other/τ) on items drawn by the rank gap between the two models."""

    name: Literal["bd"] = "bd"
    weight: float = Field(0.5, ge=0)
    temperature: float = Field(5.0, gt=0)  # τ of the soft label σ(other/τ)
    eps_teacher: float = Field(1e-4, gt=0)
    eps_student: float = Field(1e-2, gt=0)
    sign: Literal["code", "paper"] = "code"  # code: train on items the model ranks higher than the other
    refresh: int = Field(10, ge=1)  # epochs between refreshing the own ranks


class ReplayTermSpec(_Term):
    """CCD's replay: items the knowledge ranks in its top and above the model, label σ(score)."""

    name: Literal["replay"] = "replay"
    weight: float = Field(0.5, ge=0)  # λ_e = weight · exp(-epoch / decay)
    decay: float = Field(10.0, gt=0)
    top: int = Field(50, ge=1)  # the proxy's top-ab
    eps: float = Field(1e-4, gt=0)  # p ∝ exp(eps · (rank_model - rank_other))
    every: int = Field(5, ge=1)  # epochs between re-draws
    per_user: int = Field(10, ge=1)  # replayed items per user and draw
    source: Literal["proxies", "peers"] = "proxies"  # peers: the knowledge handed over (e.g. the student's)


class KeepTermSpec(_Term):
    """A model keeps its own pre-block top-k order (RRD against its knowledge from before the update)."""

    name: Literal["keep"] = "keep"
    weight: float = Field(0.01, ge=0)
    k: int = Field(40, ge=1)
    uninteresting: int = Field(40, ge=1)
    # whose order is kept: all (every user the model had a list for) | absent (only users without training
    # pairs in this block: what the block says about a user replaces the old order, the rest is kept)
    users: Literal["all", "absent"] = "all"
    # weights chosen again at every warm update (one fit each, on the block's validation): the largest whose
    # NDCG@20 is within `tolerance` (relative) of the best fit's; 0 is a fit without the term. Empty: `weight`.
    # How much keeping an old order costs differs by stream (users who come back vs users who pass through),
    # so no one weight fits every stream
    weights: _tuple(Annotated[float, Field(ge=0)]) = ()
    tolerance: float = Field(0.01, ge=0, lt=1)


class RDTermSpec(_Term):
    """RD: the other side's top-k as extra positives, weighted by position and rank discrepancy."""

    name: Literal["rd"] = "rd"
    weight: float = Field(1.0, ge=0)  # α in BPR + α·RD (summed over the batch's training pairs)
    k: int = Field(10, ge=1)  # top items per user
    lam: float = Field(1.0, gt=0)  # static weight ∝ exp(-rank/lam)
    mu: float = Field(0.1, gt=0)  # dynamic weight max(tanh(mu·(estimated rank - rank)), 0)
    dynamic_samples: int = Field(100, ge=1)  # unobserved items per user for the rank estimate (per epoch)
    dynamic_start: int = Field(10, ge=0)  # epoch (0-based, of each update) the dynamic weight starts
    renormalize: bool = True  # static·dynamic renormalised to sum 1 per user (the reference)


class CDTermSpec(_Term):
    """CD: items drawn from the other side's ranking by rank, BCE to its soft label σ(score/T)."""

    name: Literal["cd"] = "cd"
    weight: float = Field(0.5, ge=0)  # λ in BPR + λ·CD (summed over the batch's training pairs)
    pool: int = Field(3000, ge=1)  # top-N list the items are drawn from
    samples: int = Field(2, ge=1)  # distinct items per user, redrawn every epoch
    rank_temperature: float = Field(500.0, gt=0)  # p(list position r) ∝ exp(-r/rank_temperature)
    temperature: float = Field(2.0, gt=0)  # T of the soft label σ(score/T)


class DETermSpec(_Term):
    """DE: experts map the model's user/item rows to the other side's, picked by Gumbel-softmax."""

    name: Literal["de"] = "de"
    weight: float = Field(0.01, ge=0)  # λ in BPR + λ·DE
    experts: int = Field(30, ge=1)  # experts per side
    item_weight: float = Field(0.5, ge=0)  # items' share: users + item_weight·(positives + negatives)
    tau_start: float = Field(1.0, gt=0)  # Gumbel-softmax temperature, annealed per epoch from tau_start
    tau_end: float = Field(1e-10, gt=0)  # ... to tau_end
    hard_tau: float = Field(1e-2, ge=0)  # below this τ, one expert per entity (the τ → 0 limit); 0: never


class FTDTermSpec(_Term):
    """FTD: the student's cosine matrix of the batch's users and items matches the teacher's."""

    name: Literal["ftd"] = "ftd"
    weight: float = Field(1e-3, ge=0)  # λ in BPR + λ·FTD (summed over every entity pair)


class HTDTermSpec(_Term):
    """HTD: group assignment (DE's experts) + entity-level and group-level topology."""

    name: Literal["htd"] = "htd"
    weight: float = Field(1e-3, ge=0)  # λ in BPR + λ·HTD
    groups: int = Field(30, ge=1)  # K groups (experts) per side
    alpha: float = Field(0.5, ge=0, le=1)  # HTD = alpha·topology + (1 - alpha)·group assignment
    choice: Literal["second", "first"] = "second"  # group level: prototype↔entity | prototype↔prototype
    positive_only: bool = True  # entity level: only same-group pairs with a positive teacher cosine (reference)
    tau_start: float = Field(1.0, gt=0)  # Gumbel-softmax temperature, annealed per epoch from tau_start
    tau_end: float = Field(1e-10, gt=0)  # ... to tau_end


class SKDTermSpec(_Term):
    """SKD: the student's scores match the path teacher's (per user, up to an affine map) on pairs drawn
    from its top-k (structured-knowledge distillation, distill/skd.py)."""

    name: Literal["skd"] = "skd"
    weight: float = Field(0.1, ge=0)
    teacher: str | None = None  # the teacher whose lists it reads (e.g. the pathrec one); None: the first
    k: int = Field(100, ge=2)  # the teacher's top-k the pairs are drawn from
    pairs: int = Field(20, ge=2)  # pairs per user and epoch


class RationaleTermSpec(_Term):
    """Rationale distillation: the model's item embeddings predict (through a projection the term owns) each
    item's rationale embedding — its title, genres and knowledge-graph facts as text, TF-IDF + LSA
    (distill/rationale.py). Needs item knowledge in the store (``ckd data movielens-100k --kg``, ``ckd ingest-kg``)."""

    name: Literal["rationale"] = "rationale"
    weight: float = Field(0.05, ge=0)  # λ on Σ over the batch's items of (1 − cos(W v_i, r_i))
    dim: int = Field(64, ge=2)  # LSA components of the rationale embedding
    seed: int = Field(0, ge=0, le=MAX_SEED)  # the LSA's randomized SVD and the projection's init


TERM_SPECS = {c.model_fields["name"].default: c for c in (
    RRDTermSpec, IRRRDTermSpec, UnKDTermSpec, HetCompTermSpec, BDTermSpec, ReplayTermSpec, KeepTermSpec,
    FTDTermSpec, HTDTermSpec, RDTermSpec, CDTermSpec, DETermSpec, SKDTermSpec, RationaleTermSpec)}
TERM_NAMES = tuple(TERM_SPECS)
TermSpec = Annotated[Union[RRDTermSpec, IRRRDTermSpec, UnKDTermSpec, HetCompTermSpec, BDTermSpec,
                           ReplayTermSpec, KeepTermSpec, FTDTermSpec, HTDTermSpec, RDTermSpec, CDTermSpec,
                           DETermSpec, SKDTermSpec, RationaleTermSpec], Field(discriminator="name")]


class DistillSpec(_Spec):
    terms: _tuple(TermSpec) = ()  # teachers → student, stacked: BPR + Σ weight · term
    feedback: _tuple(TermSpec) = ()  # student → every teacher (the collaborative direction)
    # several teachers → one ranking: rank (CCD, mean (1/rank)^0.05) | importance (HetComp)
    fusion: Literal[FUSIONS] = "rank"
    # uniform | valid_ndcg (each teacher's validation NDCG@20 on the last block) | chosen: w_t ∝ ndcg_t^p, ndcg_t
    # each teacher's lists' NDCG@20 on the block's validation pairs, p ∈ {0 (uniform), 1, 2, 4, ∞ (the best
    # teacher alone)} the one whose fused lists have the most validation NDCG@20 summed over every block so far
    teacher_weights: Literal[TEACHER_WEIGHTS] = "uniform"
    # none | least_teacher: the fused ranking the student learns (RRD, RD) ordered by the fused score less
    # β·log(1 + training count), β (per block) the least whose fused top-20 is no more popular on average than
    # the least popular teacher's (distill/fusion.py): fusing by rank favours the items every teacher lists
    # served: as least_teacher, the target corrected after every update by where the student's own top-20 landed
    # against the least popular teacher's on the same users (× their ratio, accumulated over the updates, within
    # [1/2, 2]): what is matched is the served student, not only the target it learns from
    fusion_popularity: Literal["none", "least_teacher", "served"] = "none"
    # least_teacher is used while the matched fusion's validation NDCG@20 (summed over every block's validation users
    # so far) is within this share of the plain fusion's (0.05: issue 17's bound on what de-biasing may cost); null:
    # always
    fusion_popularity_tolerance: float | None = Field(0.05, ge=0, lt=1)
    # a teacher whose lists' validation NDCG@20 (summed over every block's validation users so far) is under this
    # share of the best teacher's hands the student nothing this block: a teacher collapsed on a stream only
    # dilutes the fused target (and would set fusion_popularity's target); null: every teacher always
    teacher_floor: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _old_form(cls, data):
        if isinstance(data, dict):
            old = [k for k in OLD_DISTILL_KEYS if k in data]
            if old:
                raise _Bad(old[0], "the one-method form was replaced by a list of terms",
                           _Raw(f"{old[0]}: {_show(data[old[0]])}"),
                           "write e.g. distill: {terms: [{name: rrd, weight: 0.01, k: 40}, {name: unkd, weight: 0.05}]}")
        return data

    @model_validator(mode="after")
    def _floor_terms(self):
        named = [t.name for t in self.terms if t.name in ("ftd", "htd", "skd")]
        if self.teacher_floor is not None and named:
            raise _Bad("teacher_floor", f"{named[0]} reads one teacher's vectors or lists, which the floor may leave "
                       "out", self.teacher_floor, f"drop teacher_floor, or the {named[0]} term")
        return self

    @property
    def needs_teachers(self) -> bool:
        return bool(self.terms)

    def term(self, name: str):
        """The first term spec of that name in ``terms``, or None."""
        return next((t for t in self.terms if t.name == name), None)


class ProxySpec(_Spec):
    """CCD's EMA proxies of the student: P ← w·P + (1-w)·student after each block."""

    stability: float = Field(0.9, ge=0, le=1)
    plasticity: float = Field(0.1, ge=0, le=1)


class ContinualSpec(_Spec):
    # warm: every model continues from the last block | retrain (alias scratch): every model rebuilt and
    # trained from scratch on everything seen so far (the reference a continual update is judged against)
    strategy: Annotated[Literal["warm", "retrain"], BeforeValidator(lambda v: "retrain" if v == "scratch" else v)] = "warm"
    # warm updates also train on pairs of earlier blocks: per epoch, `replay` × the block's training rows
    # drawn from the history (0 = the new block alone); `replay_by`: user (every user of the history
    # equally likely) | pair (every pair equally likely)
    replay: float = Field(0.0, ge=0)
    replay_by: Literal["user", "pair"] = "user"
    # whose lists knowledge holds on warm updates: block (the users of the new block) | all (every user
    # seen so far, so that replayed users are distilled too; retrain always uses all)
    knowledge_users: Literal["block", "all"] = "block"
    # teachers_first | student_first (CCD: the student learns from the teachers of block k-1, then the
    # teachers update with its feedback)
    order: Literal["teachers_first", "student_first"] = "teachers_first"
    proxies: ProxySpec | None = None


# ------------------------------------------------------------------------------ eval, runtime


EVAL_MASKS = ("standard", "train", "all_seen")  # eval/protocol.py's MASKS (config must not import torch)
MASK_LABELS = {"standard": "train + valid masked", "train": "train masked", "all_seen": "every seen pair masked"}
EXCLUDE_TO_MASK = {"known": "standard", "train": "train"}  # issue 11's spelling `eval: {exclude: ...}`
# bumped whenever the default of an existing setting changes (config_hash: only non-default settings are hashed)
DEFAULTS_VERSION = 2
# options read only by `ckd evaluate` (estimates past the log): not part of a lineage's identity
EVAL_ONLY_FIELDS = ("ips_exponent", "ips_clip", "intervened_per_item", "mar_test", "mar_positive", "truth_items")
# how many users are scored at once: how fast and in how much memory, never a model or its figures (only `ckd
# evaluate`'s uniformly drawn truth labels follow an explicit chunk_size, and those are evaluation-only): not identity
EVAL_SPEED_FIELDS = ("chunk_size", "memory_mb")


class EvalSpec(_Spec):
    ks: Annotated[tuple[Annotated[int, Field(ge=1)], ...], BeforeValidator(_as_tuple),
                  Field(min_length=1)] = (10, 20, 50)
    chunk_size: int = Field(0, ge=0)  # users scored at once; 0: as many as fit memory_mb (eval.metrics.users_per_chunk)
    # memory budget of one chunk of full scores; None: 256 MB on the CPU, an eighth of a GPU's free memory (≤ 4 GB)
    memory_mb: int | None = Field(None, ge=1)
    sample_users: int | None = Field(None, ge=1)  # evaluate a seeded sample of this many users per test set (None: all)
    # what a ranking hides: standard = the user's train + valid pairs (the standard full-ranking protocol)
    # | train = training pairs only (valid items stay as negatives) | all_seen = every seen pair but the
    # target's (the old rule, for comparison). `exclude: known | train` is accepted as another spelling.
    mask: Literal[EVAL_MASKS] = "standard"
    mass_groups: int = Field(3, ge=0)  # UnKD's equal-interaction popularity groups beside head/mid/tail (0: off)
    ips_exponent: float = Field(0.5, ge=0)  # inverse-propensity estimates: propensity = (pop / max pop)^exponent
    ips_clip: float = Field(0.05, gt=0, le=1)  # ... clipped from below at this value
    intervened_per_item: int = Field(1, ge=1)  # intervened test split: this many test pairs of every item
    mar_test: str | None = None  # a missing-at-random test file: user, item, label rows (CSV / Parquet)
    mar_positive: float = 1.0  # a label ≥ this is relevant
    truth_items: int = Field(100, ge=1)  # with --truth: uniformly drawn labelled items per user

    @model_validator(mode="before")
    @classmethod
    def _exclude_spelling(cls, data):
        if isinstance(data, dict) and "exclude" in data:
            data = dict(data)
            value = data.pop("exclude")
            if value not in EXCLUDE_TO_MASK:
                raise _Bad("exclude", "must be known or train", value,
                           "use exclude: known (train + valid masked) or exclude: train, or mask: standard | "
                           "train | all_seen")
            if "mask" in data and data["mask"] != EXCLUDE_TO_MASK[value]:
                raise _Bad("exclude", f"contradicts mask: {data['mask']}", value, "give only one of mask and exclude")
            data["mask"] = EXCLUDE_TO_MASK[value]
        return data


LIVE_KEEP_LAST = 10  # snapshots kept by default for a live block policy


class SnapshotSpec(_Spec):
    dir: str = ""  # default: runs/<job name>
    # the newest snapshots kept; None (default): every one for a fixed plan, the newest LIVE_KEEP_LAST for a
    # live policy (a job that follows a stream for months); 0 keeps every snapshot
    keep_last: int | None = Field(None, ge=0)
    keep: _tuple(Annotated[int, Field(ge=0)]) = ()  # blocks whose snapshots are never pruned


class RuntimeSpec(_Spec):
    num_cpus: int | None = Field(None, ge=1)  # CPUs of the embedded local Ray (default: all)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when an actor has a GPU
    max_restarts: int = Field(3, ge=0)  # Ray restarts of a dead model actor (it reloads the last commit)
    block_attempts: int = Field(3, ge=1)  # tries of one block before the job gives up (each from the last commit)
    placement_timeout_s: float = Field(60.0, gt=0)  # wait this long for the actors' placement group, then refuse
    # how the job's placement group puts the actors' bundles on nodes: pack (as few nodes as fit) | spread (over
    # as many nodes as possible) | strict_pack (all on one node) | strict_spread (every actor on its own node)
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"


class TuneDomainSpec(_Spec):
    """One field's candidates in a `tune.space`: exactly one of the keys."""

    choice: _tuple(Union[bool, int, float, str]) | None = None  # one of these, drawn per trial
    grid: _tuple(Union[bool, int, float, str]) | None = None  # every value (times num_samples)
    uniform: Annotated[tuple[float, float], BeforeValidator(_as_tuple)] | None = None  # [low, high]
    loguniform: Annotated[tuple[float, float], BeforeValidator(_as_tuple)] | None = None  # [low, high], both > 0
    randint: Annotated[tuple[int, int], BeforeValidator(_as_tuple)] | None = None  # [low, high], high included

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise _Bad("", "give exactly one of choice, grid, uniform, loguniform, randint", _Raw(", ".join(given) or
                       "none"), "write e.g. {loguniform: [0.001, 0.1]} or {choice: [8, 16, 32]}")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("choice", "grid") and not values:
            raise _Bad(kind, "an empty list of candidates", [], "give at least one value")
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1] + (kind == "randint"):
            raise _Bad(kind, "low must be below high", list(values), "write [low, high]")
        if kind == "loguniform" and values[0] <= 0:
            raise _Bad(kind, "loguniform needs low > 0", list(values), "use a positive low bound, e.g. 1.0e-4")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class TuneSpec(_Spec):
    """`ckd tune`: trials of this job with fields changed by dotted path (e.g. `student.train.lr`,
    `distill.terms[0].weight`), each running the first `blocks` blocks in one process; ASHA stops weak trials
    after each block on the student's validation NDCG@20; the best trial's job file is written out."""

    space: dict[str, TuneDomainSpec]
    num_samples: int = Field(4, ge=1)  # draws of the space (a grid: its every value, num_samples times over)
    blocks: int = Field(2, ge=1)  # the first blocks each trial runs; the metric is on the last of them
    grace_period: int = Field(1, ge=1)  # blocks every trial runs before ASHA may stop it
    reduction_factor: float = Field(2.0, gt=1)  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int | None = Field(None, ge=1)  # trials at once (default: as many as the CPUs hold)
    cpus_per_trial: float = Field(1.0, gt=0)
    # what a trial reports after each block: valid (the student's validation NDCG@20 on that block, all a
    # streaming model has) | holdout (its mean NDCG@20 over the held-out parts of every block run so far —
    # blocks.holdout: what the final snapshot is judged on, older blocks included, never trained on)
    metric: Literal["valid", "holdout"] = "valid"

    @model_validator(mode="after")
    def _space(self):
        if not self.space:
            raise _Bad("space", "an empty search space", {}, "give at least one field, e.g. "
                       "{student.train.lr: {loguniform: [0.001, 0.01]}}")
        if self.grace_period > self.blocks:
            raise _Bad("grace_period", f"must be ≤ blocks ({self.blocks})", self.grace_period,
                       f"lower it to {self.blocks} or raise tune.blocks")
        return self


class JobSpec(_Spec):
    name: str = "stream"  # a safe path component: runs/<name>, catalog lineage
    seed: int = Field(0, ge=0, le=MAX_SEED)
    source: SourceSpec = SourceSpec()
    blocks: BlockSpec = BlockSpec()
    teachers: _tuple(ModelSpec) = ()
    student: ModelSpec = ModelSpec()
    distill: DistillSpec = DistillSpec()
    continual: ContinualSpec = ContinualSpec()
    eval: EvalSpec = EvalSpec()
    snapshots: SnapshotSpec = SnapshotSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    tune: TuneSpec | None = None  # `ckd tune`: the search over this job's fields (runtime/tune.py)

    @model_validator(mode="after")
    def _consistent(self):
        _check_name(self.name)
        if self.tune is not None and self.tune.metric == "holdout" and not self.blocks.holdout:
            raise _Bad("tune.metric", "holdout needs a held-out share to judge trials on", self.tune.metric,
                       "set blocks.holdout (e.g. 0.05), or use metric: valid")
        if self.blocks.holdout and self.source.dataset == "files":
            raise _Bad("blocks.holdout", "a fixed split's files say every row's part; there is no stream to hold "
                       "a share of out", self.blocks.holdout, "drop blocks.holdout, or hold rows out of the files")
        seen = {}
        for path, m in [*((f"teachers[{i}]", t) for i, t in enumerate(self.teachers)), ("student", self.student)]:
            if m.name in seen:
                raise _Bad(f"{path}.name", f"model names must be unique, {seen[m.name]} has it too", m.name,
                           "rename one of them")
            seen[m.name] = path
        d = self.distill
        if (d.terms or d.feedback) and not self.teachers:
            which = "terms" if d.terms else "feedback"
            names = ", ".join(t.name for t in getattr(d, which))
            raise _Bad("teachers", f"distill.{which} ({names}) needs at least one teacher", _Raw("no teachers"),
                       f"add a teacher or remove distill.{which}")
        for which, models, label in (("terms", self.teachers, "teachers"), ("feedback", (self.student,), "student")):
            for i, t in enumerate(getattr(d, which)):
                if t.name == "hetcomp":
                    self._checkpoints_fit(f"distill.{which}[{i}]", t.checkpoints, models, label)
                if t.name == "replay" and t.source == "proxies" and self.continual.proxies is None:
                    raise _Bad(f"distill.{which}[{i}].source", "replays the student's proxies, which are off",
                               t.source, "set continual.proxies (e.g. {stability: 0.9, plasticity: 0.1}) "
                                         "or use source: peers")
                if t.models and which == "terms":
                    raise _Bad(f"distill.terms[{i}].models", "chooses teachers, which only feedback terms train "
                               "(distill.terms train the student)", list(t.models), "drop models, or move the term "
                               "to distill.feedback")
                unknown = [m for m in t.models if m not in [x.name for x in self.teachers]]
                if unknown:
                    raise _Bad(f"distill.{which}[{i}].models", "names no teacher of this job", unknown[0],
                               f"use names from {', '.join(m.name for m in self.teachers)}")
                if t.name == "skd" and which == "terms" and t.teacher is not None and \
                        t.teacher not in [m.name for m in self.teachers]:
                    raise _Bad(f"distill.terms[{i}].teacher", "names no teacher of this job", t.teacher,
                               f"use one of {', '.join(m.name for m in self.teachers)}")
        return self

    def _checkpoints_fit(self, where: str, checkpoints: int, models, label: str) -> None:
        """A trajectory of `checkpoints` needs at least as many epochs in every update that trains."""
        runs = [(getattr(m.train, e), f"{label}[{i}]" if label == "teachers" else label, e)
                for i, m in enumerate(models) for e in ("epochs_base", "epochs_block") if getattr(m.train, e) > 0]
        if runs:
            epochs, who, e = min(runs)
            if checkpoints > epochs:
                raise _Bad(f"{where}.checkpoints", f"must be ≤ the epochs of every update ({who}.train.{e} is "
                           f"{epochs})", checkpoints, f"lower checkpoints to {epochs} or raise {who}.train.{e}")

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.snapshots.dir or f"runs/{self.name}")

    def to_dict(self) -> dict:
        """Plain data (tuples stay tuples; JSON turns them into lists); ``parse_job`` reads it back."""
        return self.model_dump()

    def config_hash(self) -> str:
        """Identity of the lineage: everything that changes results (not where or how fast it runs).

        Only the settings that differ from their defaults are hashed, with ``DEFAULTS_VERSION``: a release that
        adds an option (its default keeps the old behaviour) leaves every lineage as it was, so a stream carries
        on after an upgrade; a release that changes a default bumps the version (tests/test_config.py holds the
        defaults and fails until it is bumped), and every lineage that relied on it starts anew."""
        return self._digest(speed=False)

    def _digest(self, speed: bool) -> str:
        """``config_hash``; with ``speed``, as releases before session 21 hashed it: ``eval.chunk_size`` and
        ``eval.memory_mb`` (then 256 by default) written out when set."""
        d = self.model_dump(exclude_defaults=True)
        for k in ("runtime", "snapshots", "tune"):
            d.pop(k, None)
        models = [(d.setdefault("student", {}), self.student)] + list(zip(d.get("teachers", []), self.teachers))
        for dumped, spec in models:
            dumped.pop("resources", None)
            dumped.pop("workers", None)  # data-parallel updates give the same numbers (to float rounding)
            dumped["name"] = spec.name  # a name left at its default still tells two models apart
        for which in ("terms", "feedback"):
            if which in d.get("distill", {}):  # a term's name is its kind, even where it is the field's default
                d["distill"][which] = [{**t, "name": spec.name} for t, spec in
                                       zip(d["distill"][which], getattr(self.distill, which))]
        for k in EVAL_ONLY_FIELDS + (() if speed else EVAL_SPEED_FIELDS):
            d.get("eval", {}).pop(k, None)
        if speed and d.get("eval", {}).get("memory_mb") == 256:  # those releases' default: not written out
            d["eval"].pop("memory_mb")
        if d.get("eval") == {}:  # only evaluation-only settings: the same lineage as none
            d.pop("eval")
        d["defaults"] = DEFAULTS_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def is_lineage(self, digest: str | None) -> bool:
        """Whether a stored hash (a commit's lineage, a snapshot's config_hash) names this job's lineage."""
        return digest == self.config_hash() or digest in self.lineage_aliases()

    def lineage_aliases(self) -> tuple[str, ...]:
        """Hashes this job had under earlier releases' ``config_hash`` (every field, defaults included; before
        terms had ``models``; ``eval.memory_mb`` / ``chunk_size`` hashed when set, before session 21): a stream
        committed by such a release is relabelled and carries on."""
        d = self.to_dict()
        for k in ("runtime", "snapshots", "tune"):
            d.pop(k)
        for m in [d["student"], *d["teachers"]]:
            m.pop("resources")
            m.pop("workers")
        for k in EVAL_ONLY_FIELDS:
            d["eval"].pop(k, None)
        if d["eval"].get("memory_mb") is None:  # those releases' default budget, written out in their dumps
            d["eval"]["memory_mb"] = 256
        for which in ("terms", "feedback"):
            for t in d["distill"][which]:
                if not t.get("models"):
                    t.pop("models", None)
        aliases = (hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16],)
        before = self._digest(speed=True)  # a job that set eval.memory_mb or chunk_size, as hashed before session 21
        return aliases + ((before,) if before != self._digest(speed=False) else ())


# ------------------------------------------------------------------------- errors → one sentence


class _Raw(str):
    """A `got` value already written out (shown as is, not quoted)."""


def _show(value) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    text = {None: "null", True: "true", False: "false"}.get(value, None) if isinstance(value, (bool, type(None))) \
        else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _models_in(tp) -> list:
    """The model classes an annotation holds (through Annotated, Optional, unions and tuples)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    origin = typing.get_origin(tp)
    if origin in (Annotated, tuple, Union, types.UnionType):
        args = typing.get_args(tp)[:1] if origin is Annotated else typing.get_args(tp)
        return [m for a in args if a is not Ellipsis for m in _models_in(a)]
    return []


def _model_at(loc) -> type[BaseModel] | None:
    """The model class at a pydantic error location (None when it is not one model)."""
    current = [JobSpec]
    mapping = False  # the last field was a dict of models (tune.space): this part is one of its keys
    for part in loc:
        if isinstance(part, int):
            continue  # an element of a tuple: its models are already `current`
        if mapping:
            mapping = False
            continue
        if len(current) > 1 and part in TERM_SPECS:
            current = [TERM_SPECS[part]]  # the tag pydantic puts in the location of a union member
            continue
        owner = next((m for m in current if part in m.model_fields), None)
        if owner is None:
            return None
        annotation = owner.model_fields[part].annotation
        mapping = typing.get_origin(annotation) is dict
        current = _models_in(typing.get_args(annotation)[1] if mapping else annotation)
    return current[0] if len(current) == 1 else None


def _path(loc) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in TERM_SPECS and i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] in ("terms", "feedback"):
            continue  # the union tag: the path names the list element, not the member class
        else:
            out += f".{part}" if out else str(part)
    return out


def _keys(loc) -> str:
    model = _model_at(loc)
    if not model:
        return "see docs/ARCHITECTURE.md"
    shared = set(_Term.model_fields) if issubclass(model, _Term) else set()  # a term's own keys first
    return ", ".join([f for f in model.model_fields if f not in shared] + [f for f in model.model_fields if f in shared])


def _describe(err: dict) -> str:
    """One pydantic error → '<field.path>: <problem> (got <value>); <fix>'."""
    kind, loc, got, ctx = err["type"], tuple(err["loc"]), err.get("input"), err.get("ctx") or {}
    path = _path(loc)
    terms = ", ".join(TERM_NAMES)
    if kind == "value_error" and isinstance(ctx.get("error"), _Bad):
        bad = ctx["error"]
        path = ".".join(p for p in (path, bad.field) if p).replace(".[", "[")
        problem, got, fix = bad.problem, bad.got, bad.fix
    elif kind == "extra_forbidden":
        parent = _path(loc[:-1])
        problem = "unknown key" if parent else "unknown top-level key"
        fix = f"the keys of {parent} are {_keys(loc[:-1])}" if parent else f"the top-level keys are {_keys(())}"
    elif kind == "union_tag_not_found":
        if isinstance(got, dict):
            path, problem, got, fix = f"{path}.name", "a term needs a name", _Raw("no name"), f"use one of {terms}"
        else:
            problem, fix = "a term is a mapping", "write e.g. {name: rrd, weight: 0.01}"
    elif kind == "union_tag_invalid":
        path, problem, got, fix = f"{path}.name", "unknown term", ctx.get("tag"), f"use one of {terms}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        if len(loc) >= 2 and isinstance(loc[-1], int) and loc[-2] in ("terms", "feedback"):
            problem, fix = "a term is a mapping with a name", "write e.g. {name: rrd, weight: 0.01}"
        else:
            problem, fix = "must be a mapping", f"write key: value pairs ({_keys(loc)})"
    elif kind in ("tuple_type", "list_type"):
        problem, fix = "must be a list", "write a YAML list: [a, b] or one '- ' line per element"
    elif kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-size list that is too short
        path, problem, fix = _path(loc[:-1]), "has too few values", "write one value per position"
        if path.endswith("split"):
            problem, fix = "needs 3 values (train, valid, test)", "write e.g. [0.8, 0.1, 0.1]"
    elif kind == "too_short":
        problem, fix = f"needs at least {ctx.get('min_length')} value(s)", "add values"
        if ctx.get("field_type") == "Tuple" and path.endswith("split"):
            problem, fix = "needs 3 values (train, valid, test)", "write e.g. [0.8, 0.1, 0.1]"
    elif kind == "too_long":
        problem, fix = f"takes at most {ctx.get('max_length')} value(s)", "remove values"
        if path.endswith("split"):
            problem, fix = "needs 3 values (train, valid, test)", "write e.g. [0.8, 0.1, 0.1]"
    elif kind == "literal_error":
        problem, fix = "not one of the choices", f"use one of {ctx.get('expected')}"
    elif kind in ("int_type", "int_from_float"):
        problem, fix = "must be an integer", "write a whole number without quotes"
    elif kind == "float_type":
        problem, fix = "must be a number", "write a number without quotes, e.g. 0.5"
        if isinstance(got, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", got.strip()):
            fix = "write the exponent with a decimal point, e.g. 1.0e-4 (YAML reads 1e-4 as text)"
    elif kind == "finite_number":
        problem, fix = "must be a finite number", "write an ordinary number"
    elif kind == "bool_type":
        problem, fix = "must be true or false", "write true or false"
    elif kind == "string_type":
        problem, fix = "must be a string", "quote it"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op, bound = {"greater_than": (">", "gt"), "greater_than_equal": ("≥", "ge"),
                     "less_than": ("<", "lt"), "less_than_equal": ("≤", "le")}[kind]
        limit = _num(ctx.get(bound))
        problem, fix = f"must be {op} {limit}", f"use a value {op} {limit}"
        if kind == "greater_than_equal" and type(ctx.get("ge")) is int and ctx["ge"] == 1:  # an integer field
            problem = "must be a positive integer"
    else:
        problem, fix = err.get("msg", "invalid value"), "fix this value"
    return f"{path or 'job'}: {problem} (got {_show(got)}); {fix}"


def parse_spec(cls: type[BaseModel], data, source: str):
    """Validate `data` as `cls`; a problem becomes one ``CkdError`` naming `source` and the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CkdError(f"{source}: {_describe(e.errors()[0])}") from None


def parse_job(data, source: str = "<job>") -> JobSpec:
    if not isinstance(data, dict):
        raise CkdError(f"{source}: a job file must be a YAML mapping (name, source, blocks, teachers, student, ...), "
                       f"got {type(data).__name__}")
    return parse_spec(JobSpec, data, source)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # SafeLoader's own check names it
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)



def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise CkdError(f"{path}: job file not found; pass the path of a YAML job such as jobs/stream.yaml")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CkdError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e}); fix the syntax") from None
    except UnicodeDecodeError:
        raise CkdError(f"{path}: not a text file; a job file is UTF-8 YAML") from None
    return parse_job(data, str(path))
