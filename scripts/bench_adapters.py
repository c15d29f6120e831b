#!/usr/bin/env python
"""Side-by-side speed and memory of every adapter, on one backbone and one batch, in one process.

    python scripts/bench_adapters.py --preset cpu     # small T5 (d_model 512, 8+8 layers), 1 CPU thread, minutes
    python scripts/bench_adapters.py --preset gpu     # T5-XL shapes, bf16, one GPU (random weights, no download)
    make bench ARGS="--preset cpu"

Rows: the frozen backbone (the floor: forward and backward through the frozen network, nothing
to update), PEFT LoRA r16, our LoRA r16, TLoRA, PEFT Poly, our Poly, MHR, TensorPoly-I and -II at
order 2 and 4, the same at order 4 with every factor built by PyTorch ops and multiplied by its
matmuls (no fused CPU kernel, tensorpoly/kron_kernel.py: what the kernels gain; on a GPU both rows
run the ops), with the factors built by the kernels but materialised and multiplied by PyTorch's
matmuls (no fused low-rank update: what never storing the factors gains), the same with the
factors rebuilt in the backward pass (recompute_factors: what saving their memory costs there), and the
literal per-example TensorPoly-I/II (tensorpoly/per_example.py: the paper code's algorithm) as the
anchor. Every batch mixes `distinct` different tasks.

Per row: the training step (forward, backward, AdamW step with the foreach kernels that training uses,
zero_grad) and the evaluation forward
(no grad, teacher-forced, with labels), each the median of `steps` timed repetitions after `warmup`
untimed ones; peak memory of a training step; trainable parameters; each as a ratio to our LoRA
r16, and the time above the floor; minor page faults per training step; for our grouped adapters the factor
construction alone (construction_step: forward and backward, no backbone). With --interleave (the CPU
default) all models are built first and timed round-robin, one step of every model per round, so
background load drifts hit every row alike; on a CPU the run first pins glibc's malloc thresholds
(--malloc, pin_malloc_thresholds), so that a variant's page faults do not depend on its neighbours.

Peak memory. GPU: torch.cuda.max_memory_allocated over one training step (weights, optimizer
state, activations, everything allocated). CPU: the same quantity, computed as the bytes of the
model's parameters, buffers and optimizer state plus the peak, over one training step, of the
bytes allocated by torch above the step's start (from the profiler's allocation events).

Writes <out>/<preset>.json and <out>/<preset>.md (hardware and versions included); with --profile K
also <out>/<preset>_profile.md (one profiled training step per variant, top K ops by self CPU).

--compile factors,model adds, next to every selected variant, a copy run through torch.compile
(Inductor), timed in the same rounds as the eager rows, and writes <out>/<preset>_compile.{json,md}
instead. "factors": our adapters' factor construction (build_rows, row_factors, kron_chain,
mix_kron_chain: tensor_product.compiled_factors), the smallest unit that holds the tensor types'
elementwise work; the floor and PEFT rows have none and are not repeated, our LoRA (nothing to
construct either) is, as the reference and a gauge of the noise. "model": the whole T5 module of
every variant (nn.Module.compile), floor and LoRA included. A compiled row's × LoRA is against our
LoRA compiled the same way; its first warm-up step (compilation included) and the Dynamo graphs,
graph breaks and recompilations are reported too.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tensorpoly.kron_kernel import fused_kernels

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]  # every attention and FF linear, as our default

PRESETS = {
    # A small T5 v1.1 layout (t5-small-lm-adapt shapes) with a byte-sized vocabulary.
    "cpu": dict(backbone="t5_small_lm_adapt", config=dict(vocab_size=384), batch=8, distinct=8,
                input_len=64, target_len=16, dtype="float32", device="cpu", n_tasks=313,
                mhr_heads=64, warmup=2, steps=11, interleave=True, threads=1),
    # T5-XL / T0-3B shapes, the paper's setting; random weights built from the config.
    "gpu": dict(backbone="t5_xl_lm_adapt", config={}, batch=16, distinct=8, input_len=256, target_len=64,
                dtype="bfloat16", device="cuda", n_tasks=313, mhr_heads=64, warmup=3, steps=10,
                interleave=False, threads=None),
    # Seconds: for the smoke test of this script's code path.
    "tiny": dict(backbone=None, config=dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                            num_decoder_layers=2, feed_forward_proj="gated-gelu"),
                 batch=4, distinct=2, input_len=8, target_len=4, dtype="float32", device="cpu", n_tasks=4,
                 mhr_heads=4, warmup=1, steps=1, interleave=True, threads=1),
}


@dataclass
class Variant:
    name: str
    label: str
    kind: str  # floor | peft_lora | peft_poly | ours | literal
    fields: dict = field(default_factory=dict)
    recompute: bool = False  # TaskRouting.recompute_factors: factors rebuilt in the backward pass
    compile: str | None = None  # None (eager) | "factors" | "model": see --compile
    fused: bool = True  # False: the group's last Kronecker product by PyTorch ops, not the fused CPU kernel
    low_rank: bool = True  # False: the tensor adapters' factors materialised, not the fused low-rank update

    def kernels(self):
        """The kron_kernel switches this row runs under."""
        return fused_kernels(self.fused, self.fused and self.low_rank)

    @property
    def settings(self) -> str:
        f = self.fields
        parts = []
        if "rank" in f:
            parts.append(f"r{f['rank']}")
        if "n_experts" in f:
            parts.append(f"S{f['n_experts']}")
        if "order" in f:
            parts.append(f"N{f['order']}")
        if f.get("n_splits", 1) > 1:
            parts.append(f"h{f['n_splits']}")
        return " ".join(parts) or "-"


def variants(mhr_heads: int) -> list[Variant]:
    tp = dict(rank=16, n_experts=8)
    rows = [
        Variant("floor", "frozen backbone (floor)", "floor"),
        Variant("peft_lora_r16", "PEFT LoRA", "peft_lora", dict(rank=16)),
        Variant("lora_r16", "LoRA (ours)", "ours", dict(module_type="lora", rank=16)),
        Variant("tlora_n4", "TLoRA", "ours", dict(module_type="tlora", rank=16, order=4)),
        Variant("peft_poly", "PEFT Poly", "peft_poly", dict(rank=1, n_experts=8)),
        Variant("poly", "Poly (ours)", "ours", dict(module_type="poly", rank=1, n_experts=8)),
        Variant("mhr", "MHR", "ours", dict(module_type="mhr", rank=1, n_experts=8, n_splits=mhr_heads)),
    ]
    for kind, label in (("tensorpoly1", "TensorPoly-I"), ("tensorpoly2", "TensorPoly-II")):
        for order in (2, 4):
            rows.append(Variant(f"{kind}_n{order}", label, "ours", dict(module_type=kind, order=order, **tp)))
    for kind, label in (("tensorpoly1", "TensorPoly-I"), ("tensorpoly2", "TensorPoly-II")):
        rows.append(Variant(f"{kind}_n4_torch_ops", f"{label}, PyTorch ops (no fused kernel)", "ours",
                            dict(module_type=kind, order=4, **tp), fused=False))
    for kind, label in (("tensorpoly1", "TensorPoly-I"), ("tensorpoly2", "TensorPoly-II")):
        rows.append(Variant(f"{kind}_n4_materialised", f"{label}, factors materialised (no fused update)", "ours",
                            dict(module_type=kind, order=4, **tp), low_rank=False))
    for kind, label in (("tensorpoly1", "TensorPoly-I"), ("tensorpoly2", "TensorPoly-II")):
        rows.append(Variant(f"{kind}_n4_recompute", f"{label}, materialised, recompute_factors", "ours",
                            dict(module_type=kind, order=4, **tp), recompute=True, low_rank=False))
    for kind, label in (("tensorpoly1", "TensorPoly-I"), ("tensorpoly2", "TensorPoly-II")):
        for order in (2, 4):
            rows.append(Variant(f"literal_{kind}_n{order}", f"{label}, literal per-example", "literal",
                                dict(module_type=kind, order=order, **tp)))
    return rows


# ---- building ------------------------------------------------------------------------------------
def backbone_config(preset: dict):
    from transformers import T5Config

    if preset["backbone"]:
        from tensorpoly.backbones import backbone_config as named

        config = named(preset["backbone"])
    else:
        config = T5Config()
    for key, value in preset["config"].items():
        setattr(config, key, value)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 0, 1
    return config


def build_backbone(config, device, dtype, seed: int):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = T5ForConditionalGeneration(config)
    return model.to(dtype)


COMPILE_MODES = ("factors", "model")


def compiled_variants(rows: list[Variant], modes: list[str]) -> list[Variant]:
    """The copies of rows that --compile adds, mode by mode (see the module docstring)."""
    out = []
    for mode in modes:
        for v in rows:
            if mode == "factors" and v.kind not in ("ours", "literal"):
                continue  # the floor and PEFT build no factors of ours: nothing to compile
            out.append(replace(v, name=f"{v.name}+{mode}", label=f"{v.label}, compiled {mode}", compile=mode))
    return out


def apply_compile(variant: Variant, model, call, dynamic: bool | None):
    """The variant's call, compiled as --compile asks."""
    if variant.compile == "factors":
        from tensorpoly.tensor_product import compiled_factors

        def compiled_call(b):
            with compiled_factors(dynamic=dynamic):  # the backward pass runs what was compiled here
                return call(b)
        return compiled_call
    if variant.compile == "model":
        from transformers import T5ForConditionalGeneration

        import torch._dynamo

        # Every model of the process shares Dynamo's cache of T5's code (decoder blocks recompile per
        # layer, the floor's hook breaks graphs): past the default limit of 8 later models would run eagerly.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 512)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
        t5 = next(m for m in model.modules() if isinstance(m, T5ForConditionalGeneration))
        t5.compile(dynamic=dynamic)
    return call


class LimitHits(logging.Handler):
    """Counts Dynamo's warnings that a function hit its recompile limit (it then runs eagerly)."""

    count = 0

    def emit(self, record) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            LimitHits.count += 1


def dynamo_counts() -> dict:
    """Dynamo's running totals: graphs compiled, graph breaks, recompile-limit hits."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()), "limit_hits": LimitHits.count}


def construction_step(model, task_ids: torch.Tensor, compiled: bool = False, dynamic: bool | None = False) -> None:
    """Only what --compile factors compiles: every layer group's factors for the batch's distinct tasks
    (the group build and each member's make, as in a training step), forward and backward (through
    the sum of their squares), without the backbone."""
    from tensorpoly import kron_kernel
    from tensorpoly.adapters.tlora import KronFactors
    from tensorpoly.tensor_product import compiled_factors

    routing = model.task_routing
    whole = routing.whole_factors and not routing.recompute_factors  # as a training step builds them
    outs = []
    with routing.use(task_ids), compiled_factors(compiled, dynamic=dynamic):
        for group in routing._groups.values():
            ids = torch.unique(task_ids) if group.members[0].routed else None
            for factors in group.build(ids, whole):
                if isinstance(factors, KronFactors) and kron_kernel.low_rank_usable(*factors.pieces):
                    outs.extend(factors.pieces)  # the fused update takes the operands: no factors built
                else:
                    outs.extend(factors.materialize())
    outs = [o for o in outs if o.requires_grad]
    if outs:
        # The gradient of the outputs' sum, with no per-output loss ops (hundreds of tiny pieces).
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    model.zero_grad(set_to_none=True)


def count_diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def build(variant: Variant, config, preset: dict, tasks: list[str], seed: int):
    """(model, call(inputs, train) -> loss, trainable parameters)."""
    device, dtype = torch.device(preset["device"]), getattr(torch, preset["dtype"])
    backbone = build_backbone(config, device, dtype, seed)
    f = variant.fields
    if variant.kind == "floor":
        for p in backbone.parameters():
            p.requires_grad_(False)
        # Gradients flow through the whole frozen network (as they must for any adapter of the
        # first layer), into the embedding output; nothing is updated.
        for module in backbone.modules():
            if isinstance(module, torch.nn.Embedding):
                module.register_forward_hook(lambda m, i, out: out.requires_grad_())
        return backbone, lambda b: backbone(input_ids=b["input_ids"], labels=b["labels"]).loss
    if variant.kind == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(backbone, LoraConfig(task_type="SEQ_2_SEQ_LM", r=f["rank"], lora_alpha=f["rank"],
                                                    lora_dropout=0.0, target_modules=TARGETS),
                               autocast_adapter_dtype=False)
        return model, lambda b: model(input_ids=b["input_ids"], labels=b["labels"]).loss
    if variant.kind == "peft_poly":
        from peft import PolyConfig, get_peft_model

        model = get_peft_model(backbone, PolyConfig(task_type="SEQ_2_SEQ_LM", r=f["rank"], n_tasks=len(tasks),
                                                    n_skills=f["n_experts"], n_splits=1, target_modules=TARGETS),
                               autocast_adapter_dtype=False)
        return model, lambda b: model(input_ids=b["input_ids"], labels=b["labels"], task_ids=b["task_ids"]).loss
    from tensorpoly import AdapterConfig, TensorPolyModel
    from tensorpoly.per_example import per_example

    fields = dict(f)
    routed = fields["module_type"] in ("poly", "mhr", "tensorpoly1", "tensorpoly2")
    model = TensorPolyModel(backbone, AdapterConfig(task_names=tasks if routed else [], **fields))
    if variant.kind == "literal":
        per_example(model)
    model.task_routing.recompute_factors = variant.recompute
    ids_key = "task_ids" if routed else None
    return model, lambda b: model(input_ids=b["input_ids"], labels=b["labels"],
                                  task_ids=b[ids_key] if ids_key else None).loss


def make_batch(preset: dict, vocab: int, n_tasks: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, distinct = preset["batch"], preset["distinct"]
    chosen = torch.randperm(n_tasks, generator=g)[:distinct]
    task_ids = chosen.repeat(B // distinct + 1)[:B]
    task_ids = task_ids[torch.randperm(B, generator=g)]  # examples of one task are not adjacent
    batch = dict(input_ids=torch.randint(2, vocab, (B, preset["input_len"]), generator=g),
                 labels=torch.randint(2, vocab, (B, preset["target_len"]), generator=g), task_ids=task_ids)
    return {k: v.to(preset["device"]) for k, v in batch.items()}


# ---- measuring -----------------------------------------------------------------------------------
class Runner:
    """One model, its optimizer, and timed training / evaluation calls."""

    def __init__(self, variant: Variant, model, call, batch: dict, device: torch.device):
        self.variant, self.model, self.call, self.batch, self.device = variant, model, call, batch, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        # As training builds it (experiment/optim.py): the multi-tensor kernels.
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, foreach=True) if self.params else None
        self.train_ms: list[float] = []
        self.eval_ms: list[float] = []
        self.construct_ms: list[float] = []  # construction_step: our grouped adapters' factors alone
        self.first_ms: dict[str, float] = {}  # the first train / eval call (compilation included)
        self.dynamo: dict[str, dict] = {}  # Dynamo counts added by this runner's warm-up / timed calls
        self.cpu_ms: dict[int, list[float]] = {}  # CPU time of this thread, by id of the wall-clock list
        self.faults: dict[int, list[int]] = {}  # minor page faults of the process, likewise

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> None:
        self.model.train()
        with self.variant.kernels():
            loss = self.call(self.batch)
            loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward(self) -> None:
        self.model.eval()
        with self.variant.kernels():
            self.call(self.batch)

    def timed(self, fn, into: list | None) -> None:
        self.sync()
        start, cpu, faults = time.perf_counter(), time.thread_time(), minor_faults()
        fn()
        self.sync()
        if into is not None:
            into.append((time.perf_counter() - start) * 1000)
            self.cpu_ms.setdefault(id(into), []).append((time.thread_time() - cpu) * 1000)
            self.faults.setdefault(id(into), []).append(minor_faults() - faults)

    def persistent_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        if self.optimizer is not None:
            tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        seen = {}
        for t in tensors:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def peak_bytes(self) -> int:
        """Peak memory of one training step (see the module docstring)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self.persistent_bytes() + cpu_step_peak(self.train_step)


def cpu_step_peak(fn) -> int:
    """Peak bytes allocated by torch on the CPU during fn(), above the level at its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
    if not allocations:
        return 0
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]  # the running total just before the first allocation
    return max(total for _, _, total in allocations) - start


def profile_table(runners: list[Runner], top: int) -> str:
    """Per variant, one profiled training step: operator events, autograd nodes, minor page faults of
    the process, and the `top` operators by self CPU time (markdown). Where the time above LoRA goes."""
    from torch.profiler import ProfilerActivity, profile

    faults = minor_faults
    lines = []
    for runner in runners:
        gc.collect()
        start = faults()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.train_step()
        faulted = faults() - start
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        nodes = sum(e.count for e in events if e.key.startswith("autograd::engine::evaluate_function"))
        total = sum(e.self_cpu_time_total for e in events) / 1000
        lines += [f"### {runner.variant.label} ({runner.variant.settings})", "",
                  f"{ops:,} aten ops, {nodes:,} autograd nodes, {faulted:,} minor page faults, "
                  f"{total:,.0f} ms self CPU (profiled, so slower than the timed steps).", "",
                  "| op | calls | self CPU ms |", "|---|---:|---:|"]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
            lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1000:.1f} |")
        lines.append("")
    return "\n".join(lines)


def minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh 4 KiB page the kernel zeroed (0 off Unix)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def pin_malloc_thresholds() -> str:
    """Keep freed memory in the process's heap (CPU): what the allocator setting of this run was.

    The interleaved variants share one glibc heap. Its default thresholds move with the history of
    allocations: blocks above the mmap threshold go back to the kernel when freed, and so does heap
    top above the trim threshold; the next allocation of that size then takes a page fault per 4 KiB.
    Whether a variant's factor-sized temporaries hit that depended on which models ran before it in
    the round (measured: TensorPoly-I order 2 took 11k minor faults a step interleaved, 148 alone).
    Pinning both thresholds makes every variant reuse freed memory, as it does when it runs alone."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt)"
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return "glibc, mmap and trim thresholds pinned" if ok else "default (mallopt refused)"


def hardware(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or "?",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["fused_kernel"] = fused_kernel_status()
    return info


def fused_kernel_status() -> str:
    """Whether the fused CPU kernel (tensorpoly/kron_kernel.py) ran in the rows that ask for it."""
    from tensorpoly import kron_kernel

    if not kron_kernel._STATE.enabled:
        return "off (TENSORPOLY_FUSED_KERNELS=0)"
    if kron_kernel.extension() is None:
        return f"not built ({kron_kernel._STATE.failed})"
    return "built"


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runners: list[Runner], memory: dict, counts: dict, interleaved: bool = False) -> list[dict]:
    by_name = {r.variant.name: r for r in runners}
    rows = []
    for r in runners:
        v = r.variant
        # Compiled rows against our LoRA compiled the same way (eager LoRA if it was not).
        suffix = f"+{v.compile}" if v.compile and f"lora_r16+{v.compile}" in by_name else ""
        ref = by_name.get("lora_r16" + suffix)
        floor = by_name.get("floor" + (f"+{v.compile}" if v.compile and f"floor+{v.compile}" in by_name else ""))
        ref_train, ref_eval = (median(ref.train_ms), median(ref.eval_ms)) if ref else (None, None)
        floor_train = median(floor.train_ms) if floor else None
        train, evaluation = median(r.train_ms), median(r.eval_ms)
        row = dict(name=v.name, label=v.label, settings=v.settings, kind=v.kind, trainable_params=counts[v.name],
                   train_ms=train, eval_ms=evaluation, peak_mib=memory[v.name] / 2**20,
                   train_ms_all=r.train_ms, eval_ms_all=r.eval_ms,
                   train_cpu_ms_all=r.cpu_ms.get(id(r.train_ms), []), eval_cpu_ms_all=r.cpu_ms.get(id(r.eval_ms), []))
        row["train_cpu_ms"] = median(row["train_cpu_ms_all"])
        row["train_faults"] = median(r.faults.get(id(r.train_ms), []))
        ref_cpu = median(ref.cpu_ms.get(id(ref.train_ms), [])) if ref else None
        row["train_cpu_x_lora"] = row["train_cpu_ms"] / ref_cpu if ref_cpu and row["train_cpu_ms"] else None
        row["train_x_lora"] = train / ref_train if ref_train else None
        if ref is not None and interleaved and len(r.train_ms) == len(ref.train_ms) > 0:
            # Each round times every model once: a load drift that hits a round hits both of a pair.
            row["train_x_lora_per_round"] = median([a / b for a, b in zip(r.train_ms, ref.train_ms)])
        row["eval_x_lora"] = evaluation / ref_eval if ref_eval else None
        row["peak_x_lora"] = memory[v.name] / memory[ref.variant.name] if ref else None
        if r.construct_ms:
            row["construct_ms"], row["construct_ms_all"] = median(r.construct_ms), r.construct_ms
        if v.compile:
            row.update(compile=v.compile, first_train_ms=r.first_ms.get("train"), first_eval_ms=r.first_ms.get("eval"),
                       dynamo=r.dynamo)
            eager = by_name.get(v.name.rsplit("+", 1)[0])
            if eager is not None:
                row["train_x_eager"] = train / median(eager.train_ms)
                row["eval_x_eager"] = evaluation / median(eager.eval_ms)
                if r.construct_ms and eager.construct_ms:
                    row["construct_x_eager"] = median(r.construct_ms) / median(eager.construct_ms)
        row["train_over_floor_ms"] = train - floor_train if floor_train is not None else None
        rows.append(row)
    # The literal per-example anchor against the fast path of the same type and order.
    for row in rows:
        if row.get("compile"):
            continue
        literal = next((x for x in rows if x["name"] == f"literal_{row['name']}"), None)
        if literal is not None:
            row["literal_x_train"] = literal["train_ms"] / row["train_ms"]
            row["literal_x_eval"] = literal["eval_ms"] / row["eval_ms"]
            if row["train_over_floor_ms"] and literal["train_over_floor_ms"] is not None:
                row["literal_x_overhead"] = literal["train_over_floor_ms"] / row["train_over_floor_ms"]
    return rows


def fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def markdown(result: dict) -> str:
    s = result["settings"]
    hw = result["hardware"]
    where = hw.get("gpu") or f"{hw['cpu']}, {hw['torch_threads']} thread(s)"
    lines = [f"Preset `{result['preset']}`: {s['backbone']} (d_model {s['d_model']}, {s['layers']} layers, "
             f"vocab {s['vocab_size']}), batch {s['batch']} with {s['distinct']} different tasks, input {s['input_len']}, "
             f"target {s['target_len']}, {s['dtype']}, {s['adapted_linears']} adapted linears. {where}; "
             f"torch {result['versions']['torch']}. Median of {s['steps']} steps after {s['warmup']} warm-up"
             f"{', interleaved' if s['interleave'] else ''}. AdamW with foreach kernels"
             f"{'; Python GC: objects alive after building frozen (gc.freeze, as in training)' if s.get('python_gc') else ''}"
             f"{'; allocator: ' + hw['allocator'] if 'allocator' in hw else ''}"
             f"{'; fused CPU kernel: ' + hw['fused_kernel'] if 'fused_kernel' in hw else ''}.",
             "",
             "| variant | settings | trainable | train step ms | × LoRA (per round) | over floor ms | eval fwd ms | × LoRA "
             "| peak MiB | × LoRA | page faults / step | factors fwd+bwd ms | literal ÷ this (train / eval) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        literal = (f"{row['literal_x_train']:.2f} / {row['literal_x_eval']:.2f}" if "literal_x_train" in row else "")
        per_round = f" ({row['train_x_lora_per_round']:.3f})" if row.get("train_x_lora_per_round") else ""
        lines.append(f"| {row['label']} | {row['settings']} | {row['trainable_params']:,} | {fmt(row['train_ms'], '.1f')} "
                     f"| {fmt(row['train_x_lora'], '.3f')}{per_round} | {fmt(row['train_over_floor_ms'], '.1f')} "
                     f"| {fmt(row['eval_ms'], '.1f')} | {fmt(row['eval_x_lora'], '.3f')} | {fmt(row['peak_mib'], ',.0f')} "
                     f"| {fmt(row['peak_x_lora'], '.3f')} | {fmt(row.get('train_faults'), ',.0f')} "
                     f"| {fmt(row.get('construct_ms'), '.1f', '')} | {literal} |")
    lines.append("")
    lines.append("× LoRA: ratio to our LoRA r16 (of the medians; in brackets, interleaved runs: the median over rounds "
                 "of the ratio within a round). Page faults / step: median minor page faults of the process over a "
                 "timed training step (fresh memory from the kernel). Factors fwd+bwd: our grouped adapters' factor "
                 "construction alone, as a training step builds them (every layer group's build for the batch's tasks "
                 "and its backward pass, no backbone; LoRA builds none; with the fused update, what the group hands "
                 "its layers: the factors' operands, not the factors), median of as many interleaved rounds. "
                 "Peak: " + result["memory_note"])
    compiled = [row for row in result["rows"] if row.get("compile")]
    if compiled:
        eager = {row["name"]: row for row in result["rows"] if not row.get("compile")}
        lines += ["", f"torch.compile (Inductor, dynamic={result['settings']['compile_dynamic']}): each variant eager and "
                  "compiled, timed in the same rounds. A compiled row's × LoRA is against our LoRA compiled the same "
                  "way. First step: the first training / evaluation call, compilation included. Graphs, breaks, "
                  "limit hits: Dynamo's counts over that row's warm-up calls (train + eval): graphs compiled, "
                  "graph breaks, functions that hit the recompile limit (and then ran eagerly). Factors fwd+bwd: "
                  "only the factor construction of a training step (every group's build and members' factors, "
                  "forward and backward, no backbone), median of as many interleaved rounds, eager → compiled.", "",
                  "| variant | settings | compiled | train step ms | × LoRA | eager ms | eager × LoRA | compiled ÷ eager "
                  "| eval fwd ms | × LoRA | compiled ÷ eager | factors fwd+bwd ms | compiled ÷ eager "
                  "| first step s (train / eval) | graphs | breaks | limit hits |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in compiled:
            base = eager.get(row["name"].rsplit("+", 1)[0], {})
            total = {k: sum(d.get(k, 0) for label, d in row["dynamo"].items() if "warm-up" in label)
                     for k in ("graphs", "graph_breaks", "limit_hits")}
            lines.append(f"| {base.get('label', row['label'])} | {row['settings']} | {row['compile']} "
                         f"| {fmt(row['train_ms'], '.1f')} | {fmt(row['train_x_lora'], '.3f')} "
                         f"| {fmt(base.get('train_ms'), '.1f')} | {fmt(base.get('train_x_lora'), '.3f')} "
                         f"| {fmt(row.get('train_x_eager'), '.3f')} | {fmt(row['eval_ms'], '.1f')} "
                         f"| {fmt(row['eval_x_lora'], '.3f')} | {fmt(row.get('eval_x_eager'), '.3f')} "
                         f"| {fmt(base.get('construct_ms'), '.1f')} → {fmt(row.get('construct_ms'), '.1f')} "
                         f"| {fmt(row.get('construct_x_eager'), '.3f')} "
                         f"| {fmt(row['first_train_ms'] and row['first_train_ms'] / 1000, '.1f')} / "
                         f"{fmt(row['first_eval_ms'] and row['first_eval_ms'] / 1000, '.1f')} "
                         f"| {total['graphs']} | {total['graph_breaks']} | {total['limit_hits']} |")
        timed = {k: compiled[0]["dynamo"].get(k, {}) for k in ("timed train", "timed eval")}
        lines += ["", "During the timed rounds (all compiled rows together): "
                  + "; ".join(f"{k}: {d.get('graphs', 0)} new graphs (recompilations), {d.get('graph_breaks', 0)} "
                              f"breaks, {d.get('limit_hits', 0)} limit hits" for k, d in timed.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first")
    parser.add_argument("--only", help="comma-separated variant names (floor and lora_r16 are always kept)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="build every model first and time them round-robin (CPU default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the cpu preset uses 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="also profile one training step per variant: op and autograd-node counts, page "
                             "faults, top K ops by self CPU time, into <out>/<preset>_profile.md (interleaved runs)")
    parser.add_argument("--compile", metavar="MODES",
                        help="comma-separated torch.compile modes (factors, model): add a compiled copy of every "
                             "selected variant and write <out>/<preset>_compile.{json,md} (see above)")
    parser.add_argument("--compile-dynamic", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile(dynamic=True) instead of shape-specialised graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="CPU: pin glibc's mmap and trim thresholds so that interleaved variants reuse "
                             "freed memory (see pin_malloc_thresholds), or leave glibc's defaults")
    args = parser.parse_args(argv)
    modes = args.compile.split(",") if args.compile else []
    if set(modes) - set(COMPILE_MODES):
        print(f"unknown compile modes {sorted(set(modes) - set(COMPILE_MODES))}; known: {list(COMPILE_MODES)}",
              file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    preset = dict(PRESETS[args.preset])
    for key in ("steps", "warmup", "interleave", "threads"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])
    device = torch.device(preset["device"])
    allocator = pin_malloc_thresholds() if args.malloc == "pinned" and device.type == "cpu" else "default"
    if device.type == "cuda" and not torch.cuda.is_available():
        print("the gpu preset needs a CUDA device; use --preset cpu here", file=sys.stderr)
        return 2
    if modes:
        logging.getLogger("torch._dynamo").addHandler(LimitHits())
    rows = variants(preset["mhr_heads"])
    if args.only:
        keep = set(args.only.split(",")) | {"floor", "lora_r16"}
        unknown = keep - {v.name for v in rows}
        if unknown:
            print(f"unknown variants {sorted(unknown)}; known: {[v.name for v in rows]}", file=sys.stderr)
            return 2
        rows = [v for v in rows if v.name in keep]
    rows += compiled_variants(rows, modes)
    stem = f"{args.preset}_compile" if modes else args.preset
    config = backbone_config(preset)
    tasks = [f"task{i}" for i in range(preset["n_tasks"])]
    batch = make_batch(preset, config.vocab_size, len(tasks), args.seed)

    counts, memory, runners, adapted = {}, {}, [], 0

    def make(v: Variant) -> Runner:
        nonlocal adapted
        model, call = build(v, config, preset, tasks, args.seed)
        call = apply_compile(v, model, call, args.compile_dynamic)
        runner = Runner(v, model, call, batch, device)
        counts[v.name] = sum(p.numel() for p in runner.params)
        if v.kind == "ours":
            adapted = len(model.adapter_names)
        return runner

    def measure(runner: Runner, train: bool, evaluation: bool) -> None:
        for kind, fn, wanted in (("train", runner.train_step, train), ("eval", runner.eval_forward, evaluation)):
            if not wanted:
                continue
            before = dynamo_counts()
            first: list[float] = []
            runner.timed(fn, first)
            runner.first_ms[kind] = first[0]
            for _ in range(preset["warmup"] - 1):
                runner.timed(fn, None)
            if runner.variant.compile:
                runner.dynamo[f"{kind} warm-up"] = count_diff(dynamo_counts(), before)

    def counted(label: str, rounds):
        """Dynamo counts added during rounds, given to the compiled runners (they run interleaved,
        so a count is the total over all of them: per runner only when a single one is compiled)."""
        before = dynamo_counts()
        yield from rounds
        added = count_diff(dynamo_counts(), before)
        for runner in runners:
            if runner.variant.compile:
                runner.dynamo[label] = added

    def builds_factors(r: Runner) -> bool:
        return r.variant.kind == "ours" and bool(r.model.task_routing._groups)

    def construct(r: Runner) -> None:
        with r.variant.kernels():
                construction_step(r.model, batch["task_ids"], r.variant.compile == "factors", args.compile_dynamic)

    started = time.perf_counter()
    if preset["interleave"]:
        for v in tqdm(rows, desc="build + warm-up", unit="variant"):
            runner = make(v)
            measure(runner, train=True, evaluation=False)
            runners.append(runner)
        # As training runs (experiment/fit.py): the models out of the cyclic collector's walks.
        gc.collect()
        gc.freeze()
        for _ in counted("timed train", tqdm(range(preset["steps"]), desc="train rounds", unit="round")):
            for runner in runners:
                runner.timed(runner.train_step, runner.train_ms)
        for runner in runners:
            measure(runner, train=False, evaluation=True)
        for _ in counted("timed eval", tqdm(range(preset["steps"]), desc="eval rounds", unit="round")):
            for runner in runners:
                runner.timed(runner.eval_forward, runner.eval_ms)
        builders = [r for r in runners if builds_factors(r)]
        for runner in builders:
            runner.timed(lambda r=runner: construct(r), None)
        for _ in tqdm(range(preset["steps"]) if builders else [], desc="factor construction rounds", unit="round"):
            for runner in builders:
                runner.timed(lambda r=runner: construct(r), runner.construct_ms)
        for runner in tqdm(runners, desc="peak memory", unit="variant"):
            memory[runner.variant.name] = runner.peak_bytes()
        gc.unfreeze()
    else:
        for v in tqdm(rows, desc="variants", unit="variant"):
            runner = make(v)
            measure(runner, train=True, evaluation=False)
            gc.collect()
            gc.freeze()
            for _ in range(preset["steps"]):
                runner.timed(runner.train_step, runner.train_ms)
            memory[v.name] = runner.peak_bytes()
            measure(runner, train=False, evaluation=True)
            for _ in range(preset["steps"]):
                runner.timed(runner.eval_forward, runner.eval_ms)
            if builds_factors(runner):
                for into in [None] * preset["warmup"] + [runner.construct_ms] * preset["steps"]:
                    runner.timed(lambda r=runner: construct(r), into)
            # Keep the timings, free the model before the next one is built.
            runner.model = runner.call = runner.optimizer = runner.params = None
            runners.append(runner)
            gc.unfreeze()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    memory_note = ("torch.cuda.max_memory_allocated over one training step (everything allocated)."
                   if device.type == "cuda" else
                   "parameters + buffers + optimizer state of the model, plus the peak bytes torch allocated "
                   "during one training step above its start (profiler allocation events).")
    result = dict(
        preset=args.preset,
        command="python scripts/bench_adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        settings=dict(backbone=preset["backbone"] or "tiny", d_model=config.d_model,
                      layers=f"{config.num_layers}+{config.num_decoder_layers}", vocab_size=config.vocab_size,
                      batch=preset["batch"], distinct=preset["distinct"], input_len=preset["input_len"],
                      target_len=preset["target_len"], dtype=preset["dtype"], n_tasks=len(tasks),
                      steps=preset["steps"], warmup=preset["warmup"], interleave=preset["interleave"],
                      adapted_linears=adapted, task_ids=batch["task_ids"].tolist(), python_gc="frozen after building",
                      compile=modes, compile_dynamic=args.compile_dynamic),
        hardware=dict(hardware(device), allocator=allocator), versions=versions(),
        seconds=round(time.perf_counter() - started, 1),
        memory_note=memory_note, rows=summarise(runners, memory, counts, preset["interleave"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {args.out / (stem + '.json')} and .md in {result['seconds']} s")
    if args.profile and preset["interleave"]:
        path = args.out / f"{stem}_profile.md"
        path.write_text(f"One profiled training step per variant, preset `{args.preset}`.\n\n"
                        + profile_table(runners, args.profile))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
