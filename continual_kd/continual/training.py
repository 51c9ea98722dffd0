"""The training loop shared by every model: its own loss on (user, positive, sampled negative) + KD terms.

One visible loop over epochs and mini-batches; sampling is a tensor operation per epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..config import TrainSpec
from ..errors import CkdError
from ..distill.base import Batch, KDTerm
from ..sparse import UserItemSet, popularity_weights, sample_excluding
from .debias import loss_shaping
from .optim import SlowRows, make_optimizer


@dataclass
class EpochLog:
    epoch: int
    base_loss: float
    kd_loss: float
    seconds: float = 0.0  # the epoch's training: terms' resampling, negatives, steps (not the end-of-epoch hooks)
    rows: int = 0  # (user, item) pairs trained in the epoch, replayed ones included


def epoch_batch_size(spec: TrainSpec, n: int) -> int:
    """The batch size of an epoch of ``n`` rows (or users): ``batch_size``, smaller where that would give
    fewer than ``min_batches`` batches."""
    if spec.min_batches <= 0 or n <= 0:
        return spec.batch_size
    return max(1, min(spec.batch_size, -(-n // spec.min_batches)))


def train_epochs(*args, **kwargs) -> list[EpochLog]:
    """Every epoch of ``iter_epochs`` (the same arguments) at once: the logs of the epochs trained."""
    return list(iter_epochs(*args, **kwargs))


def iter_epochs(model, users: torch.Tensor, items: torch.Tensor, known: UserItemSet, epochs: int,
                spec: TrainSpec, generator: torch.Generator, terms: Sequence[KDTerm] = (),
                on_epoch_end: Callable[[int], bool | None] | None = None,
                replay: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
                item_popularity: torch.Tensor | None = None, parallel=None,
                slow_rows: tuple[float, dict] | None = None, warmup: float = 0.0) -> Iterator[EpochLog]:
    """Train ``model`` for ``epochs`` on the (users, items) positives; negatives avoid ``known``.

    ``terms``: KD terms (``distill.base.KDTerm``); each draws its targets in ``resample(generator,
    epoch)`` before every epoch. The batch loss is ``b · base_loss + Σ_t weight_t(epoch) · loss_t``
    (all summed over the batch), with ``b`` the smallest ``base_weight`` any term asks for (1 without
    terms; HetComp's student learns from its KD loss alone). Terms' own parameters are stepped by the
    same optimiser. After each epoch (1-based) every term's ``on_epoch_end`` and then
    ``on_epoch_end(epoch)`` run with the model in eval mode; a true return stops training (early
    stopping). ``replay(generator)`` gives (users, items) drawn from earlier blocks, added to each
    epoch's positives (a fresh draw per epoch). With ``spec.negatives == "popularity"`` negatives are
    drawn ∝ (``item_popularity`` + 1)^``spec.negative_exponent`` instead of uniformly. With ``spec.debias``
    (ips / pda) the model's ``base_loss`` gets the ``shaping`` of ``continual.debias.loss_shaping`` (from
    ``item_popularity``): IPS-weighted positives or PDA's popularity in the training score. A model with ``batch_unit = "user"`` is trained on
    batches of ``batch_size`` users (its loss reads their rows; replayed users join the epoch's users).
    ``parallel`` (``runtime.train.DataParallel``, on each Ray Train worker): every worker draws the same epoch, takes
    its part of each batch, and DDP sums the gradients over the workers: the same steps as one worker.
    ``slow_rows = (ratio, {parameter: n})``: the rows [0, n) of those parameters step at ratio × ``spec.lr``
    (``optim.SlowRows``; a warm update's ``train.lr_block`` for what the model had before the block).
    ``warmup``: the rate ramps linearly up to ``spec.lr`` over this many epochs' worth of steps (counted on the
    first epoch's batches; a warm update's ``train.warmup_block``).
    Each epoch's log is yielded once its hooks have run, so a caller may pause a run between epochs and take
    it up again (a warm grid's race, ``Learner.update``); closing the iterator ends the run as a stop would.
    """
    terms = [t for t in terms if t.weight > 0]
    base_weight = min([t.base_weight for t in terms], default=1.0)
    n = len(users)
    if n == 0 or epochs == 0:
        return
    device = users.device
    # L2 only on what the batch touches (model.regularization), not Adam's weight_decay: that
    # would shrink every user/item absent from the block by ~lr per step and erase old knowledge
    params = list(model.parameters()) + [p for t in terms for p in t.parameters()]
    try:  # from the optimizer on: the finally below puts the model back whatever fails
        opt = make_optimizer(model, params, spec, parallel)  # Adam, or row-sparse Adam (train.optimizer)
        stepper = SlowRows(opt, *(slow_rows[::-1] if slow_rows else (None, 1.0)))
        if parallel is not None:  # DDP over the model and the terms' own parameters
            parallel.attach(model, terms)
        model.train()
        by_user = getattr(model, "batch_unit", "interaction") == "user"  # e.g. MultVAE: one row per user
        batch_scope = getattr(model, "batch_scope", contextlib.nullcontext)
        block_users, block_items = users, items
        neg_weights = None
        if spec.negatives == "popularity" and item_popularity is not None:
            neg_weights = popularity_weights(item_popularity, model.num_items, spec.negative_exponent)
        # train.debias (continual/debias.py): IPS weights / PDA's popularity factor, handed to base_loss
        shaping = loss_shaping(spec, model.num_items, block_items, item_popularity)
        shaped = {} if shaping is None else {"shaping": shaping}
        softmax = 0 if by_user else int(spec.softmax_negatives)  # a grid's choice arrives as a float
        for epoch in range(epochs):
            started = time.perf_counter()
            for term in terms:
                term.resample(generator, epoch)
            weights = [term.weight_at(epoch) * spec.kd_scale for term in terms]
            users, items = block_users, block_items
            if replay is not None:
                ru, ri = replay(generator)
                users, items = torch.cat([users, ru]), torch.cat([items, ri])
            pairs = len(users)
            if by_user:
                users = torch.unique(users)
            n = len(users)
            size = epoch_batch_size(spec, n)
            if epoch == 0 and warmup > 0:
                stepper.ramp(round(warmup * -(-n // size)))
            perm = torch.randperm(n, generator=generator).to(device)
            u_all = users[perm]
            if by_user:  # the model's loss reads the users' whole rows; no positives/negatives to draw
                p_all = n_all = u_all
            else:
                p_all = items[perm]
                candidates = int(spec.hard_negatives)
                n_all = None if softmax else sample_excluding(u_all, candidates, model.num_items, [known], generator,
                                                               weights=neg_weights)  # (n, candidates)
                n_all = n_all.squeeze(1) if candidates == 1 and n_all is not None else n_all
            base_sum = kd_sum = torch.zeros((), device=device)  # summed on the device: no host sync per batch
            for start in range(0, n, size):
                bu = u_all[start : start + size]
                if n_all is None:  # softmax: a batch's N negatives a positive drawn with it (an epoch's would hold N × its rows)
                    bn = sample_excluding(bu, softmax, model.num_items, [known], generator, weights=neg_weights)
                else:
                    bn = n_all[start : start + size]
                batch = Batch(bu, p_all[start : start + size], bn)
                if parallel is not None:  # this worker's part of the batch
                    batch = parallel.shard(batch)
                with batch_scope():  # the batch's losses may share one forward of the model (LightGCN)
                    if softmax:  # train.softmax_negatives: the positive against all of its negatives
                        loss = softmax_loss(model, batch.users, batch.pos, batch.neg, spec.softmax_temperature)
                        batch = Batch(batch.users, batch.pos, batch.neg[:, 0])  # KD terms and L2 see one, as BPR's
                    else:
                        if batch.neg.dim() == 2:  # train.hard_negatives: the candidate the model scores highest now
                            batch = Batch(batch.users, batch.pos, hardest(model, batch.users, batch.neg))
                        loss = model.base_loss(batch.users, batch.pos, batch.neg, **shaped)
                    base_sum = base_sum + loss.detach()
                    loss = base_weight * loss
                    if spec.weight_decay > 0:
                        loss = loss + spec.weight_decay * model.regularization(batch.users, batch.pos, batch.neg)
                    for term, weight in zip(terms, weights):
                        if weight > 0:
                            kd_loss = term.loss(model, batch, epoch)
                            kd_sum = kd_sum + kd_loss.detach()
                            loss = loss + weight * kd_loss
                if parallel is not None:  # the gradients of every worker's part, summed in backward
                    loss = parallel.synced(loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                stepper.step()
            if parallel is not None:
                base_sum, kd_sum = parallel.total(base_sum), parallel.total(kd_sum)
            log = EpochLog(epoch, float(base_sum) / n, float(kd_sum) / n, time.perf_counter() - started, pairs)
            check_finite(model, log)
            model.eval()
            for term in terms:
                term.on_epoch_end(model, epoch + 1)
            stop = on_epoch_end is not None and on_epoch_end(epoch + 1)
            yield log
            if stop:
                break
            model.train()
    finally:  # also when a step fails: the model leaves the loop in eval mode, with dense gradients
        model.eval()
        if hasattr(model, "row_tape"):
            model.row_tape = None  # dense gradients again outside this update's steps


class TrainingDiverged(CkdError):
    """An epoch's loss or the model's weights stopped being finite: the update cannot be kept."""


def check_finite(model, log: EpochLog) -> None:
    """Raise ``TrainingDiverged`` when ``log``'s losses or any of ``model``'s weights are not finite (one check per
    epoch: a diverged model must never be chosen, saved or served)."""
    bad = [part for part, v in (("base loss", log.base_loss), ("KD loss", log.kd_loss)) if not math.isfinite(v)]
    bad += [f"weights {name}" for name, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise TrainingDiverged(f"epoch {log.epoch + 1}: {', '.join(bad)} not finite")


def softmax_loss(model, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over the batch of −log softmax(s/τ) at the positive, each (B,) positive against its (B, N) negatives
    (``train.softmax_negatives``); the scores of one gather of the batch's rows (LightGCN: the batch's shared
    propagation)."""
    scores = model.score(users, torch.cat([pos.unsqueeze(1), neg], 1)) / temperature  # (B, 1 + N)
    return -torch.log_softmax(scores, 1)[:, 0].sum()


def hardest(model, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B,) the highest-scored of each user's (B, M) candidate negatives (dynamic negative sampling). A model
    with ``candidate_scores`` scores them from the forward its batch shares (LightGCN's propagation, inside
    its ``batch_scope``); any other by ``score`` without gradients."""
    own = getattr(model, "candidate_scores", None)
    if own is not None:
        scores = own(users, candidates)
    else:
        with torch.no_grad():
            scores = model.score(users, candidates)
    return candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)


class BestEpoch:
    """Best-epoch choice on validation: called after each epoch (1-based, model in eval mode) it scores
    the model's NDCG@20 on the validation pairs (every ``every`` epochs and at the ``cap``), keeps a
    copy of the weights whenever the figure improves, and asks to stop once ``patience`` epochs have
    passed without a gain (0: never stops early). ``restore()`` puts the best weights back."""

    def __init__(self, model, relevant: UserItemSet, exclude: UserItemSet, patience: int, every: int, cap: int,
                 chunk_size: int = 1024, device="cpu", k: int = 20, item_popularity: torch.Tensor | None = None,
                 sample: int | None = None, seed: int = 0):
        self.model, self.relevant, self.exclude = model, relevant, exclude
        self.sample, self.seed = sample, seed  # a seeded sample of validation users (the same at every epoch)
        self.patience, self.every, self.cap, self.k = patience, every, cap, k
        self.chunk_size, self.device = chunk_size, device
        self.item_popularity = item_popularity  # given: best_avgpop = avg popularity@k of the best epoch's lists
        self.best: float | None = None
        self.best_avgpop: float | None = None
        self.best_epoch = 0
        self.history: list[tuple[int, float]] = []
        self._weights: dict | None = None
        self._avgpop: float | None = None

    def score(self) -> float:
        from ..eval.metrics import evaluate_ranking

        out = evaluate_ranking(self.model, self.relevant, self.exclude, (self.k,), self.chunk_size, self.device,
                               item_popularity=self.item_popularity, sample=self.sample, seed=self.seed)
        self._avgpop = out.get(f"avgpop@{self.k}")
        return float(out[f"ndcg@{self.k}"] or 0.0)

    def __call__(self, epoch: int) -> bool:
        if epoch % self.every and epoch != self.cap:
            return False
        value = self.score()
        self.history.append((epoch, value))
        if self.best is None or value > self.best:
            self.best, self.best_epoch, self.best_avgpop = value, epoch, self._avgpop
            self._weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return False
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def restore(self) -> None:
        if self._weights is not None:
            self.model.load_state_dict(self._weights)
        self.model.eval()
