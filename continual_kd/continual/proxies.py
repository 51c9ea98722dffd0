"""CCD's stability and plasticity proxies: two EMAs of the distilled student's parameters.

After every block update the student D is folded into both proxies,

    S ← s_w·S + (1-s_w)·D        (stability: s_w near 1, remembers the older students)
    P ← p_w·P + (1-p_w)·D        (plasticity: p_w near 0, follows the newest student)

and both start as D on the first update. The proxies are scored like the student (``models``) and
their top lists feed the replay term (``distill.replay``). They are never served.

Growth between blocks: the student's id spaces grow before it is trained, so D may have more rows
than the proxies. Generically, a proxy tensor whose shape is smaller than D's along some dimensions
(MF / LightGCN ``user_emb`` / ``item_emb``, MultVAE's item-sized ``item_in`` / ``item_out`` /
``item_bias``) is grown by copying it into D's tensor at the leading corner: the rows new to the
model start as D's rows, so after the EMA they equal D's rows exactly. Tensors of equal shape are
averaged; entries the proxies do not have yet (and non-float entries) are D's. A tensor that would
have to shrink, or changes its number of dimensions, is refused (ValueError): ids only grow.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..distill.replay import PROXY_PREFIX
from ..eval.metrics import top_k_items
from ..sparse import UserItemSet
from ..types import Knowledge

STABILITY, PLASTICITY = "stability", "plasticity"
# Knowledge.source of the proxies' lists: how the replay term finds them among a model's own lists
SOURCES = (PROXY_PREFIX + STABILITY, PROXY_PREFIX + PLASTICITY)


def grow_like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``old`` placed at the leading corner of a copy of ``new`` (same shape as ``new``)."""
    if old.shape == new.shape:
        return old
    if old.dim() != new.dim() or any(a > b for a, b in zip(old.shape, new.shape)):
        raise ValueError(f"proxy tensor of shape {tuple(old.shape)} cannot grow to {tuple(new.shape)}")
    out = new.clone()
    out[tuple(slice(0, n) for n in old.shape)] = old
    return out


class Proxies:
    """The two proxies as state dicts of the student's backbone (detached CPU tensors)."""

    def __init__(self, stability: float = 0.9, plasticity: float = 0.1):
        for name, w in ((STABILITY, stability), (PLASTICITY, plasticity)):
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"proxies.{name} must be in [0, 1] (got {w})")
        self.weights = {STABILITY: float(stability), PLASTICITY: float(plasticity)}
        self.params: dict[str, dict[str, torch.Tensor]] = {}  # proxy name → state dict; empty before update
        self.num_users = 0
        self.num_items = 0
        self.updates = 0

    @classmethod
    def from_spec(cls, spec) -> "Proxies":
        """From ``continual.proxies`` ({stability, plasticity})."""
        return cls(spec.stability, spec.plasticity)

    @property
    def ready(self) -> bool:
        return bool(self.params)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the student D (after its block update) into both proxies."""
        current = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        for name, w in self.weights.items():
            old = self.params.get(name)
            if old is None:
                self.params[name] = {k: v.clone() for k, v in current.items()}
                continue
            merged = {}
            for key, d in current.items():
                if key not in old or not d.is_floating_point():
                    merged[key] = d.clone()
                    continue
                p = grow_like(old[key].to(d.dtype), d)
                merged[key] = torch.lerp(p, d, 1.0 - w)  # w·p + (1-w)·d; exactly d where p = d (new rows)
            self.params[name] = merged
        self.num_users, self.num_items = int(model.num_users), int(model.num_items)
        self.updates += 1

    def models(self, build: Callable[[int, int], nn.Module]) -> tuple[nn.Module, nn.Module]:
        """(stability, plasticity) models: ``build(num_users, num_items)`` makes an empty backbone of the
        student's family, which gets the proxy's parameters. Returned in eval mode on CPU; graph/row
        backbones (LightGCN, MultVAE) still need ``observe`` before they score."""
        if not self.ready:
            raise RuntimeError("Proxies.models: no update yet")
        out = []
        for name in (STABILITY, PLASTICITY):
            model = build(self.num_users, self.num_items)
            model.load_state_dict(self.params[name])
            out.append(model.eval())
        return out[0], out[1]

    def state(self) -> dict:
        """Plain dict of CPU tensors and numbers (``torch.load(..., weights_only=True)`` reads it)."""
        return {"stability_weight": self.weights[STABILITY], "plasticity_weight": self.weights[PLASTICITY],
                "num_users": self.num_users, "num_items": self.num_items, "updates": self.updates,
                "params": {name: dict(p) for name, p in self.params.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "Proxies":
        proxies = cls(state["stability_weight"], state["plasticity_weight"])
        proxies.params = {name: {k: v.cpu() for k, v in p.items()} for name, p in state["params"].items()}
        proxies.num_users, proxies.num_items = int(state["num_users"]), int(state["num_items"])
        proxies.updates = int(state["updates"])
        return proxies


@torch.no_grad()
def proxy_knowledge(models: tuple[nn.Module, nn.Module], users: torch.Tensor, k: int, known: UserItemSet,
                    block: int) -> list[Knowledge]:
    """The proxies' top-k unobserved items (+ scores) of ``users``, as the replay term reads them
    (``Knowledge.source`` in ``SOURCES``). The models must already observe the known pairs."""
    out = []
    for source, model in zip(SOURCES, models):
        items, scores = top_k_items(model, users, min(k, model.num_items), known)
        out.append(Knowledge(source=source, block=block, users=users.cpu().numpy().astype(np.int64),
                             items=items.cpu().numpy().astype(np.int64),
                             scores=scores.cpu().numpy().astype(np.float32)))
    return out
