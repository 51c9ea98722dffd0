"""The Ray executor of the per-block stages (``continual.stages``): one actor per model.

``call`` starts the method on every named actor at once (so teachers update in parallel) and
returns object references; references to knowledge are handed to other actors as they are, and each
actor fetches them itself (knowledge goes actor→actor, never through the driver).
"""

from __future__ import annotations

import ray


class RayExecutor:
    def __init__(self, actors: dict, block_refs: list, block: int):
        self.actors, self.block_refs, self.block = actors, block_refs, block

    def call(self, names: list[str], method: str, **kwargs) -> list:
        return [self.actors[n].run.remote(method, self.block, self.block_refs, kwargs) for n in names]

    def get(self, handles: list) -> list:
        return ray.get(list(handles))
