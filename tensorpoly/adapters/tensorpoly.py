"""TensorPoly-I and TensorPoly-II: task routing over TLoRA experts.

TensorPoly-I mixes after the product (each expert is a full TLoRA, experts = tensor-rank terms):
    A_t = sum_s w[t, s] TLoRA(U[:, s]),   B_t = sum_s w[t, s] TLoRA(V[:, s])
TensorPoly-II mixes the leaves of each order position, then takes the product:
    A_t = TLoRA(u~),  u~_j = sum_s w[t, j, s] U[j, s]   (likewise B with V), one distribution per j.
"""
from __future__ import annotations

import torch

from ..tensor_product import build_rows, last_product, mix_kron_chain, row_factors
from .tlora import TensorFactors


class TensorPolyILinear(TensorFactors):
    routed = True
    expert_axes = 1
    mixes_experts = True

    def factors(self, weights):
        w = weights[:, 0].to(self.leaves_A.dtype)  # [U, S]
        A_experts = build_rows(self.leaves_A.transpose(0, 1), self.in_features, self.norms_A)  # [S, r, d_in]
        B_experts = build_rows(self.leaves_B.transpose(0, 1), self.out_features, self.norms_B)  # [S, r, d_out]
        return torch.einsum("us,srd->udr", w, A_experts), torch.einsum("us,srd->urd", w, B_experts)

    @classmethod
    def group_operands(cls, members, side, d, weights):
        w = weights[:, :, 0].to(members[0].leaves_A.dtype)  # [G, U, S]
        leaves, norms = cls.stacked(members, side, lead=1)  # [G, N, S, r, l]
        P, Q = last_product(row_factors(leaves.transpose(1, 2), d, norms), d)  # [G, S, r, p], [G, S, r, q]
        return w, P, Q

    @classmethod
    def own_side_rows(cls, members, side, d, weights):
        w = weights[:, :, 0].to(members[0].leaves_A.dtype).unbind(0)  # [U, S] per member

        def make_own(w, leaves, norms):  # leaves [N, S, r, l]
            return mix_kron_chain(w, row_factors(leaves.transpose(0, 1), d, norms), d)

        return [(lambda w, leaves, norms=getattr(m, f"norms_{side}"): make_own(w, leaves, norms),
                 (w[g], getattr(m, f"leaves_{side}"))) for g, m in enumerate(members)]

    @classmethod
    def leaf_pair(cls, members, side, weights):
        leaves = cls.stacked_leaves(members, side)  # [G, 2, S, r, l]
        return leaves[:, 0], leaves[:, 1], weights[:, :, 0].to(leaves.dtype)  # the experts', w [G, U, S]


class TensorPolyIILinear(TensorFactors):
    routed = True
    expert_axes = 1
    paper_init = "xavier"

    def factors(self, weights):
        w = weights.to(self.leaves_A.dtype)  # [U, N, S]
        mixed_A = torch.einsum("uns,nsrl->unrl", w, self.leaves_A)
        mixed_B = torch.einsum("uns,nsrl->unrl", w, self.leaves_B)
        A = build_rows(mixed_A, self.in_features, self.norms_A)  # [U, r, d_in]
        B = build_rows(mixed_B, self.out_features, self.norms_B)  # [U, r, d_out]
        return A.transpose(1, 2), B

    @staticmethod
    def mixed_leaves(members, side, weights, norms: bool = True):
        """Every member's leaves of one side mixed per task, [G, U, N, r, l], and its stacked norms
        (None with norms=False)."""
        G, U, N, S = weights.shape
        w = weights.to(members[0].leaves_A.dtype).transpose(1, 2).reshape(G * N, U, S)
        if norms:
            leaves, norms = TensorFactors.stacked(members, side, lead=1)  # [G, N, S, r, l]
        else:
            leaves, norms = TensorFactors.stacked_leaves(members, side), None
        r, leaf = leaves.shape[-2:]
        mixed = torch.bmm(w, leaves.reshape(G * N, S, r * leaf)).view(G, N, U, r, leaf).transpose(1, 2)
        return mixed, norms

    @classmethod
    def group_operands(cls, members, side, d, weights):
        mixed, norms = cls.mixed_leaves(members, side, weights)  # [G, U, N, r, l]
        return (None, *last_product(row_factors(mixed, d, norms), d))  # [G, U, r, p], [G, U, r, q]

    @classmethod
    def own_side_rows(cls, members, side, d, weights):
        mixed, _ = cls.mixed_leaves(members, side, weights, norms=False)
        return [(lambda x, norms=getattr(m, f"norms_{side}"): build_rows(x, d, norms), (x,))
                for m, x in zip(members, mixed.unbind(0))]

    @classmethod
    def leaf_pair(cls, members, side, weights):
        mixed, _ = cls.mixed_leaves(members, side, weights, norms=False)  # [G, U, 2, r, l]
        return mixed[:, :, 0], mixed[:, :, 1], None  # each task's own pair
