"""TLoRA: a dense LoRA whose factor rows are entangled tensors (see tensor_product.py).

    A[:, i] = TLoRA-row(u_{1,i}, ..., u_{N,i}; d_in),   B[i, :] = TLoRA-row(v_{1,i}, ..., v_{N,i}; d_out)

`TensorFactors` holds the leaves and pair norms of both sides; TensorPoly-I and -II reuse it
with an extra expert axis.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from ..tensor_product import StackedNorms, build_rows, leaf_length, make_pair_norms, norm_signature
from .base import AdapterLinear, paper_uniform_


class TensorFactors(AdapterLinear):
    """Leaves [N, *experts, r, l] for A (l = leaf(d_in)) and B (l = leaf(d_out)), plus pair norms."""

    expert_axes = 0
    paper_init = "uniform"  # the paper code: uniform for TensorPoly-I, xavier for TensorPoly-II

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig):
        super().__init__(base_layer, config)
        self.order = config.order
        self.leaf_A, self.leaf_B = leaf_length(self.in_features, self.order), leaf_length(self.out_features, self.order)
        experts = (config.n_experts,) * self.expert_axes
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.leaves_A = nn.Parameter(torch.empty(self.order, *experts, self.rank, self.leaf_A, **kw))
        self.leaves_B = nn.Parameter(torch.empty(self.order, *experts, self.rank, self.leaf_B, **kw))
        norm_kw = dict(scope=config.norm, shared=config.share_norm, eps=config.norm_eps,
                       affine_trainable=config.norm_affine_trainable,
                       over_padding=config.norm_over_padding, **kw)
        self.norms_A = make_pair_norms(self.order, self.rank, self.leaf_A, **norm_kw)
        self.norms_B = make_pair_norms(self.order, self.rank, self.leaf_B, **norm_kw)
        self.reset_parameters(config)

    def reset_parameters(self, config: AdapterConfig) -> None:
        for leaves in (self.leaves_A, self.leaves_B):
            if self.paper_init == "xavier":
                nn.init.xavier_uniform_(leaves)
            else:
                # The paper code bounds the B leaves by d_in too.
                paper_uniform_(leaves, self.in_features)
        if config.init == "zero_b":
            # One zero leaf makes every B row zero while every leaf still gets gradient.
            with torch.no_grad():
                self.leaves_B[self.order - 1].zero_()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", order={self.order}, leaves=({self.leaf_A}, {self.leaf_B})"

    @property
    def probe(self) -> torch.Tensor:
        return self.leaves_A

    def group_key(self) -> tuple:
        return (type(self), self.in_features, self.out_features, tuple(self.leaves_A.shape), tuple(self.leaves_B.shape),
                norm_signature(self.norms_A), norm_signature(self.norms_B))

    @staticmethod
    def stacked(members, side: str, lead: int):
        """Leaves [G, N, *experts, r, l] and norms of one factor side of every member, stacked."""
        leaves = torch.stack([getattr(m, f"leaves_{side}") for m in members])
        norms = getattr(members[0], f"norms_{side}")
        if len(norms):
            norms = StackedNorms([getattr(m, f"norms_{side}") for m in members], lead)
        return leaves, norms


class TLoRALinear(TensorFactors):
    def factors(self, weights):
        A = build_rows(self.leaves_A, self.in_features, self.norms_A)  # [r, d_in]
        B = build_rows(self.leaves_B, self.out_features, self.norms_B)  # [r, d_out]
        return A.T.unsqueeze(0), B.unsqueeze(0)

    @classmethod
    def group_factors(cls, members, weights):
        first = members[0]
        leaves_A, norms_A = cls.stacked(members, "A", lead=0)
        leaves_B, norms_B = cls.stacked(members, "B", lead=0)
        A = build_rows(leaves_A, first.in_features, norms_A, truncate=False)  # [G, r, d_in']
        B = build_rows(leaves_B, first.out_features, norms_B, truncate=False)  # [G, r, d_out']
        return A.unsqueeze(1), B.unsqueeze(1)
