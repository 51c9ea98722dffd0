"""Row-sparse Adam for embedding tables (``train.optimizer: lazy_adam``).

Dense Adam costs every step the size of every table: the gradient of a 300k-row user table is
materialised in full, and every row's moments and weights are rewritten, though a batch touches
a thousand rows. With ``lazy_adam`` a model's table lookups go through the optimizer's ``RowTape``
(only the batch's rows, each lookup a leaf of its own) and this optimizer updates the moments and weights
of those rows alone (the "lazy" Adam of large-scale recommenders): a step costs the batch, not the tables,
so training rows/s does not fall as users and items grow. Rows a batch does not touch keep their moments
unchanged (dense Adam would keep moving them by their decaying momentum). Parameters with dense gradients
(KD terms' own weights, a table that a term reads densely) get the ordinary Adam step, with the same bias
correction; a table read both ways steps densely with the tape's rows added in.

Why a tape and not ``F.embedding(sparse=True)``: with RRD a batch looks up ~80 items for each of its
~1,000 users, and torch's sparse gradients are summed in the backward and coalesced (sorted) in the
step — most of a step's time at 100k items (issue 12). The tape's rows get plain dense gradients and are
summed into a scratch table with one scatter, the touched rows found from a mask: no sort.
"""

from __future__ import annotations

import torch


SORT_BELOW = 16  # ids × this < table rows: distinct rows by sorting the ids, not by a scratch table and mask
# ids ≥ table rows × this: the step runs over the whole table under the touched mask instead of gathering and
# scattering the touched rows (RRD's ~80 items per user touch most of a 100k-item table every step, and ten
# row gathers/scatters of half the table cost several times ten plain passes over all of it — issue 12)
MASKED_ABOVE = 0.25


class RowTape:
    """Row lookups of embedding tables recorded for a row-sparse step: ``lookup(table, ids)`` gives the
    rows as a leaf of their own (its gradient is dense, (*ids.shape, d)) and keeps (ids, leaf) for the
    table; ``gradients(table)`` sums the recorded rows' gradients per distinct row → (rows, (n, d)) and
    forgets them. A scratch table (zeros, the table's shape, kept between steps) takes the sums by one
    accumulating ``index_put_``; the touched rows come from a mask, and are zeroed again after reading. A
    table far longer than its ids (a 300k-user table, a few thousand user ids a batch) sorts the ids
    instead: no scan of the whole table per step. A table whose ids cover a large part of it is handed over
    whole instead (``masked``): the scratch sums and the touched mask, for a step over every row under the
    mask (zeroed by ``release`` after the step)."""

    def __init__(self):
        self.entries: dict[torch.Tensor, list] = {}
        self._scratch: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        flat = torch.where(flat < 0, flat + table.shape[0], flat)
        leaf = table.detach().index_select(0, flat).requires_grad_(True)
        self.entries.setdefault(table, []).append((flat, leaf))
        return leaf.view(*ids.shape, *table.shape[1:])

    def clear(self) -> None:
        self.entries.clear()

    @torch.no_grad()
    def gradients(self, table: torch.Tensor, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, their summed gradients); with ``masked`` and ids covering ≥ MASKED_ABOVE of the table,
        (the table-shaped sums, the touched mask) instead — call ``release(table)`` once they are used."""
        entries = [(ids, leaf.grad) for ids, leaf in self.entries.pop(table, []) if leaf.grad is not None]
        if not entries:
            return None
        ids = entries[0][0] if len(entries) == 1 else torch.cat([e[0] for e in entries])
        grads = entries[0][1] if len(entries) == 1 else torch.cat([e[1] for e in entries])
        if len(ids) * SORT_BELOW < table.shape[0]:  # few ids in a long table: sorting them beats scanning a mask
            rows, where = torch.unique(ids, return_inverse=True)
            values = grads.new_zeros((len(rows),) + tuple(grads.shape[1:]))
            return rows, values.index_put_((where,), grads, accumulate=True)
        scratch = self._scratch.get(table)
        if scratch is None or scratch[0].shape != table.shape or scratch[0].dtype != grads.dtype:
            scratch = (torch.zeros(table.shape, dtype=grads.dtype, device=grads.device),
                       torch.zeros(table.shape[0], dtype=torch.bool, device=grads.device))
            self._scratch[table] = scratch
        total, touched = scratch
        total.index_put_((ids,), grads, accumulate=True)  # on the CPU far cheaper than index_add_ for many ids
        touched.index_fill_(0, ids, True)
        if masked and len(ids) >= MASKED_ABOVE * table.shape[0]:
            return total, touched
        rows = torch.nonzero(touched).flatten()  # ascending, each once
        values = total.index_select(0, rows)
        total.index_fill_(0, rows, 0.0)
        touched[rows] = False
        return rows, values

    @torch.no_grad()
    def release(self, table: torch.Tensor) -> None:
        """Zero the scratch sums and mask handed over whole by ``gradients(table, masked=True)``."""
        total, touched = self._scratch[table]
        total.zero_()
        touched.zero_()


class LazyAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.row_scale: dict = {}  # parameter → (n, ratio): its rows [0, n) step at ratio × lr (SlowRows)
        self.tape = RowTape()  # the model's row lookups while it trains (``make_optimizer`` hands it over)
        self._work: dict = {}  # parameter → a buffer of its shape for the masked step (no table-sized temporary a step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                g = p.grad
                taped = self.tape.gradients(p, masked=g is None)
                if taped is not None and g is not None:  # the table was also read densely: one dense gradient
                    g, taped = g.index_add(0, taped[0], taped[1].to(g.dtype)), None
                if g is not None and g.is_sparse:
                    g = g.coalesce()  # one row per index (a row looked up twice: its gradients summed)
                    taped = g.indices()[0], g.values()
                if taped is None and g is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                # torch.optim.Adam's step: lr / (1 - b1^t) · m / (sqrt(v / (1 - b2^t)) + eps)
                step_size, bc2_sqrt = lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5
                if taped is not None and taped[1].dtype == torch.bool:  # most rows touched: every row, masked
                    self._masked_step(p, m, v, *taped, b1, b2, eps, step_size, bc2_sqrt)
                    self.tape.release(p)
                elif taped is not None:  # the rows stepped alone
                    rows, values = taped
                    m_rows = m.index_select(0, rows).mul_(b1).add_(values, alpha=1 - b1)
                    v_rows = v.index_select(0, rows).mul_(b2).addcmul_(values, values, value=1 - b2)
                    m.index_copy_(0, rows, m_rows)
                    v.index_copy_(0, rows, v_rows)
                    update = m_rows.div_(v_rows.sqrt_().div_(bc2_sqrt).add_(eps))
                    if p in self.row_scale:
                        n, ratio = self.row_scale[p]
                        update.mul_(torch.where(rows < n, ratio, 1.0).to(update.dtype).view(-1, *[1] * (update.dim() - 1)))
                    p.index_copy_(0, rows, p.index_select(0, rows).add_(update, alpha=-step_size))  # rows distinct
                else:
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    if p in self.row_scale:
                        n, ratio = self.row_scale[p]
                        update = m / v.sqrt().div_(bc2_sqrt).add_(eps)
                        update[:n] *= ratio
                        p.add_(update, alpha=-step_size)
                    else:
                        p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
        self.tape.clear()
        return loss

    def _masked_step(self, p, m, v, g, touched, b1, b2, eps, step_size, bc2_sqrt) -> None:
        """The rows' step of ``step`` over the whole table: ``g`` is zero off the ``touched`` rows, whose
        moments decay (factor b1, b2 there, 1 elsewhere) and whose weights move; the other rows are left
        bit for bit as they were — the same arithmetic as gathering the touched rows, without the gathers."""
        # Seven passes over the table, each in place or into a buffer kept between steps (a 100k-row table and its
        # moments no longer sit in the cache, and a table-sized temporary each step is fresh memory the kernel has to
        # fault in: ``v.sqrt()`` alone took 2.5 ms a step at 10M, 0.4 into the buffer). m + w(g - m) with w = (1 - β)
        # on touched rows and 0 elsewhere is Adam's moment there and the old moment bit for bit off the mask; v's bias
        # correction is folded into the rate (m / (√(v/c) + ε) = √c · m / (√v + ε√c)). ``g`` is the tape's scratch
        # sums (zeroed after the step): it takes g² and then the masked m.
        col = touched.view((-1,) + (1,) * (p.dim() - 1)).to(p.dtype)  # (N, 1): 1 on touched rows
        m.lerp_(g, col * (1 - b1))
        v.lerp_(g.mul_(g), col * (1 - b2))
        if p in self.row_scale:
            n, ratio = self.row_scale[p]
            col[:n] *= ratio
        denom = self._work.get(p)
        if denom is None or denom.shape != p.shape or denom.dtype != p.dtype:
            denom = self._work[p] = torch.empty_like(p)
        torch.sqrt(v, out=denom).add_(eps * bc2_sqrt)
        p.addcdiv_(torch.mul(m, col, out=g), denom, value=-step_size * bc2_sqrt)


class SlowRows:
    """``step()`` of ``opt`` with the rows [0, n) of given parameters stepped at ``ratio`` × its rate
    (``train.lr_block``: what a model had before this block moves at the warm rate, the rows of new users
    and items at the from-scratch rate). Adam's step is the rate times a direction, so scaling the step is
    scaling the rate: LazyAdam scales the rows it steps; another optimizer's step is taken in full and
    those rows are pulled back to ``old + ratio · (new - old)``."""

    def __init__(self, opt: torch.optim.Optimizer, rows: dict | None, ratio: float):
        self.opt, self.ratio = opt, float(ratio)
        self.rows = {p: n for p, n in (rows or {}).items() if n > 0} if self.ratio != 1.0 else {}
        self.native = isinstance(opt, LazyAdam)
        if self.native:
            opt.row_scale = {p: (n, self.ratio) for p, n in self.rows.items()}
        self.warmup, self.steps, self.base_lr = 0, 0, [g["lr"] for g in opt.param_groups]

    def ramp(self, steps: int) -> None:
        """The next ``steps`` steps take the rate from lr/steps up to lr linearly (``train.warmup_block``):
        Adam's first steps after a restart move every touched weight by about lr whatever its gradient,
        which shakes a model that had converged; the ramp lets the moments settle first."""
        self.warmup, self.steps = max(int(steps), 0), 0

    def step(self) -> None:
        if self.steps < self.warmup:
            scale = (self.steps + 1) / self.warmup
            for group, lr in zip(self.opt.param_groups, self.base_lr):
                group["lr"] = lr * scale
        self.steps += 1
        self._step()
        if self.steps == self.warmup:
            for group, lr in zip(self.opt.param_groups, self.base_lr):
                group["lr"] = lr

    def _step(self) -> None:
        if self.native or not self.rows:
            self.opt.step()
            return
        before = {p: p.detach()[:n].clone() for p, n in self.rows.items()}
        self.opt.step()
        with torch.no_grad():
            for p, old in before.items():
                p[: len(old)].lerp_(old, 1.0 - self.ratio)


def make_optimizer(model, params: list, spec, parallel=None) -> torch.optim.Optimizer:
    """The update's optimizer: ``lazy_adam`` (row-sparse; the model's table lookups recorded on the
    optimizer's ``RowTape`` while it trains) or Adam (fused where every parameter allows it). Ray Train's
    data parallelism keeps Adam (DDP all-reduces dense gradients)."""
    lazy = spec.optimizer == "lazy_adam" and parallel is None and hasattr(model, "row_tape")
    if hasattr(model, "row_tape"):
        model.row_tape = None
    if lazy:
        opt = LazyAdam(params, lr=spec.lr)
        model.row_tape = opt.tape
        return opt
    # fused: one kernel for every parameter's update (the same Adam step; far fewer small ops on CPU)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=spec.lr, fused=fused or None)
