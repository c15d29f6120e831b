"""LoRA: y = x W^T + (1/r) x A B, A uniform(±0.577/sqrt(d_in)), B zero (the paper code's init)."""
from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLinear, paper_uniform_


class LoRALinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, config):
        super().__init__(base_layer, config)
        kw = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.in_features, self.rank, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.rank, self.out_features, **kw))
        self.reset_parameters(config)

    def reset_parameters(self, config) -> None:
        paper_uniform_(self.lora_A, self.in_features)
        nn.init.zeros_(self.lora_B)

    def factors(self, weights):
        return self.lora_A.unsqueeze(0), self.lora_B.unsqueeze(0)
