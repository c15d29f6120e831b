"""How the task ids of one call reach the adapted layers.

The caller passes task ids explicitly (`model(..., task_ids=...)`); the model holds them in a
TaskRouting object only for the duration of that call, and every adapted layer reads, never
writes, them. A layer that sees more rows than there are examples gets each example's id
repeated over its contiguous copies: that is how HF generation lays out beams and how
`scoring.choice_log_likelihoods` lays out answer choices. Callers with another layout pass
`decoder_task_ids` (one id per decoder row) instead.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class TaskRoutingError(ValueError):
    pass


class TaskRouting:
    def __init__(self) -> None:
        self._ids: dict[str, torch.Tensor | None] = {}
        self._active = False
        self._cache: dict = {}

    @contextmanager
    def use(self, task_ids: torch.Tensor | None, decoder_task_ids: torch.Tensor | None = None):
        if self._active:
            raise TaskRoutingError("task routing is already set for a call in progress; "
                                   "nested model calls with different task ids are not supported")
        self._ids = {"encoder": task_ids, "decoder": decoder_task_ids if decoder_task_ids is not None else task_ids}
        self._active, self._cache = True, {}
        try:
            yield
        finally:
            self._ids, self._active, self._cache = {}, False, {}

    def rows(self, side: str | None, n_rows: int, router) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids to route, inverse): router(ids)[inverse] gives one weight row per input row.

        Layers of one call share the result, so the distinct tasks are found once per call.
        """
        if router.average is not None:
            key = ("average", n_rows)
        else:
            key = (side, n_rows, router.stochastic)
        if key not in self._cache:
            self._cache[key] = self._compute(side, n_rows, router)
        return self._cache[key]

    def _compute(self, side, n_rows, router):
        if router.average is not None:
            # Every row gets the same weights: compute them once.
            device = router.logits.device
            return torch.zeros(1, dtype=torch.long, device=device), torch.zeros(n_rows, dtype=torch.long, device=device)
        ids = self._ids.get(side or "encoder")
        if not self._active or ids is None:
            raise TaskRoutingError("this model routes per task: pass task_ids=... (one id per example) to "
                                   "forward/generate, or call use_average_routing() for unseen tasks")
        if n_rows != ids.shape[0]:
            if n_rows % ids.shape[0]:
                raise TaskRoutingError(f"a {side or 'model'} layer got {n_rows} rows for {ids.shape[0]} task ids; "
                                       f"rows must be a whole multiple of the examples (contiguous copies), "
                                       f"or pass decoder_task_ids with one id per decoder row")
            ids = ids.repeat_interleave(n_rows // ids.shape[0])
        if router.stochastic:
            # A fresh sample per example, as the paper code draws one per row.
            return ids, torch.arange(n_rows, device=ids.device)
        unique, inverse = torch.unique(ids, return_inverse=True)
        return unique, inverse
