"""Independent re-statements of the paper's equations, written without the library's code paths."""
import torch


def joint_ln(z, stats_from, weight, bias, eps):
    """(z - mean) / sqrt(var + eps) * weight + bias, mean and variance taken over all of stats_from."""
    mean = stats_from.mean()
    var = ((stats_from - mean) ** 2).mean()
    return (z - mean) / torch.sqrt(var + eps) * weight + bias


def used_digits(lengths, p, d):
    """Brute force: which leading entries of factor p occur among the first d product entries."""
    digits = set()
    for i in range(d):
        rest = i
        for q in range(len(lengths) - 1, p, -1):
            rest //= lengths[q]
        digits.add(rest % lengths[p])
    assert digits == set(range(len(digits)))  # always a prefix
    return len(digits)


def reference_rows(leaves, d, norms, scope="joint", shared=True):
    """leaves [N, r, l] -> [r, d], written row by row with torch.kron."""
    N, r, leaf = leaves.shape
    lengths = [leaf * leaf] * (N // 2) + [leaf] * (N % 2)
    factors = []
    for p in range(N // 2):
        pair = torch.stack([torch.kron(leaves[2 * p, i], leaves[2 * p + 1, i]) for i in range(r)])
        if norms is not None:
            norm = norms[0 if shared else p]
            used = pair.shape[-1] if norm.over_padding else used_digits(lengths, p, d)

            def ln(z):
                return joint_ln(z, z[..., :used], norm.weight, norm.bias, norm.eps)

            pair = ln(pair) if scope == "joint" else torch.stack([ln(row) for row in pair])
        factors.append(pair)
    if N % 2:
        factors.append(leaves[N - 1])
    rows = []
    for i in range(r):
        row = factors[0][i]
        for f in factors[1:]:
            row = torch.kron(row, f[i])
        rows.append(row[:d])
    return torch.stack(rows)


def router_weights(logits_row, n_splits, n_experts):
    """sigmoid, then normalise over experts per split (Polytropon)."""
    p = torch.sigmoid(logits_row.view(n_splits, n_experts))
    return p / (p.sum(-1, keepdim=True) + 1e-12)


def reference_factors(adapter, task):
    """(A [d_in, r], B [r, d_out]) of one adapter for one task id, from its stored parameters."""
    kind = type(adapter).__name__
    scope = adapter.norms_A[0].scope if len(getattr(adapter, "norms_A", ())) else "joint"

    def reference_rows(leaves, d, norms, shared):
        return _rows(leaves, d, norms, scope, shared)

    if kind == "LoRALinear":
        return adapter.lora_A, adapter.lora_B
    if kind == "TLoRALinear":
        return (reference_rows(adapter.leaves_A, adapter.in_features, adapter.norms_A or None, shared=len(adapter.norms_A) == 1).T,
                reference_rows(adapter.leaves_B, adapter.out_features, adapter.norms_B or None, shared=len(adapter.norms_B) == 1))
    router = adapter.router
    w = router_weights(router.logits[task], router.n_splits, router.n_experts)
    if kind == "PolyLinear":
        q, S = adapter.n_splits, adapter.n_experts
        A = torch.cat([sum(w[k, s] * adapter.lora_A[k, s] for s in range(S)) for k in range(q)], dim=0)
        B = torch.cat([sum(w[k, s] * adapter.lora_B[k, s] for s in range(S)) for k in range(q)], dim=1)
        return A, B
    U, V = adapter.leaves_A, adapter.leaves_B
    S = U.shape[1]
    shared_A, shared_B = len(adapter.norms_A) == 1, len(adapter.norms_B) == 1
    nA, nB = adapter.norms_A or None, adapter.norms_B or None
    if kind == "TensorPolyILinear":
        A = sum(w[0, s] * reference_rows(U[:, s], adapter.in_features, nA, shared=shared_A) for s in range(S)).T
        B = sum(w[0, s] * reference_rows(V[:, s], adapter.out_features, nB, shared=shared_B) for s in range(S))
        return A, B
    if kind == "TensorPolyIILinear":
        mixed_U = torch.stack([sum(w[j, s] * U[j, s] for s in range(S)) for j in range(U.shape[0])])
        mixed_V = torch.stack([sum(w[j, s] * V[j, s] for s in range(S)) for j in range(V.shape[0])])
        return (reference_rows(mixed_U, adapter.in_features, nA, shared=shared_A).T,
                reference_rows(mixed_V, adapter.out_features, nB, shared=shared_B))
    raise AssertionError(kind)


def reference_layer_output(adapter, x, task_ids):
    """y_b = x_b W^T + b + (1/r) x_b A_t B_t, example by example."""
    outs = []
    for b in range(x.shape[0]):
        A, B = reference_factors(adapter, int(task_ids[b]) if task_ids is not None else None)
        y = x[b] @ adapter.base_layer.weight.T
        if adapter.base_layer.bias is not None:
            y = y + adapter.base_layer.bias
        outs.append(y + (x[b] @ A @ B) / adapter.rank)
    return torch.stack(outs)


_rows = reference_rows
