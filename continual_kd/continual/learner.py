"""A model and what the per-block algorithm does with it: grow, update, teach, be evaluated.

``Learner`` is plain Python and runs in one process; ``runtime/`` wraps one per Ray actor. Every call
takes the interactions seen so far and the block index, so a call can be repeated (idempotent given
the model state it starts from) and the same code gives the same numbers in-process and under Ray.
Knowledge flows both ways through the same calls: ``knowledge`` / ``feedback`` produce lists for the
other side, ``update`` consumes them through the job's KD terms (``distill.TERMS``).

What a model may see (``eval.protocol.model_pairs``): while block k is trained, validated or
tested, the training pairs of blocks ≤ k and the validation pairs of blocks < k — never block k's
validation pairs nor any test pair (not as positives, graph edges or input rows).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import time
from dataclasses import replace

import numpy as np
import torch

from ..config import EvalSpec, ModelSpec
from ..errors import CkdError
from ..distill import TERMS, TermContext, popularity_groups, teacher_group_rankings
from ..eval import evaluate_ranking, model_pairs_mask, plasticity_stability, top_k_items
from ..eval.metrics import evaluate_many
from ..eval.bias import popularity_groupings
from ..eval.metrics import users_per_chunk
from ..models import build_backbone, num_parameters
from ..models.base import rows_before
from ..sparse import UserItemSet
from ..types import TEST, TRAIN, VALID, Interactions, Knowledge
from ..distill.replay import PROXY_PREFIX
from . import rank_penalty
from .calibrate import calibrate
from .pairs import PairState
from .training import BestEpoch, TrainingDiverged, iter_epochs

SERVED_SCALE = "served_log_scale"  # fusion_evidence: log of fusion_popularity: served's correction of its target

AUX = "aux."  # prefix of non-model tensors (proxies, KD term state) inside a saved state's weights


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


def item_counts(seen: Interactions, device="cpu") -> torch.Tensor:
    """(I,) training popularity: interactions per item over the pairs a model may see now."""
    counts = np.bincount(seen.items[model_pairs_mask(seen)], minlength=seen.num_items)
    return torch.as_tensor(counts, dtype=torch.float32, device=device)


def observe_pairs(model, known: UserItemSet) -> None:
    """Hand ``model`` the pairs it may use (graph / input rows); as the kept sorted set where it takes one."""
    if getattr(model, "observes_pairs", False):
        model.observe(known.users, known.items, pairs=known)
    else:
        model.observe(known.users, known.items)


def flatten_knowledge(knowledge) -> list[Knowledge]:
    """Knowledge as handed over: one list per model, and a model may hand several (the student and its
    proxies); in the order given."""
    out = []
    for k in knowledge or ():
        out.extend(flatten_knowledge(k) if isinstance(k, (list, tuple)) else [k])
    return out


def _flat_proxies(state: dict) -> dict[str, torch.Tensor]:
    """Proxies' state as flat tensors (snapshot files hold one flat tensor dict per model)."""
    meta = [state["stability_weight"], state["plasticity_weight"], state["num_users"], state["num_items"],
            state["updates"]]
    out = {f"{AUX}proxies.meta": torch.tensor(meta, dtype=torch.float64)}
    for name, params in state["params"].items():
        out.update({f"{AUX}proxies.{name}.{k}": v for k, v in params.items()})
    return out


def _proxies_from_flat(aux: dict[str, torch.Tensor]):
    if "proxies.meta" not in aux:
        return None
    from .proxies import Proxies

    sw, pw, nu, ni, updates = aux["proxies.meta"].tolist()
    params: dict[str, dict] = {}
    for key, v in aux.items():
        if key.startswith("proxies.") and key != "proxies.meta":
            name, param = key[len("proxies."):].split(".", 1)
            params.setdefault(name, {})[param] = v
    return Proxies.from_state({"stability_weight": sw, "plasticity_weight": pw, "num_users": int(nu),
                               "num_items": int(ni), "updates": int(updates), "params": params})


def choose_fit(fits: list[tuple[dict, dict]], prefer: str = "accuracy", tolerance: float = 0.0) -> tuple[dict, dict]:
    """The grid combination kept: the best validation NDCG@20 (``accuracy``), or (``less_popular``) of the
    combinations within ``tolerance`` (relative) of that figure, the one whose validation top-20 has the
    lowest average training popularity. Combinations without a validation figure come last."""
    def ndcg(fit):
        return -1.0 if fit[1]["valid"] is None else fit[1]["valid"]

    best = max(fits, key=ndcg)
    if prefer != "less_popular" or best[1]["valid"] is None:
        return best
    close = [f for f in fits if f[1]["valid"] is not None and f[1]["valid"] >= (1 - tolerance) * best[1]["valid"]
             and f[1].get("valid_avgpop") is not None]
    return min(close, key=lambda f: (f[1]["valid_avgpop"], -ndcg(f))) if close else best


def race_copy(model):
    """A copy of ``model`` for one run of a warm grid's race: its own parameters and state, sharing what the
    backbone names in ``shared_on_copy`` (the observed pairs and the graph it reads, which ``observe`` replaces
    and nothing changes in place) instead of copying the history once per candidate."""
    memo = {}
    for name in getattr(model, "shared_on_copy", ()):
        value = getattr(model, name, None)
        if value is not None:
            memo[id(value)] = value
    return copy.deepcopy(model, memo)


KEEP_WEIGHT = "keep_weight"  # a warm update's grid key: the weight of the model's `keep` term (its `weights`)


def with_keep_weight(terms, weight: float | None) -> list:
    """The term specs with `keep`'s weight set (None: as they are; 0: no keep term)."""
    if weight is None:
        return list(terms)
    return [s.model_copy(update={"weight": float(weight)}) if getattr(s, "name", "") == "keep" else s
            for s in terms if not (getattr(s, "name", "") == "keep" and weight == 0)]


def choose_keep(fits: list[tuple[dict, dict]], tolerance: float) -> tuple[dict, dict]:
    """keep's weight: of the fits whose validation NDCG@20 is within ``tolerance`` (relative) of the best
    one's, the largest weight (the most of the old order kept that this block's validation allows); no
    validation figure: the largest weight."""
    scored = [f for f in fits if f[1]["valid"] is not None]
    if not scored:
        return max(fits, key=lambda f: f[0][KEEP_WEIGHT])
    best = max(f[1]["valid"] for f in scored)
    close = [f for f in scored if f[1]["valid"] >= (1 - tolerance) * best]
    return max(close, key=lambda f: (f[0][KEEP_WEIGHT], f[1]["valid"]))


class Learner:
    def __init__(self, spec: ModelSpec, seed: int, device: str = "cpu", role: str = "student"):
        self.spec = spec
        self.seed = seed
        self.device = device
        self.role = role  # "student" or "teacher": the side it is on (some KD terms differ by side)
        self.model = None
        self.block = -1  # last block this model was updated on
        self.proxies = None  # CCD's stability / plasticity proxies of this model (continual.proxies)
        self.term_state: dict[str, dict] = {}  # what KD terms carry from block to block
        self._trajectory: list[np.ndarray] = []  # checkpoints' top lists of the last update (teachers)
        self._trajectory_of: tuple | None = None  # (block, scope) the trajectory was recorded for
        self.chosen: dict[str, float] = {}  # train settings chosen on validation by train.grid (base block)
        # distill.teacher_weights: chosen — validation NDCG@20 summed over every block so far: "teacher{t}" of
        # teacher t's lists, "power{p}" of the lists fused with power p, "users" the validation users counted
        self.fusion_evidence: dict[str, float] = {}
        self.penalty: torch.Tensor | None = None  # rank_penalty: β · log(1 + count) (I,), on full_scores; None: off
        self.penalty_beta = 0.0
        self.fusion_penalty: torch.Tensor | None = None  # distill.fusion_popularity: (I,) off the fused scores, this update
        self.pairs = PairState(device)  # known pairs, counts, eval sets: kept between blocks (continual/pairs.py)
        self.parallel = None  # on a Ray Train worker: its part of data-parallel training (runtime/train.py)

    # ------------------------------------------------------------------ state
    def _build(self, num_users: int, num_items: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.spec.name, "init"))
            return build_backbone(self.spec.backbone, num_users, num_items, **self.spec.backbone_params()).to(self.device)

    def state(self) -> dict:
        """Everything needed to rebuild the model: weights (CPU tensors) and id-space sizes; proxies and
        KD-term state ride along in the weights under ``aux.`` keys (never part of the served model)."""
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.proxies is not None:
            weights.update(_flat_proxies(self.proxies.state()))
        for term, st in self.term_state.items():
            weights.update({f"{AUX}term.{term}.{k}": v.detach().cpu() for k, v in st.items()})
        for name, value in self.chosen.items():  # the settings train.grid chose on validation
            weights[f"{AUX}chosen.{name}"] = torch.tensor(float(value), dtype=torch.float64)
        for key, total in self.fusion_evidence.items():
            weights[f"{AUX}fusion.{key}"] = torch.tensor(float(total), dtype=torch.float64)
        if hasattr(self.model, "_noise_seed"):  # MultVAE's noise: its seed drawn when the model was first built
            weights[f"{AUX}noise_seed"] = torch.tensor(int(self.model._noise_seed), dtype=torch.int64)
        if self.penalty is not None:
            weights[f"{AUX}rank_penalty"] = self.penalty.detach().cpu()
            weights[f"{AUX}rank_penalty_beta"] = torch.tensor(self.penalty_beta, dtype=torch.float64)
        return {"block": self.block, "num_users": self.model.num_users, "num_items": self.model.num_items,
                "weights": weights}

    def load(self, state: dict) -> None:
        weights = state["weights"]
        self.model = self._build(int(state["num_users"]), int(state["num_items"]))
        self.model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(AUX)})
        self.model.eval()
        self.block = int(state["block"])
        self._trajectory, self._trajectory_of = [], None
        aux = {k[len(AUX):]: v for k, v in weights.items() if k.startswith(AUX)}
        self.proxies = _proxies_from_flat(aux)
        self.term_state = {}
        self.chosen = {k[len("chosen."):]: float(v) for k, v in aux.items() if k.startswith("chosen.")}
        self.fusion_evidence = {k[len("fusion."):]: float(v) for k, v in aux.items() if k.startswith("fusion.")}
        if "noise_seed" in aux and hasattr(self.model, "_noise_seed"):  # rebuilt at the snapshot's size, the
            self.model._noise_seed = self.model._seed_now = int(aux["noise_seed"])  # model drew another seed: the
            # run's own comes back (observe derives each block's noise from it)
        self.penalty = aux["rank_penalty"].to(self.device) if "rank_penalty" in aux else None
        self.penalty_beta = float(aux.get("rank_penalty_beta", 0.0))
        rank_penalty.install(self.model, self.penalty)
        for k, v in aux.items():
            if k.startswith("term."):
                term, key = k[len("term."):].split(".", 1)
                self.term_state.setdefault(term, {})[key] = v

    def reset(self) -> None:
        """No model yet (a restored actor before block 0)."""
        self.model, self.block, self.proxies, self.term_state, self.chosen = None, -1, None, {}, {}
        self.fusion_evidence = {}
        self.penalty, self.penalty_beta = None, 0.0
        self._trajectory, self._trajectory_of = [], None

    def num_parameters(self) -> int:
        """Parameters of the served model only (not proxies, not KD terms' own parameters)."""
        return num_parameters(self.model) if self.model is not None else 0

    # ------------------------------------------------------------------ per-block stages
    def _tensors(self, part: Interactions) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.as_tensor(part.users, dtype=torch.int64, device=self.device)
        i = torch.as_tensor(part.items, dtype=torch.int64, device=self.device)
        return u, i

    def observe(self, seen: Interactions, block: int | None = None) -> UserItemSet:
        """Hand the model the pairs it may use while block ``block`` (default: the newest seen) is
        trained, taught or scored (graph / input rows); returns them (they are also what is known)."""
        known = self.pairs.known(seen, block, by_item=getattr(self.model, "needs_item_major", False))
        observe_pairs(self.model, known)
        if hasattr(self.model, "set_item_graph"):  # path models: the item knowledge graph read with the blocks
            self.model.set_item_graph(seen.meta.get("item_graph"))
        return known

    def _users(self, seen: Interactions, block: int, scope: str = "block") -> torch.Tensor:
        """Users with training data in ``block`` (scope "block") or in any block ≤ it ("all")."""
        part = seen.part(TRAIN, block) if scope == "block" else seen.select(model_pairs_mask(seen, block))
        return torch.as_tensor(np.unique(part.users), dtype=torch.int64, device=self.device)

    def grow(self, seen: Interactions, block: int) -> None:
        """Build the model (first block) or extend it to the block's id spaces (new rows from their
        neighbours in the block's training pairs); idempotent."""
        if self.model is None:
            self.model = self._build(seen.num_users, seen.num_items)
            return
        u, i = self._tensors(seen.part(TRAIN, block))
        grow_gen = torch.Generator().manual_seed(derive_seed(self.seed, self.spec.name, "grow", block))
        self.model.grow(seen.num_users, seen.num_items, u, i, init=self.spec.init, generator=grow_gen)

    def update(self, seen: Interactions, block: int, knowledge=(), terms=(), fusion: str = "rank",
               weights: list[float] | None = None, trajectory: tuple[int, int] | None = None,
               strategy: str = "warm", proxies=None, replay: float = 0.0, replay_by: str = "user",
               knowledge_users: str = "block", choose_weights: bool = False,
               fusion_popularity: str = "none", fusion_popularity_tolerance: float | None = None,
               teacher_floor: float | None = None) -> dict:
        """Grow to the block's id spaces, then train (warm start; ``strategy="retrain"``: a new model on
        every pair it may see, for the base block's epochs).

        ``terms`` (KD term specs) are built from ``knowledge`` (the other side's lists, nested lists
        allowed) and added to the model's own loss; a term that needs knowledge is skipped when none
        came (e.g. no feedback before the student's first block). ``trajectory=(checkpoints, size)``
        makes a teacher keep its top-``size`` lists for the block's users at ``checkpoints`` evenly
        spaced epochs (HetComp's trajectories). ``proxies`` (a ProxySpec) keeps CCD's EMA proxies of
        this model, updated after training and handed to replay terms as ``own`` lists. ``replay`` > 0
        (warm updates after the first block): each epoch also trains on ``replay`` × the block's rows
        drawn from earlier blocks' pairs (``replay_by`` user: every user equally likely; pair: every pair).

        With ``train.select = best_valid`` the model kept is the epoch with the best NDCG@20 on the
        block's validation pairs (early stop after ``patience`` epochs without a gain); with a
        ``train.grid``, the first update trains one model per combination and keeps the best (the
        choice is kept, saved in the snapshot, and used by every later update). ``choose_weights``: the
        fusion weights of several teachers' lists are chosen on the block's validation pairs
        (``distill.teacher_weights: chosen``; ``_fusion_weights``), replacing ``weights``.
        ``fusion_popularity="least_teacher"``: the fused ranking the terms learn is matched in popularity to the
        least popular list (``_fusion_penalty``; ``distill.fusion_popularity``, ``fusion_popularity_tolerance``).
        ``teacher_floor``: a list whose validation NDCG@20 over the blocks so far is under this share of the best
        list's is left out of this update's knowledge (``_teacher_floor``; ``distill.teacher_floor``).
        """
        t0, started = time.perf_counter(), time.time()
        retrain = strategy in ("retrain", "scratch")
        if retrain:  # a new model; the proxies, term state and grid choice (what it carries) stay
            kept = self.proxies, self.term_state, self.chosen, self.fusion_evidence
            self.reset()
            self.proxies, self.term_state, self.chosen, self.fusion_evidence = kept
        if self.model is not None:
            rank_penalty.install(self.model, None)  # training and its validation rank by the model's own scores
        trained = self.model is not None and self.block >= 0  # it learned something before this update
        had = (self.model.num_users, self.model.num_items) if trained else None  # its rows before this block
        shrink_grid = "shrink_block" in self.spec.train.grid_block  # the shrink chosen per fit below instead
        if trained and not retrain and self.spec.train.shrink_block is not None and not shrink_grid:
            self._shrink_perturb(block, self.spec.train.shrink_block)
        self.grow(seen, block)
        if retrain:
            positives = seen.select(model_pairs_mask(seen, block))
            epochs = self.spec.train.epochs_base
        else:
            positives = seen.part(TRAIN, block)
            epochs = self.spec.train.epochs_base if block == 0 else self.spec.train.epochs_block
        u, i = self._tensors(positives)
        known = self.observe(seen, block)
        scope = "all" if retrain or knowledge_users == "all" else "block"  # whose lists the knowledge holds
        knowledge = flatten_knowledge(knowledge)
        draw = None
        if self.spec.train.replay is not None:  # the model's own share of history, over the job's
            replay = self.spec.train.replay
        if not retrain and replay > 0 and block > 0:
            draw = self._replay_sampler(seen, block, int(round(replay * len(positives))), replay_by)
        valid = None
        if self.spec.train.select == "best_valid" and epochs > 0:
            relevant, exclude = self.pairs.eval_sets(seen, block, VALID, exact=True)
            valid = (relevant, exclude) if int((relevant.degree > 0).sum()) > 0 else None
        floor_log, fusion_choice, evidence = {}, None, {}
        if len(knowledge) > 1 and (teacher_floor is not None or choose_weights):  # each teacher's figure, once
            evidence = self._teacher_evidence(knowledge, valid)
        if teacher_floor is not None and len(knowledge) > 1:
            knowledge, weights, floor_log = self._teacher_floor(knowledge, weights, evidence, teacher_floor)
        if choose_weights and len(knowledge) > 1 and valid is not None:
            weights, fusion_choice = self._fusion_weights(knowledge, fusion, valid, evidence)
        self.fusion_penalty, matched = self._fusion_penalty(seen, block, knowledge, fusion, weights, fusion_popularity,
                                                            fusion_popularity_tolerance, valid)
        grid = self._grid() if not self.chosen else [{}]
        warm = had is not None and not retrain  # a trained model continuing on a new block
        if warm and self.spec.train.grid_block:  # chosen again at every warm update, on this block's validation
            grid = [{**g, **w} for g in grid for w in self._grid(self.spec.train.grid_block)]
        keep_choice = next((s for s in terms if getattr(s, "name", "") == "keep" and getattr(s, "weights", ())), None)
        if warm and keep_choice is not None and valid is not None:  # keep's weight, chosen at every warm update
            grid = [{**g, KEEP_WEIGHT: w} for g in grid for w in keep_choice.weights]
        # train.lr_block: what the model had before this block steps at the warm rate (new rows at lr)
        slowed = self.spec.train.lr_block is not None or "lr_block" in self.spec.train.grid_block
        slow = rows_before(self.model, *had) if slowed and warm else None
        # train.grid_block_probe: the warm grid raced — every combination trains that many epochs on its own copy
        # of the model, and only the best on validation so far goes on to its end
        probe = self.spec.train.grid_block_probe if (warm and self.spec.train.grid_block and len(grid) > 1
                                                     and valid is not None and trajectory is None
                                                     and KEEP_WEIGHT not in grid[0] and self.parallel is None) else 0
        # the same start for every fit: the race copies the untouched model, the sequential grid reloads it
        sequential = len(grid) > 1 and not probe
        start = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if sequential else None
        origin = self.model
        fits, runs = [], []
        for overrides in grid:
            if probe:  # a copy of its own, so that every run can be paused and taken up again
                getattr(origin, "restart_noise", lambda: None)()  # its noise from the start (a generator does not copy)
                self.model = race_copy(origin)
            elif start is not None:
                self.model.load_state_dict(start)
                getattr(self.model, "restart_noise", lambda: None)()  # a model's own noise (MultVAE) as well
            if warm and "shrink_block" in overrides:  # the rows it had before the block, as a plain shrink would
                self._shrink_perturb(block, overrides["shrink_block"], rows_before(self.model, *had))
            settings = {k: v for k, v in overrides.items() if k != KEEP_WEIGHT}
            train_spec = self.spec.train.model_copy(update={**self.chosen, **settings})
            if warm and train_spec.patience_block is not None:
                train_spec = train_spec.model_copy(update={"patience": train_spec.patience_block})
            if warm and train_spec.batch_size_block is not None:
                train_spec = train_spec.model_copy(update={"batch_size": train_spec.batch_size_block})
            slow_rows = (train_spec.lr_block / train_spec.lr, slow) if slow and train_spec.lr_block is not None else None
            fit_args = (seen, block, u, i, known, epochs, train_spec, knowledge,
                        with_keep_weight(terms, overrides.get(KEEP_WEIGHT)), fusion, weights,
                        trajectory, scope, trained, valid, draw, len(grid) > 1, slow_rows,
                        train_spec.warmup_block if warm else 0.0)
            if probe:
                run = self._begin_fit(*fit_args)
                self._advance(run, probe)
                runs.append((overrides, run))
            else:
                fits.append((overrides, self._fit(*fit_args)))
        if probe:
            overrides, fit = self._race(runs)
            fits = [(o, fit if o is overrides else self._probe_figures(r)) for o, r in runs]
            kept = {name: float(v) for name, v in overrides.items() if name in self.spec.train.grid}
            if kept:
                self.chosen = kept
        elif len(grid) > 1:
            if KEEP_WEIGHT in overrides:
                overrides, fit = choose_keep(fits, keep_choice.tolerance)
            else:
                overrides, fit = choose_fit(fits, self.spec.train.grid_prefer, self.spec.train.grid_tolerance)
            self.model.load_state_dict(fit["weights"])
            self._trajectory = fit["trajectory"]
            self.term_state.update(fit["carried"])
            kept = {name: float(v) for name, v in overrides.items() if name in self.spec.train.grid}
            if kept:  # the base grid's choice (a warm update's grid_block choice is not kept)
                self.chosen = kept
        else:
            overrides, fit = fits[0]
            if self.spec.train.grid and not self.chosen:  # a grid of one combination
                self.chosen = {name: float(v) for name, v in overrides.items() if name in self.spec.train.grid}
        if proxies is not None:
            from .proxies import Proxies

            if self.proxies is None:
                self.proxies = Proxies.from_spec(proxies)
            self.proxies.update(self.model)
        self.block = block
        penalty_grid = self._choose_penalty(seen, valid)
        calibration = self._calibrate(seen) if self.spec.calibrate == "mar" else None
        served = matched.get("fusion_popularity", {})
        # where the served student's lists landed (its rank penalty or calibration installed): the match ran and
        # was used, or needed no penalty (β 0); a match the tolerance refused taught nothing to correct
        if fusion_popularity == "served" and "least_avgpop" in served and (served["used"] or served["beta"] == 0):
            served.update(self._served_popularity(seen, block, knowledge, known, served))
        logs = fit["logs"]
        return {
            "model": self.spec.name, "block": block, "epochs": len(logs), "best_epoch": fit["best_epoch"],
            "valid_ndcg@20": fit["valid"], "train_rows": len(positives), "replay_rows": fit["replay_rows"],
            "terms": fit["terms"], "chosen": dict(self.chosen), **(fusion_choice or {}), **matched, **floor_log,
            "chosen_block": {name: float(v) for name, v in overrides.items()
                             if name in self.spec.train.grid_block or name == KEEP_WEIGHT},
            "grid": [{**o, "valid_ndcg@20": f["valid"], "valid_avgpop@20": f["valid_avgpop"], "best_epoch": f["best_epoch"],
                      "epochs": len(f["logs"])} for o, f in fits] if len(fits) > 1 else [],
            "seconds": time.perf_counter() - t0, "started_at": started, "ended_at": time.time(),
            # training alone (KD terms included; not validation, knowledge building or the grid's other fits)
            "train_seconds": sum(log.seconds for log in logs), "trained_rows": sum(log.rows for log in logs),
            "rank_penalty": self.penalty_beta,
            "rank_penalty_grid": [{"beta": b, "valid_ndcg@20": v} for b, v in penalty_grid.items()],
            **({"calibration": calibration} if calibration is not None else {}),
            "base_loss": logs[-1].base_loss if logs else float("nan"),
            "kd_loss": logs[-1].kd_loss if logs else float("nan"),
        }

    @torch.no_grad()
    def _shrink_perturb(self, block: int, shrink: float, rows: dict | None = None) -> None:
        """``train.shrink_block`` / ``perturb_block``: θ ← shrink · θ + perturb · std(θ) · ε for every parameter,
        before a warm update (the noise from this model's and block's own seed). ``rows`` (parameter → leading
        rows, ``rows_before``): only those rows (a model already grown to the block: what it had before; the
        new rows stay as grown); a parameter it lacks (0-d) is left as it is."""
        perturb = self.spec.train.perturb_block
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.spec.name, "shrink", block))
        for p in self.model.parameters():
            if rows is not None:
                if p not in rows:
                    continue
                p = p[: rows[p]]
            scale = perturb * float(p.std()) if perturb > 0 and p.numel() > 1 else 0.0  # std(θ) before the shrink
            p.mul_(shrink)
            if scale > 0:
                p.add_(torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype), alpha=scale)

    def _choose_penalty(self, seen: Interactions, valid) -> dict[float, float]:
        """``rank_penalty``: β chosen on this block's validation (kept as it was when the block has none),
        the penalty from this block's training counts, installed on the model's ``full_scores``."""
        if not self.spec.rank_penalty:
            return {}
        popularity = self.pairs.popularity(seen)
        figures = {}
        if valid is not None:
            relevant, exclude = valid
            step = users_per_chunk(self.model.num_items, device=self.device)

            def ndcg() -> float:
                out = evaluate_ranking(self.model, relevant, exclude, (20,), step, self.device)
                return out["ndcg@20"] or 0.0

            self.penalty_beta, figures = rank_penalty.choose(self.model, self.spec.rank_penalty,
                                                             self.spec.rank_penalty_tolerance, popularity, ndcg)
        self.penalty = rank_penalty.penalty_of(self.penalty_beta, popularity)
        rank_penalty.install(self.model, self.penalty)
        return figures

    def _calibrate(self, seen: Interactions) -> dict:
        """``calibrate: mar``: the model's ranking calibrated on the labelled sample that came with the blocks
        (``meta["labelled"]``: rows collected up to this block), installed like a rank penalty (kept as it
        was when no sample came). → what was fitted, for the update's log."""
        sample = seen.meta.get("labelled")
        if sample is None:
            rank_penalty.install(self.model, self.penalty)
            return {"rows": 0}
        users, items, labels = (torch.as_tensor(x) for x in sample)
        ok = (users < self.model.num_users) & (items < self.model.num_items)
        users, items, labels = users[ok], items[ok], labels[ok]
        with torch.no_grad():  # the model's own scores of the sample's pairs, one chunk of users at a time
            uniq, where = torch.unique(users, return_inverse=True)
            scores = torch.empty(len(users), dtype=torch.float32)
            step = users_per_chunk(self.model.num_items, device=self.device)
            for start in range(0, len(uniq), step):
                rows = (where >= start) & (where < start + step)
                full = self.model.full_scores(uniq[start : start + step].to(self.device))  # only the sample's pairs
                scores[rows] = full[(where[rows] - start).to(full.device), items[rows].to(full.device)].float().cpu()
        vector, info = calibrate(scores, items, labels, self.pairs.popularity(seen), self.model.num_items,
                                 self.spec.calibrate_l2, derive_seed(self.seed, self.spec.name, "calibrate"))
        if vector is not None:  # fitted: the result replaces the last one
            self.penalty, self.penalty_beta = vector.to(self.device), 0.0
        rank_penalty.install(self.model, self.penalty)
        return info

    def _fusion_weights(self, knowledge: list[Knowledge], fusion: str, valid,
                        evidence: dict) -> tuple[list[float], dict]:
        """Teachers' fusion weights chosen on validation pairs: this block's evidence (each teacher's lists'
        NDCG@20 — ``evidence``, from ``_teacher_evidence`` — and each candidate power's fused-list NDCG@20, summed
        over the block's validation users) joins what earlier blocks gave; the power with the most so far weights
        the teachers by their NDCG@20 so far (a small block's validation alone would pick a different teacher every
        block)."""
        from ..distill.fusion import choose_power, fusion_evidence, sharpened_weights

        relevant, _ = valid
        users, lists = self._valid_lists(knowledge, valid)
        ev = self.fusion_evidence
        ndcgs = [evidence[k.source][1] for k in knowledge]
        _, sums = fusion_evidence(lists, users, relevant, None, fusion, num_items=self.model.num_items, ndcgs=ndcgs)
        for power, total in sums.items():
            ev[f"power{power}"] = ev.get(f"power{power}", 0.0) + total
        power = choose_power({p: ev.get(f"power{p}", 0.0) for p in sums})
        weights = sharpened_weights(ndcgs, power)
        return weights, {"teacher_weights": weights, "weight_power": power,
                         "teacher_valid_ndcg@20": [evidence[k.source][0] for k in knowledge],
                         "teachers": [k.source for k in knowledge],
                         "fusion_valid_ndcg@20": {str(p): t / max(len(users), 1) for p, t in sums.items()}}

    def _teacher_evidence(self, knowledge: list[Knowledge], valid) -> dict[str, tuple[float, float]]:
        """{source: (its lists' validation NDCG@20 on this block — nan without validation users —, the same over
        every block's validation users so far)}: this block's figure joins the evidence kept under each list's name
        (``teacher:<source>``, ``users:<source>``; ``teacher_weights: chosen`` and ``teacher_floor`` read it), so a
        teacher left out of some updates keeps its own. An update without validation pairs adds nothing."""
        from ..distill.fusion import fusion_evidence

        ev = self.fusion_evidence
        self._named_evidence(knowledge)
        now = [math.nan] * len(knowledge)
        if valid is not None:
            relevant, _ = valid
            users, lists = self._valid_lists(knowledge, valid)
            if len(users):  # (no validation user listed: nothing to add)
                now, _ = fusion_evidence(lists, users, relevant, None, "rank", num_items=self.model.num_items,
                                         powers=())
                for k, value in zip(knowledge, now):
                    ev[f"teacher:{k.source}"] = ev.get(f"teacher:{k.source}", 0.0) + value * len(users)
                    ev[f"users:{k.source}"] = ev.get(f"users:{k.source}", 0.0) + len(users)
        return {k.source: (value, ev.get(f"teacher:{k.source}", 0.0) / max(ev.get(f"users:{k.source}", 0.0), 1.0))
                for k, value in zip(knowledge, now)}

    def _named_evidence(self, knowledge: list[Knowledge]) -> None:
        """Evidence saved before it was kept by name (``teacher<t>`` by position, one ``users`` count: every
        teacher every block) moves to each teacher's name, in the order of ``knowledge``."""
        ev = self.fusion_evidence
        for t, k in enumerate(knowledge):
            if f"teacher{t}" in ev and f"teacher:{k.source}" not in ev:
                ev[f"teacher:{k.source}"], ev[f"users:{k.source}"] = ev.pop(f"teacher{t}"), ev.get("users", 0.0)
        if not any(key.startswith("teacher") and key[7:].isdigit() for key in ev):
            ev.pop("users", None)

    def _valid_lists(self, knowledge: list[Knowledge], valid) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(users, their lists): the listed users with validation pairs, and each knowledge list of theirs with
        the pairs validation hides taken out (what evaluation would mask)."""
        from ..distill.fusion import without

        relevant, hidden = valid
        users = torch.as_tensor(knowledge[0].users, dtype=torch.int64, device=self.device)
        inside = users < relevant.num_users
        users = users[inside]
        rows = torch.nonzero(relevant.degree[users] > 0).squeeze(1)  # listed users with validation pairs
        users = users[rows]
        return users, [without(torch.as_tensor(k.items, dtype=torch.int64, device=self.device)[inside][rows], users,
                               hidden) for k in knowledge]

    def _teacher_floor(self, knowledge: list[Knowledge], weights, evidence: dict, floor: float):
        """(the lists kept, their weights, what the update's log records) of ``distill.teacher_floor``: a list whose
        validation NDCG@20 over every block's validation users so far (``evidence``, from ``_teacher_evidence``) is
        under ``floor`` × the best one's is left out — a teacher that has collapsed on a stream (far below the
        others) only dilutes the fused target. No evidence yet: every list kept."""
        ndcgs = [evidence[k.source][1] for k in knowledge]
        keep = [v >= floor * max(ndcgs) for v in ndcgs]
        log = {"teacher_floor": {"valid_ndcg@20": {k.source: v for k, v in zip(knowledge, ndcgs)},
                                 "left_out": [k.source for k, kept in zip(knowledge, keep) if not kept]}}
        if all(keep):
            return knowledge, weights, log
        usable = weights is not None and len(weights) == len(knowledge)
        return ([k for k, kept in zip(knowledge, keep) if kept],
                [w for w, kept in zip(weights, keep) if kept] if usable else weights, log)

    def _fusion_penalty(self, seen, block, knowledge: list[Knowledge], fusion: str, weights, mode: str,
                        tolerance: float | None, valid):
        """(penalty (I,) or None, what the update's log records) of ``distill.fusion_popularity``: with
        ``least_teacher`` and several lists, β · log(1 + training count) with β the least whose fused top-20 is
        no more popular than the least popular list's (``popularity_matched_beta``, on a seeded sample of users).
        With a ``tolerance``, the penalty is used only while the matched fusion's validation NDCG@20, summed over
        every block's validation users so far (kept with ``fusion_evidence``), is at least (1 − tolerance) × the
        plain fusion's: where the popular items are what users pick (a sparse stream), matching costs too much."""
        if mode == "none" or not knowledge:
            return None, {}
        if len(knowledge) < 2:  # one list (one teacher, or the others left out by teacher_floor): nothing fused
            return None, {"fusion_popularity": {"beta": 0.0, "used": False, "lists": 1}}
        from ..distill.fusion import fuse_rankings, list_ndcg, log_popularity, popularity_matched_beta

        lists = [torch.as_tensor(k.items, dtype=torch.int64, device=self.device) for k in knowledge]
        counts = self.pairs.item_counts(seen)
        usable = weights if weights is not None and len(weights) == len(lists) else None
        scale = math.exp(self.fusion_evidence.get(SERVED_SCALE, 0.0)) if mode == "served" else 1.0
        beta, figures = popularity_matched_beta(lists, counts, fusion, usable, num_items=self.model.num_items,
                                                seed=derive_seed(self.seed, "fusion_popularity", block),
                                                target_scale=scale)
        penalty = beta * log_popularity(counts, self.model.num_items, self.device) if beta > 0 else None
        log = {"beta": beta, **figures, **({"served_scale": scale} if mode == "served" else {})}
        if tolerance is not None and penalty is not None:
            ev = self.fusion_evidence
            if valid is not None:  # this block's evidence joins the earlier blocks'
                relevant, _ = valid
                users, vlists = self._valid_lists(knowledge, valid)
                if len(users):
                    for key, pen in (("popularity_fused", None), ("popularity_matched", penalty)):
                        fused = fuse_rankings(vlists, 20, fusion, usable, num_items=self.model.num_items,
                                              item_penalty=pen)[0]
                        ev[key] = ev.get(key, 0.0) + float(list_ndcg(fused, users, relevant).sum())
            plain, matched = ev.get("popularity_fused", 0.0), ev.get("popularity_matched", 0.0)
            log.update({"valid_ndcg_sum_fused": plain, "valid_ndcg_sum_matched": matched})
            if matched < (1.0 - tolerance) * plain:  # (no validation yet: 0 ≥ 0, used)
                penalty = None
        log["used"] = penalty is not None
        return penalty, {"fusion_popularity": log}

    @torch.no_grad()
    def _served_popularity(self, seen, block, knowledge: list[Knowledge], known, log: dict) -> dict:
        """``fusion_popularity: served``, after the student's update: its own top-20 (as it ranks when served) on the
        users the match was measured on, against the least popular teacher's there. The ratio r (student ÷ that
        teacher) corrects the next updates' target: log scale −= log r, within [log 1/2, log 2]; where the fused
        lists needed no penalty (β 0) the scale only comes down (a student under the teacher then owes nothing to
        the target, and raising it would only wind the correction up)."""
        from ..distill.fusion import lists_avgpop, padded_counts, sampled_rows

        users = torch.as_tensor(knowledge[0].users, dtype=torch.int64)
        take = sampled_rows(len(users), 1024, derive_seed(self.seed, "fusion_popularity", block))
        users = (users if take is None else users[take]).to(self.device)
        items, _ = top_k_items(self.model, users, min(20, self.model.num_items), known)
        own = lists_avgpop(items, padded_counts(self.pairs.item_counts(seen), self.model.num_items, self.device))
        ratio = own / log["least_avgpop"] if log["least_avgpop"] > 0 else 1.0
        scale = self.fusion_evidence.get(SERVED_SCALE, 0.0)
        if ratio > 0 and (log["beta"] > 0 or ratio > 1):
            scale = min(max(scale - math.log(ratio), -math.log(2.0)), math.log(2.0))
        self.fusion_evidence[SERVED_SCALE] = scale
        return {"student_avgpop": own, "served_ratio": ratio, "served_scale_next": math.exp(scale)}

    def _grid(self, grid: dict | None = None) -> list[dict]:
        """Every combination of ``grid`` (default ``train.grid``; one empty combination without a grid)."""
        grid = self.spec.train.grid if grid is None else grid
        names = sorted(grid)
        return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]

    def _fit(self, seen, block, u, i, known, epochs, train_spec, knowledge, terms, fusion, weights, trajectory,
             scope, trained, valid, draw, keep: bool = False, slow_rows=None, warmup: float = 0.0) -> dict:
        """One training run of the update (one grid combination): terms built afresh, the same seed."""
        run = self._begin_fit(seen, block, u, i, known, epochs, train_spec, knowledge, terms, fusion, weights,
                              trajectory, scope, trained, valid, draw, keep, slow_rows, warmup)
        self._advance(run)
        return self._end_fit(run, keep)

    def _begin_fit(self, seen, block, u, i, known, epochs, train_spec, knowledge, terms, fusion, weights, trajectory,
                   scope, trained, valid, draw, keep: bool = False, slow_rows=None, warmup: float = 0.0) -> dict:
        """A training run of ``self.model`` set up, no epoch trained yet: ``_advance`` trains it, ``_end_fit``
        closes it (a warm grid's race holds several, each on its own copy of the model)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.spec.name, "train", block))
        built = self._build_terms(seen, block, knowledge, terms, fusion, weights, known, epochs, scope, trained)
        self._trajectory, self._trajectory_of = [], (block, scope)
        hooks = []
        if trajectory is not None and epochs > 0:
            hooks.append(self._checkpoint_hook(seen, block, epochs, *trajectory, known, scope))
        best = None
        if valid is not None:
            best = BestEpoch(self.model, *valid, patience=train_spec.patience, every=train_spec.valid_every,
                             cap=epochs, chunk_size=0, device=self.device,
                             item_popularity=self.pairs.popularity(seen) if keep else None,
                             sample=train_spec.valid_users, seed=derive_seed(self.seed, "valid", block))
            hooks.append(best)
        replayed = [0]

        def draw_counted(generator):
            ru, ri = draw(generator)
            replayed[0] = len(ru)
            return ru, ri

        epochs_left = iter_epochs(self.model, u, i, known, epochs, train_spec, gen, built,
                                  (lambda e: any([bool(h(e)) for h in hooks])) if hooks else None,
                                  draw_counted if draw is not None else None,
                                  self.pairs.item_counts(seen)
                                  if train_spec.negatives == "popularity" or train_spec.debias != "none" else None,
                                  parallel=self.parallel, slow_rows=slow_rows, warmup=warmup)
        return {"model": self.model, "epochs": epochs_left, "logs": [], "built": built, "best": best,
                "replayed": replayed, "done": False, "who": f"{self.role} {self.spec.name!r}, block {block}"}

    @staticmethod
    def _advance(run: dict, epochs: int | None = None) -> bool:
        """Train ``run`` for up to ``epochs`` more epochs (None: to its end: the cap or an early stop); True when
        it has ended."""
        if run["done"]:
            return True
        for _ in range(epochs) if epochs is not None else itertools.count():
            try:
                log = next(run["epochs"], None)
            except TrainingDiverged as e:
                raise CkdError(f"{run['who']}: training diverged at {e} (its last committed snapshot stays as it "
                               f"was); lower train.lr or the KD terms' weights, then `ckd submit` again") from None
            if log is None:
                run["done"] = True
                break
            run["logs"].append(log)
        return run["done"]

    def _race(self, runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
        """A warm grid's race (``train.grid_block_probe``): of the runs paused after their probe epochs, the one
        ``choose_fit`` takes on the best validation NDCG@20 so far goes on to its end and becomes the model; the
        others stop where they are. → (its combination, its fit)."""
        overrides, _ = choose_fit([(o, self._probe_figures(r)) for o, r in runs], self.spec.train.grid_prefer,
                                  self.spec.train.grid_tolerance)
        for o, run in runs:
            if o is not overrides:
                run["epochs"].close()
        run = next(r for o, r in runs if o is overrides)
        self.model = run["model"]
        self._advance(run)
        return overrides, self._end_fit(run)

    @staticmethod
    def _probe_figures(run: dict) -> dict:
        """A raced run's validation so far, as a fit reports it."""
        best = run["best"]
        return {"valid": best.best, "valid_avgpop": best.best_avgpop, "best_epoch": best.best_epoch,
                "logs": run["logs"]}

    def _end_fit(self, run: dict, keep: bool = False) -> dict:
        """Close ``run`` (an unfinished one stops where it is) and put its best validation epoch back."""
        run["epochs"].close()
        best, built, logs = run["best"], run["built"], run["logs"]
        if best is not None:
            best.restore()
        carried = {}
        for term in built:
            c = term.carry()
            if c is not None:
                carried[term.name] = c
        if not keep:
            self.term_state.update(carried)
        return {"logs": logs, "terms": [t.name for t in built], "carried": carried,
                "best_epoch": best.best_epoch if best is not None else len(logs),
                "valid": best.best if best is not None else None, "replay_rows": run["replayed"][0],
                "valid_avgpop": best.best_avgpop if best is not None else None,
                "trajectory": list(self._trajectory),
                "weights": {k: v.detach().clone() for k, v in run["model"].state_dict().items()} if keep else None}

    def _replay_sampler(self, seen: Interactions, block: int, n: int, by: str):
        """A draw of ``n`` (user, item) pairs from what the model may know of blocks before ``block``:
        ``by="user"`` picks a user of the history uniformly, then one of their pairs; ``"pair"`` a pair
        uniformly. Vectorised (users sorted once; a draw is two random tensors)."""
        mask = model_pairs_mask(seen, block) & ~((seen.block == block) & (seen.split == TRAIN))
        hist = seen.select(mask)
        if len(hist) == 0 or n == 0:
            return None
        order = np.argsort(hist.users, kind="stable")
        hu = torch.as_tensor(hist.users[order], dtype=torch.int64, device=self.device)
        hi = torch.as_tensor(hist.items[order], dtype=torch.int64, device=self.device)
        users, counts = torch.unique_consecutive(hu, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts

        def sample(generator: torch.Generator):
            if by == "pair":
                idx = torch.randint(len(hu), (n,), generator=generator).to(self.device)
            else:
                who = torch.randint(len(users), (n,), generator=generator).to(self.device)
                offset = (torch.rand(n, generator=generator).to(self.device) * counts[who]).long()
                idx = starts[who] + torch.minimum(offset, counts[who] - 1)
            return hu[idx], hi[idx]

        return sample

    def _build_terms(self, seen, block, knowledge: list[Knowledge], specs, fusion, weights, known, epochs, scope,
                     trained: bool = True):
        specs = [s for s in specs if trained or not TERMS[s.name].needs_trained_model(s)]
        if not specs:
            return []
        own: list[Knowledge] = []
        names = {s.name for s in specs}
        size = max([getattr(s, "k", 0) for s in specs] + [getattr(s, "top", 0) for s in specs] + [1])
        if "keep" in names:  # the model's own order before this block's update (keep reads own[0])
            own.append(self.knowledge(seen, block, size, scope=scope))
        if self.proxies is not None and "replay" in names:  # the proxies' lists for the block's users
            own += self._proxy_lists(seen, block, size, scope)
        ctx = TermContext(model=self.model, knowledge=knowledge, known=known, num_users=self.model.num_users,
                          num_items=self.model.num_items, block=block, epochs=epochs, device=self.device,
                          role=self.role, fusion=fusion,
                          weights=weights if weights is not None and len(weights) == len(knowledge) else None,
                          fusion_penalty=self.fusion_penalty,
                          item_popularity=self.pairs.item_counts(seen), own=own, meta=seen.meta,
                          block_users=self._users(seen, block, "block") if "keep" in names else None)
        built = []
        for s in specs:
            cls = TERMS[s.name]
            if cls.needs_knowledge(s) and not knowledge:
                continue
            if s.name == "replay" and s.source == "proxies" and not any(
                    k.source.startswith(PROXY_PREFIX) for k in [*own, *knowledge]):
                continue  # no proxies yet (the first block)
            built.append(cls(s, replace(ctx, state=self.term_state.get(s.name))))
        return built

    def _checkpoint_hook(self, seen, block, epochs, checkpoints, size, known, scope="block"):
        users = self._users(seen, block, scope)
        at = {max(1, round(epochs * (c + 1) / checkpoints)) for c in range(checkpoints)}

        def record(epoch: int) -> None:
            if epoch in at:
                items, _ = top_k_items(self.model, users, min(size, self.model.num_items), known)
                self._trajectory.append(items.cpu().numpy())

        return record

    @torch.no_grad()
    def knowledge(self, seen: Interactions, block: int, size: int, unkd_groups: int = 0, per_group: int = 0,
                  observed: int = 0, item_users: int = 0, vectors: bool = False, scope: str = "block") -> Knowledge:
        """Top-``size`` unobserved items for every user with training data in ``block`` (``scope="all"``:
        in any block so far); with ``unkd_groups`` also the top-``per_group`` items inside each
        popularity group; with ``observed`` the model's ranking of the user's own known items
        (HetComp's ordered observed targets); with ``item_users`` the top users of every item (IR-RRD);
        with ``vectors`` the user and item tables whose dot products are the model's scores (BD ranks
        every item by them: (U + I) × d floats, never U × I).
        The model is grown to the block's id spaces first (a teacher asked before its update)."""
        self.grow(seen, block)
        users = self._users(seen, block, scope)
        known = self.observe(seen, block)
        items, scores = top_k_items(self.model, users, min(size, self.model.num_items), known)
        group_items = None
        if unkd_groups:
            item_group = popularity_groups(self.pairs.item_counts(seen), unkd_groups)
            group_items = teacher_group_rankings(self.model, users, item_group, per_group, known).cpu().numpy()
        observed_items = None
        if observed:
            observed_items = top_k_items(self.model, users, observed, only=known)[0].cpu().numpy()
        item_ids = item_lists = None
        if item_users:
            from ..eval.metrics import top_k_users

            all_items = torch.arange(self.model.num_items, device=self.device)
            item_lists = top_k_users(self.model, all_items, min(item_users, self.model.num_users), known)[0]
            item_ids, item_lists = all_items.cpu().numpy(), item_lists.cpu().numpy()
        user_vectors = item_vectors = None
        if vectors:
            u_all, i_all = self.model.embeddings()
            user_vectors, item_vectors = u_all[users].float().cpu().numpy(), i_all.float().cpu().numpy()
        # a trajectory only describes the users of the update that recorded it (asked before this
        # block's update, e.g. CCD's order, the teacher has none for these users)
        trajectory = tuple(self._trajectory) if self._trajectory_of == (block, scope) else ()
        return Knowledge(self.spec.name, block, users.cpu().numpy(), items.cpu().numpy(),
                         scores.float().cpu().numpy(), group_items, trajectory, observed_items,
                         item_ids, item_lists, user_vectors, item_vectors)

    @torch.no_grad()
    def feedback(self, seen: Interactions, block: int, size: int, scope: str = "block", **request) -> list[Knowledge]:
        """What this model hands the other side as feedback: its own lists (with whatever the other
        side's terms ask for: ``knowledge``'s options), then its proxies' lists (if any)."""
        out = [self.knowledge(seen, block, size, scope=scope, **request)]
        if self.proxies is not None:
            out += self._proxy_lists(seen, block, size, scope)
        return out

    def _proxy_lists(self, seen: Interactions, block: int, size: int, scope: str) -> list[Knowledge]:
        """The stability and plasticity proxies' top lists for the block's users. The proxies are first
        grown like the model (new rows = the model's rows, as ``Proxies.update`` does)."""
        from .proxies import Proxies, proxy_knowledge

        grown = Proxies.from_state(self.proxies.state())
        grown.weights = {name: 1.0 for name in grown.weights}  # w = 1: keep the proxy, take only new rows
        grown.update(self.model)
        models = grown.models(lambda nu, ni: build_backbone(self.spec.backbone, nu, ni, **self.spec.backbone_params()))
        known = self.pairs.known(seen, block, by_item=any(getattr(m, "needs_item_major", False) for m in models))
        models = tuple(m.to(self.device) for m in models)
        for m in models:
            observe_pairs(m, known)
        return proxy_knowledge(models, self._users(seen, block, scope), size, known, block)

    @torch.no_grad()
    def evaluate(self, seen: Interactions, blocks: list[int], spec: EvalSpec, split: int = TEST) -> dict[int, dict]:
        """Full-ranking metrics on ``split`` of each of ``blocks`` (everything else seen is masked)."""
        out = {}
        self.observe(seen)
        popularity = self.pairs.popularity(seen)  # training pairs only (eval.protocol.training_popularity)
        groups = popularity_groupings(popularity, spec.mass_groups)  # head/mid/tail + UnKD's eq groups
        step = users_per_chunk(self.model.num_items, spec.chunk_size, spec.memory_mb, self.device)  # users per chunk
        if spec.mask == "standard" and len(blocks) > 1:
            # one hidden set (train + valid) for every block's targets: every user ranked once for all of
            # them (one pass, not one per block), the same figures as a pass per block
            sets = {b: self.pairs.eval_sets(seen, b, split, spec.mask) for b in blocks}
            exclude = next(iter(sets.values()))[1]
            return evaluate_many(self.model, {b: r for b, (r, _) in sets.items()}, exclude, spec.ks, step,
                                 self.device, sample=spec.sample_users,
                                 seeds={b: derive_seed(self.seed, "eval", b, split) for b in blocks},
                                 keep_relevant=True, item_popularity=popularity, item_group=groups)
        for b in blocks:
            relevant, exclude = self.pairs.eval_sets(seen, b, split, spec.mask)  # exclude may hold targets: kept
            out[b] = evaluate_ranking(self.model, relevant, exclude, spec.ks, step, self.device,
                                      sample=spec.sample_users, seed=derive_seed(self.seed, "eval", b, split),
                                      keep_relevant=True,
                                      item_popularity=popularity, item_group=groups)
        return out

    def validate(self, seen: Interactions, block: int, spec: EvalSpec) -> dict:
        return self.evaluate(seen, [block], spec, VALID)[block]

    def evaluate_block(self, seen: Interactions, block: int, spec: EvalSpec) -> dict:
        """After block k: test metrics of every block ≤ k (k's own = plasticity, the earlier ones =
        stability), their plasticity/stability/H-mean summary, the pooled figure (every block's test pairs
        as one test set), validation metrics of block k."""
        per_block = self.evaluate(seen, [*range(block + 1), None], spec)
        pooled = per_block.pop(None)
        return {"test": per_block[block], "earlier": {b: m for b, m in per_block.items() if b < block},
                "continual": plasticity_stability(per_block, block), "valid": self.validate(seen, block, spec),
                "pooled": pooled, "parameters": self.num_parameters()}
