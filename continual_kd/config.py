"""The job spec: YAML → typed, validated, frozen dataclasses, with errors that name file and field.

Only ``yaml.safe_load`` is used; a job file is data, never code. Every key is checked: an unknown
key, a wrong type or an impossible value ends in one ``CkdError`` sentence with the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import CkdError

DATASETS = ("movielens-100k", "synthetic", "store")
# backbone name → the ModelSpec fields its constructor takes (kept in step with models.BACKBONES by
# tests; config must not import torch)
BACKBONE_PARAMS = {
    "mf": ("dim",),
    "lightgcn": ("dim", "layers"),
    "multvae": ("dim", "hidden", "dropout", "beta"),
}
BACKBONE_NAMES = tuple(BACKBONE_PARAMS)
DISTILL_METHODS = ("rrd", "hetcomp", "none")
FUSIONS = ("rank", "importance")
TEACHER_WEIGHTS = ("uniform", "valid_ndcg")


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 2000
    items: int = 1000
    interactions: int = 60000
    periods: int = 6
    popularity_exponent: float = 1.0
    drift: float = 0.3
    new_user_fraction: float = 0.3
    new_item_fraction: float = 0.3
    latent_dim: int = 8
    temperature: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class SourceSpec:
    dataset: str = "movielens-100k"  # movielens-100k | synthetic | store (an existing store, filled by `ckd ingest`)
    store: str = "stores/ml-100k"  # the stream store directory (built from the dataset when missing)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)

    def validate(self, where: str) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"{where}.dataset: unknown dataset {self.dataset!r}; use one of {', '.join(DATASETS)}")


@dataclass(frozen=True)
class BlockSpec:
    base_fraction: float = 0.5
    incremental: int = 5
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def validate(self, where: str) -> None:
        if not 0 < self.base_fraction < 1:
            raise ValueError(f"{where}.base_fraction: must be between 0 and 1 (exclusive), got {self.base_fraction}")
        if self.incremental < 1:
            raise ValueError(f"{where}.incremental: needs at least 1 incremental block, got {self.incremental}")
        if any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6 or self.split[0] <= 0:
            raise ValueError(f"{where}.split: three non-negative fractions (train, valid, test) summing to 1, got {list(self.split)}")


@dataclass(frozen=True)
class TrainSpec:
    epochs_base: int = 40  # epochs on the base block (from scratch)
    epochs_block: int = 10  # epochs on each incremental block (warm-started)
    lr: float = 0.005
    weight_decay: float = 1e-4  # L2 on the rows a batch touches (summed), not on absent users/items
    batch_size: int = 1024

    def validate(self, where: str) -> None:
        for name in ("epochs_base", "epochs_block"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name}: must be ≥ 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"{where}.lr: must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"{where}.weight_decay: must be ≥ 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"{where}.batch_size: must be ≥ 1, got {self.batch_size}")


@dataclass(frozen=True)
class ResourceSpec:
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self, where: str) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"{where}: num_cpus and num_gpus must be ≥ 0")


@dataclass(frozen=True)
class ModelSpec:
    name: str = "student"
    backbone: str = "mf"
    dim: int = 16  # embedding size (MultVAE: latent size)
    layers: int = 2  # LightGCN propagation layers
    hidden: int = 600  # MultVAE hidden width
    dropout: float = 0.5  # MultVAE input dropout
    beta: float = 0.2  # MultVAE KL weight
    init: str = "neighbor"  # how rows for new users/items start: neighbor (1-hop mean) | random
    train: TrainSpec = field(default_factory=TrainSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)

    def backbone_params(self) -> dict:
        return {p: getattr(self, p) for p in BACKBONE_PARAMS[self.backbone]}

    def validate(self, where: str) -> None:
        if not self.name or any(c in self.name for c in "/\\ \t"):
            raise ValueError(f"{where}.name: a non-empty name without spaces or slashes, got {self.name!r}")
        if self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"{where}.backbone: unknown backbone {self.backbone!r}; use one of {', '.join(BACKBONE_NAMES)}")
        if self.dim < 1:
            raise ValueError(f"{where}.dim: must be a positive integer, got {self.dim}")
        if self.layers < 1 or self.hidden < 1:
            raise ValueError(f"{where}: layers and hidden must be positive integers")
        if not 0 <= self.dropout < 1 or self.beta < 0:
            raise ValueError(f"{where}: dropout must be in [0, 1) and beta ≥ 0")
        if self.init not in ("neighbor", "random"):
            raise ValueError(f"{where}.init: use neighbor or random, got {self.init!r}")


@dataclass(frozen=True)
class UnKDSpec:
    """UnKD's popularity-stratified pairs (added to the student's loss when weight > 0)."""

    weight: float = 0.0  # w in ... + w·L_UnKD (summed); 0 switches it off
    groups: int = 4  # popularity groups of equal interaction mass
    pairs: int = 32  # pairs per user and epoch, pairs // groups per group
    per_group: int = 200  # teacher's top items kept per group
    temperature: float = 20.0  # p(rank r) ∝ exp(-(r+1)/T)

    def validate(self, where: str) -> None:
        if self.weight < 0 or self.groups < 1 or self.per_group < 2 or self.temperature <= 0:
            raise ValueError(f"{where}: weight ≥ 0, groups ≥ 1, per_group ≥ 2 and temperature > 0 are required")
        if self.weight > 0 and self.pairs < self.groups:
            raise ValueError(f"{where}.pairs: at least one pair per group is needed ({self.groups}), got {self.pairs}")


@dataclass(frozen=True)
class HetCompSpec:
    """HetComp: teacher trajectories, dynamic knowledge construction, two-phase loss."""

    checkpoints: int = 4  # checkpoints per teacher and block (its trajectory), evenly spaced in epochs
    k: int = 100  # target size: top-k of the summed importance
    observed: int = 10  # observed items added to the target
    early_weight: float = 0.01
    late_weight: float = 0.005
    dkc_every: int = 10  # epochs between dynamic knowledge construction steps
    with_bpr: bool = False  # the authors' student learns from the KD loss only

    def validate(self, where: str) -> None:
        if self.checkpoints < 1 or self.k < 1 or self.observed < 0 or self.dkc_every < 1:
            raise ValueError(f"{where}: checkpoints, k and dkc_every must be ≥ 1, observed ≥ 0")


@dataclass(frozen=True)
class DistillSpec:
    method: str = "rrd"  # rrd | hetcomp | none
    weight: float = 0.01  # λ in BPR + λ·RRD, both summed over the batch
    k: int = 40  # teacher's interesting items per user
    pool: int = 500  # teacher top-N that uninteresting items avoid
    uninteresting: int = 40
    mode: str = "direct"  # direct (teacher top-K as is) | sample (K of the pool, p ∝ exp(-rank/T))
    temperature: float = 10.0
    score_clamp: float | None = None
    fusion: str = "rank"  # several teachers → one ranking: rank (CCD, mean (1/rank)^0.05) | importance (HetComp)
    teacher_weights: str = "uniform"  # uniform | valid_ndcg (each teacher's validation NDCG@20 on the last block)
    unkd: UnKDSpec = field(default_factory=UnKDSpec)
    hetcomp: HetCompSpec = field(default_factory=HetCompSpec)

    def validate(self, where: str) -> None:
        if self.method not in DISTILL_METHODS:
            raise ValueError(f"{where}.method: unknown method {self.method!r}; use one of {', '.join(DISTILL_METHODS)}")
        if self.weight < 0:
            raise ValueError(f"{where}.weight: must be ≥ 0, got {self.weight}")
        if self.k < 1 or self.uninteresting < 1:
            raise ValueError(f"{where}: k and uninteresting must be ≥ 1")
        if self.pool < self.k:
            raise ValueError(f"{where}.pool: must be ≥ k ({self.k}), got {self.pool}")
        if self.mode not in ("direct", "sample"):
            raise ValueError(f"{where}.mode: use direct or sample, got {self.mode!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"{where}.fusion: use one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.teacher_weights not in TEACHER_WEIGHTS:
            raise ValueError(f"{where}.teacher_weights: use one of {', '.join(TEACHER_WEIGHTS)}, got {self.teacher_weights!r}")

    @property
    def needs_teachers(self) -> bool:
        return self.method != "none" or self.unkd.weight > 0


@dataclass(frozen=True)
class EvalSpec:
    ks: tuple[int, ...] = (10, 20, 50)
    chunk_size: int = 1024

    def validate(self, where: str) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"{where}.ks: a non-empty list of positive cut-offs, got {list(self.ks)}")
        if self.chunk_size < 1:
            raise ValueError(f"{where}.chunk_size: must be ≥ 1")


@dataclass(frozen=True)
class SnapshotSpec:
    dir: str = ""  # default: runs/<job name>
    keep_last: int = 0  # 0 keeps every snapshot
    keep: tuple[int, ...] = ()  # blocks whose snapshots are never pruned

    def validate(self, where: str) -> None:
        if self.keep_last < 0:
            raise ValueError(f"{where}.keep_last: must be ≥ 0 (0 keeps all), got {self.keep_last}")
        if any(b < 0 for b in self.keep):
            raise ValueError(f"{where}.keep: block numbers are ≥ 0, got {list(self.keep)}")


@dataclass(frozen=True)
class RuntimeSpec:
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)
    device: str = "auto"  # auto (CUDA when an actor has a GPU) | cpu | cuda
    max_restarts: int = 3  # Ray restarts of a dead model actor (it then reloads the last committed state)
    block_attempts: int = 3  # tries of one block before the job gives up (each from the last commit)

    def validate(self, where: str) -> None:
        if self.max_restarts < 0 or self.block_attempts < 1:
            raise ValueError(f"{where}: max_restarts must be ≥ 0 and block_attempts ≥ 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{where}.device: use auto, cpu or cuda, got {self.device!r}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"{where}.num_cpus: must be ≥ 1, got {self.num_cpus}")


@dataclass(frozen=True)
class JobSpec:
    name: str = "stream"
    seed: int = 0
    source: SourceSpec = field(default_factory=SourceSpec)
    blocks: BlockSpec = field(default_factory=BlockSpec)
    teachers: tuple[ModelSpec, ...] = ()
    student: ModelSpec = field(default_factory=ModelSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    snapshots: SnapshotSpec = field(default_factory=SnapshotSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def validate(self, where: str) -> None:
        if not self.name or any(c in self.name for c in "/\\ \t"):
            raise ValueError(f"{where}.name: a non-empty name without spaces or slashes, got {self.name!r}")
        if self.distill.needs_teachers and not self.teachers:
            raise ValueError(f"{where}.teachers: distillation ({self.distill.method}"
                             f"{', unkd' if self.distill.unkd.weight > 0 else ''}) needs at least one teacher")
        names = [t.name for t in self.teachers] + [self.student.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"{where}: model names must be unique, {sorted(dup)} used twice")

    @property
    def snapshot_dir(self) -> Path:
        return Path(self.snapshots.dir or f"runs/{self.name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Identity of the lineage: everything that changes results (not where or how fast it runs)."""
        d = self.to_dict()
        for k in ("runtime", "snapshots"):
            d.pop(k)
        for m in [d["student"], *d["teachers"]]:
            m.pop("resources")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- generic typed parsing


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        at = f"{where}: unknown key" if where else "unknown top-level key"
        raise ValueError(f"{at} {unknown[0]!r}; allowed keys are {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], sub)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where or "job")
    return obj


def parse_job(data, source: str = "<job>") -> JobSpec:
    if not isinstance(data, dict):
        raise CkdError(f"{source}: a job file must be a YAML mapping (name, source, blocks, teachers, student, ...), got {type(data).__name__}")
    try:
        return _build(JobSpec, data, "")
    except ValueError as e:
        raise CkdError(f"{source}: {e}") from None


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise CkdError(f"{path}: job file not found; pass the path of a YAML job such as jobs/stream.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CkdError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e}); fix the syntax") from None
    except UnicodeDecodeError:
        raise CkdError(f"{path}: not a text file; a job file is UTF-8 YAML") from None
    return parse_job(data, str(path))
