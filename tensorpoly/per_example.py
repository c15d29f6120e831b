"""The paper code's TensorPoly-I/II algorithm, written literally: factors per example, per layer.

At every adapted layer, on every call, the paper code (reference-code.md §1.6, §1.7, §8.3)
1. routes every example on its own: one row of routing weights per example (w = selector(task_ids));
2. builds that example's factors A_b, B_b from them. TensorPoly-I builds the layer's S TLoRA
   experts, then mixes them per example; TensorPoly-II mixes the leaves per example, then takes
   the tensor product per example;
3. applies them with two batched matmuls, one matrix pair per example:
   y_b = x_b W^T + b + (x_b A_b) B_b / r.
Nothing is shared between examples of one task or between layers, and nothing is cached.

This module is that algorithm, our own code on our parameters. It is the anchor that the fast
path (grouped, per distinct task, cached) is measured against in scripts/bench_adapters.py, and
tests/test_per_example.py checks that both give equal outputs and gradients.

    literal = per_example(copy.deepcopy(model))   # same parameters, the literal algorithm
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .adapters.tensorpoly import TensorPolyIILinear, TensorPolyILinear
from .kron_kernel import fused_kernels


class PerExampleForward:
    """Replaces the forward of a routed adapter layer by the per-example algorithm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        n = x.shape[0]
        router = self.router
        if router.average is not None:
            ids = torch.zeros(n, dtype=torch.long, device=router.logits.device)  # every row averaged
        else:
            ids = self._routing.row_ids(self._side, n)
        weights = router(ids)  # [n, splits, S]: one routing row per example
        # The anchor runs the paper code's PyTorch ops, not our fused kernel, unless asked to (tests).
        with nullcontext() if self._literal_kernels else fused_kernels(False):
            A, B = self.factors(weights)  # [n, d_in, r], [n, r, d_out]: one factor pair per example
        flat = x.reshape(n, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, A.to(x.dtype)), B.to(x.dtype))
        return out + delta.reshape(*x.shape[:-1], -1) / self.rank


class PerExampleTensorPolyILinear(PerExampleForward, TensorPolyILinear):
    pass


class PerExampleTensorPolyIILinear(PerExampleForward, TensorPolyIILinear):
    pass


LITERAL = {TensorPolyILinear: PerExampleTensorPolyILinear, TensorPolyIILinear: PerExampleTensorPolyIILinear}


def per_example(model, fused_kernels: bool = False):
    """Switch a TensorPoly-I/II model's layers to the literal per-example algorithm, in place.

    The parameters, routers and state dict are untouched; only the forward changes. Its factors are
    built with PyTorch's ops, as the paper code builds them; fused_kernels=True lets them use our fused
    CPU kernel where it runs (kron_kernel), so that a comparison isolates the algorithm from the
    primitives' rounding. Returns the model.
    """
    switched = 0
    for _, adapter in model.adapters():
        literal = LITERAL.get(type(adapter))
        if literal is not None:
            adapter.__class__ = literal
            adapter._literal_kernels = fused_kernels
            switched += 1
    if not switched:
        raise TypeError(f"per_example() applies to tensorpoly1/tensorpoly2 models, not {model.config.module_type}")
    return model
