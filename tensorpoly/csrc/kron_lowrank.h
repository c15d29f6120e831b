// The fused low-rank update of the tensor adapters (kron_lowrank.cpp), bound in kron_rows.cpp's module.
#pragma once
#include <torch/extension.h>

#include <vector>

// (y, h): y = out + (x A_u) B_u with h = scale * x A_u kept for the backward pass; x [n, T, d_in],
// out [n, T, d_out], task [n]; per side the operands of the factors' last Kronecker product:
// w [U, S], P [S, R, p], Q [S, R, q] (mixed) or w None, P [U, R, p], Q [U, R, q] (plain).
std::vector<torch::Tensor> kron_lowrank_forward(torch::Tensor x, torch::Tensor out, torch::Tensor task,
                                                double scale, c10::optional<torch::Tensor> wA, torch::Tensor PA,
                                                torch::Tensor QA, c10::optional<torch::Tensor> wB, torch::Tensor PB,
                                                torch::Tensor QB);

// (grad x or None, grad wA or None, grad PA, grad QA, grad wB or None, grad PB, grad QB).
std::vector<torch::Tensor> kron_lowrank_backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor h,
                                                 torch::Tensor task, double scale, c10::optional<torch::Tensor> wA,
                                                 torch::Tensor PA, torch::Tensor QA, c10::optional<torch::Tensor> wB,
                                                 torch::Tensor PB, torch::Tensor QB, bool need_x);
