"""TensorPoly-I and TensorPoly-II: task routing over TLoRA experts.

TensorPoly-I mixes after the product (each expert is a full TLoRA, experts = tensor-rank terms):
    A_t = sum_s w[t, s] TLoRA(U[:, s]),   B_t = sum_s w[t, s] TLoRA(V[:, s])
TensorPoly-II mixes the leaves of each order position, then takes the product:
    A_t = TLoRA(u~),  u~_j = sum_s w[t, j, s] U[j, s]   (likewise B with V), one distribution per j.
"""
from __future__ import annotations

import torch

from ..tensor_product import build_rows
from .tlora import TensorFactors


class TensorPolyILinear(TensorFactors):
    routed = True
    expert_axes = 1

    def factors(self, weights):
        w = weights[:, 0].to(self.leaves_A.dtype)  # [U, S]
        A_experts = build_rows(self.leaves_A.transpose(0, 1), self.in_features, self.norms_A)  # [S, r, d_in]
        B_experts = build_rows(self.leaves_B.transpose(0, 1), self.out_features, self.norms_B)  # [S, r, d_out]
        return torch.einsum("us,srd->udr", w, A_experts), torch.einsum("us,srd->urd", w, B_experts)

    @classmethod
    def group_factors(cls, members, weights):
        first = members[0]
        w = weights[:, :, 0].to(first.leaves_A.dtype)  # [G, U, S]
        out = []
        for side, d in (("A", first.in_features), ("B", first.out_features)):
            leaves, norms = cls.stacked(members, side, lead=1)
            experts = build_rows(leaves.transpose(1, 2), d, norms, truncate=False)  # [G, S, r, d' >= d]
            G, S, r, full = experts.shape
            mixed = torch.bmm(w, experts.view(G, S, r * full)).view(G, -1, r, full)  # mix first, then cut
            out.append(mixed)  # [G, U, r, d'], cut to d by build_group
        return out[0], out[1]


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

    @classmethod
    def group_factors(cls, members, weights):
        first = members[0]
        G, U, N, S = weights.shape
        w = weights.to(first.leaves_A.dtype).transpose(1, 2).reshape(G * N, U, S)
        out = []
        for side, d in (("A", first.in_features), ("B", first.out_features)):
            leaves, norms = cls.stacked(members, side, lead=1)  # [G, N, S, r, l]
            r, leaf = leaves.shape[-2:]
            mixed = torch.bmm(w, leaves.reshape(G * N, S, r * leaf)).view(G, N, U, r, leaf)
            out.append(build_rows(mixed.transpose(1, 2), d, norms, truncate=False))  # [G, U, r, d']
        return out[0], out[1]
