// The fused low-rank update of the tensor adapters (kron_lowrank.cpp), bound in kron_rows.cpp's module.
#pragma once
#include <torch/extension.h>

#include <vector>

// (y, h): y = out + (x A_u) B_u with h = scale * x A_u kept for the backward pass; x [n, T, d_in],
// out [n, T, d_out], task [n]. Each side: [c, P, Q, W, beta, m, sigma] (None where absent), see
// kron_lowrank.cpp; mixed: P, Q are the experts' (c required), else each task's.
std::vector<torch::Tensor> kron_lowrank_forward(torch::Tensor x, torch::Tensor out, torch::Tensor task, double scale,
                                                bool mixed, std::vector<c10::optional<torch::Tensor>> side_A,
                                                std::vector<c10::optional<torch::Tensor>> side_B);

// [grad x or None, then per side the gradients of c, P, Q, W, beta, m, sigma (None where absent)].
std::vector<torch::Tensor> kron_lowrank_backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor h,
                                                 torch::Tensor task, double scale, bool mixed,
                                                 std::vector<c10::optional<torch::Tensor>> side_A,
                                                 std::vector<c10::optional<torch::Tensor>> side_B, bool need_x);
