"""How the task ids of one call reach the adapted layers.

The caller passes task ids explicitly (`model(..., task_ids=...)`); the model holds them in a
TaskRouting object only for the duration of that call, and every adapted layer reads, never
writes, them. A layer that sees more rows than there are examples gets each example's id
repeated over its contiguous copies: that is how HF generation lays out beams and how
`scoring.choice_log_likelihoods` lays out answer choices. Callers with another layout pass
`decoder_task_ids` (one id per decoder row) instead.

It also decides how the layers' factors are built during a call (the fast path):

* Grouping. Adapted layers of one side (encoder or decoder) with equal `group_key()` (same
  class and shapes) form a FactorGroup. The first layer of a group that runs in a call builds
  the factors of every member at once (stacked leaves, stacked routers, one batched
  construction); each member then takes its own. Routing depends on the task only, so
  factors are built once per distinct task of the batch, never per example. A member that asks
  a second time within one call (a second forward pass) triggers a fresh build, so each build's
  autograd graph is used by one forward pass.
* Caching. With gradients off and deterministic routing, a group keeps the factors of each task
  it has built (at most `cache_size` tasks, least recently used first out) and reuses them
  across calls. The cache is checked once per call against the members' and routers'
  parameters (storage and version counters: any optimizer step, copy_ or load_state_dict
  changes them) and the average-routing mode; the model also clears it on `reset_tasks` and
  `use_average_routing`. Edits through `.data` bypass version counters: call
  `TensorPolyModel.clear_factor_cache()` after them.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch

from .adapters.base import Factors
from .routing import Router


class TaskRoutingError(ValueError):
    pass


class TaskRouting:
    def __init__(self) -> None:
        self._ids: dict[str, torch.Tensor | None] = {}
        self._active = False
        self._cache: dict = {}
        self._groups: dict[tuple, FactorGroup] = {}
        self.grouping = True  # False: every layer builds its own factors (the simple path)
        self.cache_size = 16  # tasks whose factors a group keeps for gradient-free calls; 0 turns caching off
        # Training: keep only the factors' small pieces for the backward pass and rebuild the factors
        # there (less memory, a little more time); False keeps the factors. Where the fused CPU update
        # runs (kron_kernel.low_rank: the tensor types at every order from 2, float32/64 on a CPU) the
        # factors are never stored in the first place, either way.
        self.recompute_factors = False
        # True: a group builds every member's whole factors in batched operations; False: only small
        # pieces, and each member finishes its own (TensorFactors.build_group). recompute_factors
        # implies False in training. Kept switchable so that the benchmark can set the two side by side.
        self.whole_factors = True

    # ---- grouped factors and the evaluation cache ------------------------------------------
    def register(self, adapter) -> None:
        """Put an adapted layer into the group of its side and group key (if it has one)."""
        key = adapter.group_key()
        if key is None:
            return
        group = self._groups.setdefault((adapter._side, key), FactorGroup())
        adapter._group, adapter._group_index = group, len(group.members)
        group.members.append(adapter)

    def groups_active(self, adapter) -> bool:
        return self._active and self.grouping and getattr(adapter, "_group", None) is not None

    def clear_factor_cache(self) -> None:
        for group in self._groups.values():
            group.entries.clear()
            group._assembled = None

    def factors(self, adapter, n_rows: int):
        """(factors, inverse) of one grouped layer for this call: (A, B) from the cache, or the layer's
        Factors from its group's build."""
        group, index = adapter._group, adapter._group_index
        ids = inverse = rows_key = None
        cacheable = True
        if adapter.routed:
            router = adapter.router
            ids, inverse = self.rows(adapter._side, n_rows, router)
            rows_key = self._rows_key(adapter._side, n_rows, router)
            cacheable = not router.stochastic
        if cacheable and self.cache_size > 0 and not torch.is_grad_enabled():
            key = ("cached", id(group), rows_key)
            if key not in self._cache:
                self._cache[key] = group.cached(ids, self.cache_size)
            return self._cache[key][index], inverse  # (A, B), no graph: reused by later steps (generation)
        key = ("built", id(group), rows_key)
        built = self._cache.get(key)
        if built is None or built[index] is None:
            # With recompute_factors only small pieces are built here (the factors are rebuilt from
            # them in the backward pass); otherwise every member's factors at once.
            whole = self.whole_factors and not (self.recompute_factors and torch.is_grad_enabled())
            built = self._cache[key] = group.build(ids, whole)
        factors, built[index] = built[index], None
        return factors, inverse  # Factors: the member finishes them in its forward

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

    def rows(self, side: str | None, n_rows: int, router) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids to route, inverse): router(ids)[inverse] gives one weight row per input row
        (inverse None: router(ids) already has one row per input row, in order).

        Layers of one call share the result, so the distinct tasks are found once per call.
        """
        key = self._rows_key(side, n_rows, router)
        if key not in self._cache:
            self._cache[key] = self._compute(side, n_rows, router)
        return self._cache[key]

    def row_ids(self, side: str | None, n_rows: int) -> torch.Tensor:
        """The task id of every one of a layer's n_rows input rows (examples and their copies)."""
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
        return ids

    @staticmethod
    def _rows_key(side, n_rows, router) -> tuple:
        if router.average is not None:
            return ("average", n_rows)
        return (side, n_rows, router.stochastic)

    def _compute(self, side, n_rows, router):
        if router.average is not None:
            # Every row gets the same weights: compute them once.
            device = router.logits.device
            return torch.zeros(1, dtype=torch.long, device=device), torch.zeros(n_rows, dtype=torch.long, device=device)
        ids = self.row_ids(side, n_rows)
        if router.stochastic:
            # A fresh sample per example, as the paper code draws one per row.
            return ids, None
        unique, inverse = torch.unique(ids, return_inverse=True)
        if unique.shape[0] == n_rows:
            return ids, None  # every row its own task: factors in row order, nothing to gather
        return unique, inverse


class FactorGroup:
    """Adapted layers of one side and one group key; see the module docstring."""

    def __init__(self) -> None:
        self.members: list = []
        self.entries: OrderedDict = OrderedDict()  # task key -> [(A [d_in, r], B [r, d_out])] per member
        self._fingerprint: tuple | None = None
        self._assembled: tuple | None = None  # (keys, factors per member) of the last cached call
        self._router_plan: tuple | None = None

    def weights(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """Routing weights [G, U, splits, S] of every member for the distinct task ids."""
        if ids is None:
            return None
        routers = [m.router for m in self.members]
        first = routers[0]
        if first.average is not None or any(r.average is not None or r.stochastic != first.stochastic
                                            for r in routers):
            return torch.stack([r(ids) for r in routers])
        if self._router_plan is None:
            distinct = list({id(r): r for r in routers}.values())
            position = {id(r): i for i, r in enumerate(distinct)}
            index = [position[id(r)] for r in routers]
            self._router_plan = (distinct, None if index == list(range(len(routers))) else index)
        distinct, index = self._router_plan
        # As Router.forward, for every router at once: rows of the logits, then sigmoid (or a
        # relaxed Bernoulli sample, drawn per member) and normalisation over the experts.
        logits = torch.stack([r.logits for r in distinct])
        rows = logits[:, ids].view(len(distinct), ids.shape[0], first.n_splits, first.n_experts)
        if index is not None:
            rows = rows[torch.tensor(index, device=rows.device)]
        return Router.normalise(first.probabilities(rows))

    def build(self, ids: torch.Tensor | None, whole: bool = True) -> list:
        """Per member, its Factors (A [U, d_in, r], B [U, r, d_out]) for the task ids (whole: see
        TensorFactors.build_group)."""
        members = self.members
        if len({(m.probe.dtype, m.probe.device) for m in members}) > 1:
            # Members on several devices (a model split over GPUs) or converted separately: no stacking.
            return [Factors(lambda m=m: m.factors(None if ids is None else m.router(ids)), ()) for m in members]
        return type(members[0]).build_group(members, self.weights(ids), whole)

    def fingerprint(self) -> tuple:
        """Changes whenever anything the factors depend on may have changed."""
        parts = []
        for m in self.members:
            parts.extend((p.data_ptr(), p._version, p.dtype) for p in m.factor_parameters())
            if m.routed:
                r = m.router
                parts.append((r.logits.data_ptr(), r.logits._version, tuple(r.logits.shape), r.average))
        return tuple(parts)

    @torch.no_grad()
    def cached(self, ids: torch.Tensor | None, size: int) -> list:
        """[(A, B)] per member for the task ids, built at most once per task while nothing changes."""
        fingerprint = self.fingerprint()
        if fingerprint != self._fingerprint:
            self.entries.clear()
            self._fingerprint = fingerprint
            self._assembled = None
        if ids is None:
            keys = ["dense"]
        elif self.members[0].router.average is not None:
            keys = [("average", self.members[0].router.average)]
        else:
            keys = ids.tolist()
        if self._assembled is not None and self._assembled[0] == keys and all(k in self.entries for k in keys):
            return self._assembled[1]  # the same tasks as the last call: the same stacked factors
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        if missing:
            built = [factors.materialize() for factors in self.build(None if ids is None else ids[missing])]
            for j, i in enumerate(missing):
                # Views keep the build's memory layout, so cached calls and uncached ones that materialise
                # the factors give equal bits (the fused update, kron_kernel.low_rank, rounds differently).
                self.entries[keys[i]] = [(A[j], B[j]) for A, B in built]
        for k in keys:
            self.entries.move_to_end(k)
        while len(self.entries) > max(size, len(keys)):
            self.entries.popitem(last=False)
        if len(keys) == 1:
            assembled = [(A.unsqueeze(0), B.unsqueeze(0)) for A, B in self.entries[keys[0]]]
        else:
            per_task = [self.entries[k] for k in keys]
            assembled = [(torch.stack([t[g][0] for t in per_task]), torch.stack([t[g][1] for t in per_task]))
                         for g in range(len(self.members))]
        self._assembled = (keys, assembled)
        return assembled
