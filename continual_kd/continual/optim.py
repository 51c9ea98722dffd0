"""Row-sparse Adam for embedding tables (``train.optimizer: lazy_adam``).

Dense Adam costs every step the size of every table: the gradient of a 300k-row user table is
materialised in full, and every row's moments and weights are rewritten, though a batch touches
a thousand rows. With ``lazy_adam`` a model's tables are looked up with sparse gradients (only the
batch's rows) and this optimizer updates the moments and weights of those rows alone (the "lazy" Adam of
large-scale recommenders): a step costs the batch, not the tables, so training rows/s does not fall as
users and items grow. Rows a batch does not touch keep their moments unchanged (dense Adam would keep
moving them by their decaying momentum). Parameters with dense gradients (KD terms' own weights, a table
that a term reads densely) get the ordinary Adam step, with the same bias correction.
"""

from __future__ import annotations

import torch


class LazyAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.row_scale: dict = {}  # parameter → (n, ratio): its rows [0, n) step at ratio × lr (SlowRows)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                g = p.grad
                if g is None:
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
                if g.is_sparse:
                    g = g.coalesce()  # one row per index (a row looked up twice: its gradients summed)
                    rows, values = g.indices()[0], g.values()
                    m_rows = m.index_select(0, rows).mul_(b1).add_(values, alpha=1 - b1)
                    v_rows = v.index_select(0, rows).mul_(b2).addcmul_(values, values, value=1 - b2)
                    m.index_copy_(0, rows, m_rows)
                    v.index_copy_(0, rows, v_rows)
                    update = m_rows.div_(v_rows.sqrt_().div_(bc2_sqrt).add_(eps))
                    if p in self.row_scale:
                        n, ratio = self.row_scale[p]
                        update.mul_(torch.where(rows < n, ratio, 1.0).to(update.dtype).view(-1, *[1] * (update.dim() - 1)))
                    p.index_add_(0, rows, update, alpha=-step_size)
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
        return loss


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

    def step(self) -> None:
        if self.native or not self.rows:
            self.opt.step()
            return
        before = {p: p.detach()[:n].clone() for p, n in self.rows.items()}
        self.opt.step()
        with torch.no_grad():
            for p, old in before.items():
                p[: len(old)].lerp_(old, 1.0 - self.ratio)


def make_optimizer(model, params: list, spec, parallel=None) -> torch.optim.Optimizer:
    """The update's optimizer: ``lazy_adam`` (row-sparse; the model's tables switched to sparse
    gradients while it trains) or Adam (fused where every parameter allows it). Ray Train's data
    parallelism keeps Adam (DDP all-reduces dense gradients)."""
    lazy = spec.optimizer == "lazy_adam" and parallel is None and hasattr(model, "sparse_grad")
    if hasattr(model, "sparse_grad"):
        model.sparse_grad = lazy
    if lazy:
        return LazyAdam(params, lr=spec.lr)
    # fused: one kernel for every parameter's update (the same Adam step; far fewer small ops on CPU)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=spec.lr, fused=fused or None)
