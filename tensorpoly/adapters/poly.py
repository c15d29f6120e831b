"""Poly (Polytropon) and MHR: S LoRA experts mixed per task, A and B mixed separately.

With q = n_splits heads, split k owns input block k of A and output block k of B:
    A_t[k-th block] = sum_s w[t, k, s] A[k, s],   B_t[k-th block] = sum_s w[t, k, s] B[k, s].
q = 1 is Poly, q > 1 is MHR. Parameter layout [q, S, d/q, r] matches PEFT's Poly tuner.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from .base import AdapterLinear, paper_uniform_


class PolyLinear(AdapterLinear):
    routed = True

    def __init__(self, base_layer: nn.Linear, config):
        super().__init__(base_layer, config)
        q, S, r = config.n_splits, config.n_experts, config.rank
        self.n_splits, self.n_experts = q, S
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(q, S, self.in_features // q, r, **kw))
        self.lora_B = nn.Parameter(torch.empty(q, S, r, self.out_features // q, **kw))
        self.reset_parameters(config)

    @classmethod
    def check_shape(cls, config, d_in, d_out, name):
        q = config.n_splits
        if d_in % q or d_out % q:
            raise ConfigError(f"n_splits={q} must divide both dimensions of {name} ({d_in}->{d_out}); "
                              f"pick a common divisor of the adapted layers' sizes")

    def reset_parameters(self, config) -> None:
        # The paper code bounds A by the full d_in even when split (PEFT uses d_in / q).
        paper_uniform_(self.lora_A, self.in_features)
        nn.init.zeros_(self.lora_B)

    def factors(self, weights):
        U = weights.shape[0]
        w = weights.to(self.lora_A.dtype)
        A = torch.einsum("uqs,qsdr->uqdr", w, self.lora_A).reshape(U, self.in_features, self.rank)
        B = torch.einsum("uqs,qsrd->urqd", w, self.lora_B).reshape(U, self.rank, self.out_features)
        return A, B

    @property
    def probe(self) -> torch.Tensor:
        return self.lora_A

    def group_key(self) -> tuple:
        return (type(self), self.in_features, self.out_features, tuple(self.lora_A.shape), tuple(self.lora_B.shape))

    @classmethod
    def group_factors(cls, members, weights):
        first = members[0]
        G, U, q, S = weights.shape
        r, d_in, d_out = first.rank, first.in_features, first.out_features
        w = weights.to(first.lora_A.dtype).transpose(1, 2).reshape(G * q, U, S)
        lora_A = torch.stack([m.lora_A for m in members]).view(G * q, S, -1)  # [G q, S, d_in/q r]
        lora_B = torch.stack([m.lora_B for m in members]).view(G * q, S, -1)  # [G q, S, r d_out/q]
        A = torch.bmm(w, lora_A).view(G, q, U, d_in // q, r).transpose(1, 2).reshape(G, U, d_in, r)
        B = torch.bmm(w, lora_B).view(G, q, U, r, d_out // q).permute(0, 2, 3, 1, 4).reshape(G, U, r, d_out)
        return A, B
