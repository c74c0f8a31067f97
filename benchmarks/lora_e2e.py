"""End-to-end LoRA fine-tune step of a small Llama: gemmbridge against PEFT, an aten reference and the LoRA-free floor.

The model is ``examples/finetune_lora.py``'s: a ``transformers`` Llama from a config (random weights; hidden 2048,
intermediate 5632, 4 layers, 16 heads, bf16), LoRA r = 16, alpha 32 on q, k, v, o, gate, up, down; a step is the
forward with the loss, the backward, and AdamW over the adapters. Candidates, all in one process, sharing one copy
of the frozen weights:

- ``floor``: the frozen model without LoRA, backward down to the embeddings' output (passed as ``inputs_embeds``
  requiring grad); no optimizer;
- ``peft``: ``get_peft_model``, with fp32 adapters (its default) or bf16 ones (``autocast_adapter_dtype=False``);
- ``aten``: the reference implementation: PEFT's LoRA layers with their forward swapped for ``AtenLoRA``, the fused
  op's GEMM order as an ``autograd.Function`` over aten's ``mm``/``addmm`` (bf16 adapters and dropout 0 only);
- ``bridge``: PEFT through ``gemmbridge.torch.peft.use_gemmbridge`` (fp32 and bf16 adapters);
- ``apply_lora``: ``gemmbridge.torch.apply_lora`` (fp32 and bf16 adapters);

at LoRA dropout 0 and 0.05, eager and under ``torch.compile(model)``. Under compile, only the configurations the
targets name run by default: the floor and the bf16-adapter candidates at dropout 0 (``--compile-all``: every one).

Before timing, every candidate runs one step's forward and backward on one batch with the same nonzero adapters
(a fixed seed per layer; B is not zero, so the LoRA path counts): its loss and adapter gradients must agree with
eager PEFT's (same adapter dtype) within bf16 noise (relative: loss ≤ 1e-2, gradients ≤ 5e-2); dropout is off for
this check (eval mode). Timing: the GPU is first warmed to its power cap (large bf16 matmuls), then rounds: in
each, every candidate runs its warm-up steps and its timed steps (each step ``time.perf_counter`` around the step
and a synchronize), the order rotated from round to round. ms = the median of every timed step of every round;
spread = (slowest − fastest round median) / ms. Peak MiB: the largest allocation of the candidate alone — its
timed steps' peak above what was allocated before them, plus what it holds (the frozen weights, its adapters, the
optimizer's state). SM clock and power: NVML (``torch.cuda.clock_rate``, ``power_draw``), sampled mid-round.
A configuration that fails to build or to run (its check, then one training step) is reported (``failed``) and
left out; the others are timed. The JSON
is rewritten after every round, so a run cut short leaves what it measured; the exit status is 1 when a candidate
failed or disagreed.

    python benchmarks/lora_e2e.py --tokens 4096 --json a.json                   # 4 × 1024, eager and compile
    python benchmarks/lora_e2e.py --tokens 16384 --modes eager --json b.json    # 8 × 2048
    python benchmarks/lora_e2e.py --merge a.json b.json --json benchmarks/results/<date>-<card>-lora-e2e.json
    python benchmarks/lora_e2e.py --quick                                       # a tiny bf16 model on the CPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from finetune_lora import SIZES, TARGETS, make_batch  # noqa: E402  (the example's model sizes and data)

from gemmbridge import info  # noqa: E402
from gemmbridge.torch import apply_lora  # noqa: E402
from gemmbridge.torch.peft import use_gemmbridge  # noqa: E402

CANDIDATES = ("floor", "peft", "aten", "bridge", "apply_lora")
ADAPTERS = ("fp32", "bf16")
MODES = ("eager", "compile")
TOKENS = {4096: (4, 1024), 16384: (8, 2048)}  # tokens a step -> (batch, length), the issue's two sizes
R, ALPHA, LR = 16, 32, 1e-4
TOLERANCE = {"loss": 1e-2, "grads": 5e-2}  # bf16 noise: relative to eager PEFT with the same adapter dtype


# -- the reference implementation: the fused op's GEMM order over aten --------------------------------------------


class AtenLoRA(torch.autograd.Function):
    """``y = x · Wᵀ + b + s · (x · Aᵀ) · Bᵀ`` over aten's ``mm``/``addmm``; ``W`` ``(out, in)``, ``A`` ``(r, in)``,
    ``B`` ``(out, r)``. Forward: ``xs = s · x · Aᵀ``; ``y = xs · Bᵀ (+ b)``; ``y += x · Wᵀ`` in place (beta 1).
    Backward: ``g = s · dy · B``; ``dB = dyᵀ · xs``; ``dA = gᵀ · x``; ``dx = g · A``, then ``dx += dy · W`` in place.
    The scale multiplies the rank-r intermediates only. No dropout."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, s: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xs = torch.mm(x2, a.t()).mul_(s)
        y = torch.mm(xs, b.t()) if bias is None else torch.addmm(bias, xs, b.t())
        y.addmm_(x2, w.t())
        ctx.save_for_backward(x2, w, a, b, xs)
        ctx.s = s
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, w, a, b, xs = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need = ctx.needs_input_grad
        g = torch.mm(dy2, b).mul_(ctx.s)
        dx = torch.mm(g, a).addmm_(dy2, w).view(*dy.shape[:-1], w.shape[1]) if need[0] else None
        dw = torch.mm(dy2.t(), x2) if need[1] else None
        dbias = dy2.sum(0) if need[2] else None
        da = torch.mm(g.t(), x2) if need[3] else None
        db = torch.mm(dy2.t(), xs) if need[4] else None
        return dx, dw, dbias, da, db, None


def _aten_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """A PEFT LoRA ``Linear``'s forward through ``AtenLoRA`` (its one adapter, dropout 0)."""
    (name,) = self.active_adapters
    base = self.base_layer
    return AtenLoRA.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                          float(self.scaling[name]))  # fmt: skip


def use_aten(model: nn.Module) -> list[str]:
    """Give every PEFT LoRA ``Linear`` of ``model`` the ``AtenLoRA`` forward; returns their names. Refused (the
    reference has no dropout, and computes in the activations' dtype) where dropout is not 0 or the adapters'
    dtype is not the base weight's."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    served = []
    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLinear):
            continue
        for adapter in module.lora_A:
            dropout, a = module.lora_dropout[adapter], module.lora_A[adapter].weight
            if not isinstance(dropout, nn.Identity) and dropout.p != 0:
                raise ValueError(f"use_aten: {name} has LoRA dropout {dropout.p}; the aten reference has none")
            if a.dtype != module.base_layer.weight.dtype:
                raise ValueError(f"use_aten: {name}'s adapters are {a.dtype}, its weight "
                                 f"{module.base_layer.weight.dtype}; the aten reference needs them alike")  # fmt: skip
        module.forward = types.MethodType(_aten_forward, module)
        served.append(name)
    return served


# -- candidates ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One timed configuration: a candidate, its adapters' dtype and LoRA dropout (None for the floor), a mode."""

    candidate: str
    adapters: str | None
    dropout: float | None
    mode: str

    @property
    def label(self) -> str:
        parts = [self.candidate, self.adapters or "", "" if self.dropout is None else f"p={self.dropout:g}", self.mode]
        return " ".join(p for p in parts if p)


def matrix(candidates: Iterable[str], adapters: Iterable[str], dropouts: Iterable[float], modes: Iterable[str],
           compile_all: bool) -> list[Config]:  # fmt: skip
    """Every configuration of the selection: aten only with bf16 adapters at dropout 0; under compile, only the
    floor and bf16 adapters at dropout 0 unless ``compile_all``."""
    out = []
    for mode in modes:
        for cand in candidates:
            if cand == "floor":
                out.append(Config("floor", None, None, mode))
                continue
            for dtype in adapters:
                for p in dropouts:
                    if cand == "aten" and (dtype != "bf16" or p != 0):
                        continue
                    if mode == "compile" and not compile_all and (dtype != "bf16" or p != 0):
                        continue
                    out.append(Config(cand, dtype, p, mode))
    return out


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose parameters are ``base``'s own (one copy of the frozen weights for every candidate)."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def adapter_key(name: str) -> str:
    """``<layer>.A`` or ``<layer>.B`` for a PEFT or ``apply_lora`` adapter parameter's name (one name for both)."""
    name = name.removeprefix("base_model.model.")
    for suffix, which in ((".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"), (".lora_a", "A"),
                          (".lora_b", "B")):  # fmt: skip
        if name.endswith(suffix):
            return f"{name.removesuffix(suffix)}.{which}"
    raise ValueError(f"{name} is not a LoRA adapter")


@functools.cache
def adapter_value(key: str, shape: tuple[int, ...]) -> Tensor:
    """The fixed float32 value of adapter ``key``: A ~ N(0, 1 / in), B ~ N(0, 0.01 / r), seeded by the key."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    scale = (1.0 if key.endswith(".A") else 0.1) / shape[1] ** 0.5
    return torch.randn(shape, generator=generator) * scale


def adapters_of(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(key, parameter) of every trainable parameter of ``model`` (its adapters), in key order."""
    return sorted((adapter_key(n), p) for n, p in model.named_parameters() if p.requires_grad)


@dataclass
class Run:
    """A built candidate: its module, what a step calls (the module or its compiled form) and its optimizer."""

    config: Config
    model: nn.Module
    call: Callable[..., Any]
    opt: torch.optim.Optimizer | None

    def loss(self, ids: Tensor) -> Tensor:
        if self.config.candidate == "floor":
            embeds = self.model.get_input_embeddings()(ids).requires_grad_()
            return self.call(inputs_embeds=embeds, labels=ids).loss
        return self.call(input_ids=ids, labels=ids).loss

    def step(self, ids: Tensor) -> None:
        self.loss(ids).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def build(base: nn.Module, config: Config, backend: str) -> Run:
    """``config``'s model on ``base``'s frozen weights, its adapters set to ``adapter_value``."""
    model = shared_copy(base)
    fp32 = config.adapters == "fp32"
    if config.candidate == "apply_lora":
        apply_lora(model, [f"*.{t}" for t in TARGETS], R, ALPHA, config.dropout or 0.0, torch.float32 if fp32 else None)
    elif config.candidate != "floor":
        lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=config.dropout or 0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, lora, autocast_adapter_dtype=fp32)
        if config.candidate == "bridge":
            report = use_gemmbridge(model)
            if report.skipped:
                raise RuntimeError(f"use_gemmbridge left layers to PEFT: {report.skipped}")
        elif config.candidate == "aten":
            use_aten(model)
    with torch.no_grad():
        for key, p in adapters_of(model):
            p.copy_(adapter_value(key, tuple(p.shape)))
    params = [p for _, p in adapters_of(model)]
    call = torch.compile(model, backend=backend) if config.mode == "compile" else model
    return Run(config, model, call, torch.optim.AdamW(params, lr=LR) if params else None)


def one_step_grads(run: Run, ids: Tensor) -> tuple[float, Tensor | None]:
    """The loss of one forward and the adapters' gradients (flat, float32, key order) of its backward, with dropout
    off; the gradients are then cleared (no optimizer step)."""
    run.model.train(not run.config.dropout)  # eval mode where dropout is on: every candidate computes one function
    loss = run.loss(ids)
    loss.backward()
    adapters = adapters_of(run.model)
    grads = torch.cat([p.grad.float().flatten() for _, p in adapters]) if adapters else None
    for _, p in adapters:
        p.grad = None
    run.model.train()
    return loss.item(), grads


def dynamo_counts() -> dict[str, int]:
    """Graphs dynamo has compiled in this process, and graph breaks it met."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def rel(got: Tensor | float, want: Tensor | float) -> float:
    if isinstance(got, Tensor) and isinstance(want, Tensor):
        return ((got.double() - want.double()).norm() / want.double().norm()).item()
    return abs(float(got) - float(want)) / abs(float(want))


def agreement(loss: float, grads: Tensor | None, ref: tuple[float, Tensor | None]) -> dict[str, Any]:
    """How one candidate's first step compares with eager PEFT's (same adapter dtype)."""
    loss_err = rel(loss, ref[0])
    grad_err = rel(grads, ref[1]) if grads is not None and ref[1] is not None else None
    ok = loss_err <= TOLERANCE["loss"] and (grad_err is None or grad_err <= TOLERANCE["grads"])
    return {"loss": loss, "loss_rel_err": loss_err, "grad_rel_err": grad_err, "agrees": ok}


# -- measurement --------------------------------------------------------------------------------------------------


def warm_gpu(seconds: float) -> None:
    """Large bf16 matmuls for ``seconds``: the clock falls from its idle boost to the power cap before timing."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def clock_sample() -> dict[str, float] | str:
    """The SM clock (MHz) and power draw (W) now, from NVML through torch; why not, where it cannot be read."""
    try:
        return {"sm_mhz": float(torch.cuda.clock_rate()), "power_w": torch.cuda.power_draw() / 1e3}
    except Exception as error:  # nvidia-ml-py missing, no NVML: the timings stand without it
        return f"{type(error).__name__}: {error}"


def held_bytes(run: Run) -> int:
    """Bytes of every tensor ``run`` holds between steps: parameters (frozen ones included), buffers, optimizer
    state; each storage once."""
    tensors = [*run.model.parameters(), *run.model.buffers()]
    if run.opt is not None:
        tensors += [t for state in run.opt.state.values() for t in state.values() if isinstance(t, Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@dataclass
class Timing:
    """What the rounds measured of one run."""

    steps_ms: list[list[float]]  # per round, each timed step
    peak_bytes: int = 0  # the timed steps' largest allocation above what was allocated before them
    clocks: list[dict[str, float] | str] = field(default_factory=list)  # one sample per round


def time_round(run: Run, batches: list[Tensor], warmup: int, steps: int, timing: Timing, cuda: bool) -> None:
    """``warmup`` steps, then ``steps`` timed ones (a synchronize ending each); the clock sampled halfway."""
    for i in range(warmup):
        run.step(batches[i % len(batches)])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        run.step(batches[i % len(batches)])
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if cuda and i == steps // 2:
            timing.clocks.append(clock_sample())
    if cuda:
        timing.peak_bytes = max(timing.peak_bytes, torch.cuda.max_memory_allocated() - before)
    timing.steps_ms.append(times)


def rotated(items: list[Any], round_index: int, rounds: int) -> list[Any]:
    """``items`` starting ``round_index / rounds`` of the way along: each round a different one goes first."""
    k = round_index * len(items) // max(rounds, 1)
    return items[k:] + items[:k]


# -- the table and the targets ------------------------------------------------------------------------------------


def row_of(run: Run, timing: Timing, tokens: tuple[int, int], check: dict[str, Any], cuda: bool) -> dict[str, Any]:
    every = [t for times in timing.steps_ms for t in times]
    ms = statistics.median(every)
    rounds_ms = [statistics.median(times) for times in timing.steps_ms]
    clocks = [c for c in timing.clocks if isinstance(c, dict)]
    return {
        "tokens": tokens[0] * tokens[1], "batch": tokens[0], "length": tokens[1], **asdict(run.config), "ms": ms,
        "rounds_ms": rounds_ms, "spread_pct": 100 * (max(rounds_ms) - min(rounds_ms)) / ms, "steps": len(every),
        "peak_mib": (timing.peak_bytes + held_bytes(run)) / 2**20 if cuda else None,
        "sm_mhz": statistics.median(c["sm_mhz"] for c in clocks) if clocks else None,
        "power_w": statistics.median(c["power_w"] for c in clocks) if clocks else None,
        "clock_note": next((c for c in timing.clocks if isinstance(c, str)), None),
        "check": check,
    }  # fmt: skip


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratios(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """``row``'s ms over the floor's, PEFT's (same adapters and dropout) and aten's, in its tokens and mode."""
    where = {"tokens": row["tokens"], "mode": row["mode"]}
    others = {"vs_floor": find(rows, **where, candidate="floor"), "vs_peft": None, "vs_aten": None}
    if row["adapters"] is not None:
        others["vs_peft"] = find(rows, **where, candidate="peft", adapters=row["adapters"], dropout=row["dropout"])
        others["vs_aten"] = find(rows, **where, candidate="aten")
    return {key: None if other is None else row["ms"] / other["ms"] for key, other in others.items()}


# (tokens, mode, kind, what, ratio key, limit, dropouts, adapter dtypes): the issue's targets for the fused paths
TARGETS_TABLE = [
    (4096, "eager", "target", "≤ the aten Function's step", "vs_aten", 1.0, (0.0,), ("bf16",)),
    (4096, "eager", "target", "≤ 0.85× PEFT's step, same adapters", "vs_peft", 0.85, (0.0, 0.05), ADAPTERS),
    (4096, "eager", "goal", "≤ 1.15× the floor", "vs_floor", 1.15, (0.0,), ADAPTERS),
    (4096, "compile", "target", "≤ PEFT's compiled step (bf16 adapters)", "vs_peft", 1.0, (0.0,), ("bf16",)),
    (4096, "compile", "goal", "≤ 1.15× the compiled floor", "vs_floor", 1.15, (0.0,), ("bf16",)),
    (16384, "eager", "target", "≤ 1.10× the floor", "vs_floor", 1.10, (0.0,), ADAPTERS),
]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of the table that ``rows`` measure, for the bridge and ``apply_lora``, met or not."""
    out = []
    for tokens, mode, kind, what, key, limit, dropouts, dtypes in TARGETS_TABLE:
        for cand in ("bridge", "apply_lora"):
            for dtype in dtypes:
                for p in dropouts:
                    row = find(rows, tokens=tokens, mode=mode, candidate=cand, adapters=dtype, dropout=p)
                    value = ratios(row, rows)[key] if row is not None else None
                    if value is not None:
                        out.append({"tokens": tokens, "mode": mode, "candidate": cand, "adapters": dtype,
                                    "dropout": p, "kind": kind, "target": what, "ratio": key, "value": value,
                                    "limit": limit, "met": value <= limit})  # fmt: skip
    return out


def fmt(value: float | None, spec: str, width: int = 0) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def print_table(doc: dict[str, Any]) -> None:
    rows = doc["rows"]
    for tokens, mode in dict.fromkeys((r["tokens"], r["mode"]) for r in rows):
        mine = [r for r in rows if r["tokens"] == tokens and r["mode"] == mode]
        print(f"\n{tokens} tokens ({mine[0]['batch']} × {mine[0]['length']}), {mode}, {doc['card']}")
        print(f"{'candidate':11} {'adapters':8} {'dropout':7} {'ms':>8} {'spread':>7} {'× floor':>8} {'vs PEFT':>8} "
              f"{'vs aten':>8} {'peak MiB':>9} {'SM MHz':>7} {'W':>5}  check")  # fmt: skip
        for r in mine:
            q = ratios(r, rows)
            c = r["check"]
            check = ("frozen" if c.get("agrees") is None else ("ok" if c["agrees"] else "DISAGREES") +
                     f" (loss {c['loss_rel_err']:.1e}, grads {fmt(c['grad_rel_err'], '.1e')})")  # fmt: skip
            if "graphs" in c:
                check += f", {c['graphs']} graphs, {c['graph_breaks']} breaks"
            print(f"{r['candidate']:11} {r['adapters'] or '-':8} {fmt(r['dropout'], 'g', 7)} {r['ms']:8.2f} "
                  f"{r['spread_pct']:6.1f}% {fmt(q['vs_floor'], '.3f', 8)} {fmt(q['vs_peft'], '.3f', 8)} "
                  f"{fmt(q['vs_aten'], '.3f', 8)} {fmt(r['peak_mib'], '.0f', 9)} {fmt(r['sm_mhz'], '.0f', 7)} "
                  f"{fmt(r['power_w'], '.0f', 5)}  {check}")  # fmt: skip
    for failed in doc.get("failed", []):
        print(f"FAILED (not timed): {failed['label']}: {failed['error']}")
    if doc["targets"]:
        print("\ntargets (the bridge and apply_lora):")
    for t in doc["targets"]:
        met = "met    " if t["met"] else "NOT MET"
        print(f"  {met} {t['kind']:6} {t['tokens']:5} {t['mode']:7} {t['candidate']:10} {t['adapters']} "
              f"p={t['dropout']:g}: {t['ratio']} {t['value']:.3f} {t['target']}")  # fmt: skip


# -- one process per token count, and merging their files ---------------------------------------------------------


def parse_tokens(text: str) -> tuple[int, int]:
    """``4096`` / ``16384`` (the issue's 4 × 1024 and 8 × 2048) or ``BxL``: (batch, length)."""
    if "x" in text:
        batch, length = (int(v) for v in text.split("x"))
        return batch, length
    if int(text) not in TOKENS:
        raise argparse.ArgumentTypeError(f"--tokens {text}: give {' or '.join(map(str, TOKENS))}, or BxL")
    return TOKENS[int(text)]


def names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = text.split(",")
        unknown = [v for v in chosen if v not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: choose from {', '.join(allowed)}")
        return chosen

    return parse


def versions() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except OSError:
        commit = None
    return {**info.versions(), **info.cuda_versions(), "peft": peft.__version__,
            "transformers": transformers.__version__, "commit": commit}  # fmt: skip


def merge(paths: list[str]) -> dict[str, Any]:
    """One document from several runs' (one per token count, say) of one card: rows and checks joined."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    cards = {d["card"] for d in docs}
    if len(cards) != 1:
        raise SystemExit(f"--merge: the files are from different cards: {sorted(cards)}")
    rows = [r for d in docs for r in d["rows"]]
    runs = [{"file": p, "date": d["date"], "config": d["config"]} for p, d in zip(paths, docs)]
    failed = [f for d in docs for f in d.get("failed", [])]
    return {**docs[0], "runs": runs, "rows": rows, "targets": targets(rows), "failed": failed}


METHOD = (
    "ms: median of every timed step (forward with loss, backward, AdamW; perf_counter around each step and a "
    "synchronize) of every round; rounds: every candidate in turn, warm-up steps then timed ones, the order rotated "
    "each round, after the GPU was warmed to its power cap; spread_pct: (slowest - fastest round median) / ms; "
    "peak_mib: the timed steps' largest allocation above what was allocated before them plus what the candidate "
    "holds (frozen weights, adapters, optimizer state), i.e. the candidate alone; sm_mhz, power_w: NVML, median of "
    "one sample per round (clock_note: why not, where NVML could not be read); gemmbridge's cuBLASLt workspace "
    "comes from CUDA's own pool, outside torch's statistics; check: one step's loss and adapter gradients against "
    "eager PEFT's with the same adapter dtype (dropout off), relative"
)


def build_all(base: nn.Module, configs: list[Config], check_ids: Tensor, backend: str) -> tuple[list[Run], dict]:
    """Every configuration built, checked against eager PEFT (same adapter dtype) and run for one training step; one
    that fails is reported (its check holds the error) and left out of the timing, so the others still run."""
    dtypes = sorted({c.adapters for c in configs if c.adapters})
    refs = {d: one_step_grads(build(base, Config("peft", d, 0.0, "eager"), backend), check_ids) for d in dtypes}
    runs, checks = [], {}
    for c in configs:
        t0, compiled_before = time.perf_counter(), dynamo_counts()
        try:
            run = build(base, c, backend)
            loss, grads = one_step_grads(run, check_ids)
            run.step(check_ids)  # a training step too: dropout on, the optimizer
        except Exception as error:  # reported: the other candidates' numbers stand
            checks[c] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}", "agrees": False}
            print(f"FAILED {c.label}: {checks[c]['error']}", flush=True)
            continue
        check = {"loss": loss} if c.adapters is None else agreement(loss, grads, refs[c.adapters])
        if c.mode == "compile":  # what its first call compiled: more than one graph means graph breaks
            check |= {key: n - compiled_before[key] for key, n in dynamo_counts().items()}
        checks[c] = check
        runs.append(run)
        print(f"built {c.label:28} in {time.perf_counter() - t0:6.1f} s: {check}", flush=True)
    return runs, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=parse_tokens, help="4096 (4 × 1024, the default), 16384 (8 × 2048) or BxL")
    parser.add_argument("--modes", type=names(MODES), default=list(MODES))
    parser.add_argument("--candidates", type=names(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--adapters", type=names(ADAPTERS), default=list(ADAPTERS))
    parser.add_argument("--dropout", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.05])
    parser.add_argument("--compile-all", action="store_true", help="compile every configuration, not the targets'")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--steps", type=int, help="timed steps per candidate and round (15; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per candidate and round, ≥ 1 (3; --quick: 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-gpu", type=float, default=2.0, help="seconds of large matmuls before timing")
    parser.add_argument("--quick", action="store_true", help="a tiny bf16 model on the CPU, 2 × 32 tokens, 3 steps")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join these runs' files into --json; no run")
    parser.add_argument("--json", help="where to write the figures (rewritten after every round)")
    args = parser.parse_args()
    if args.merge:
        doc = merge(args.merge)
        print_table(doc)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1))
        return
    if args.steps is None:
        args.steps = 3 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if min(args.steps, args.warmup, args.rounds) < 1 or any(not 0 <= p < 1 for p in args.dropout):
        parser.error("--steps, --warmup and --rounds must be ≥ 1, --dropout values in [0, 1)")
    tokens = args.tokens or ((2, 32) if args.quick else TOKENS[4096])
    size = {k: v for k, v in SIZES["small" if args.quick else "full"].items() if k not in ("batch", "length", "steps")}
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    cuda = device.type == "cuda"
    torch._dynamo.config.cache_size_limit = 64  # candidates share forward code objects: one graph each, no fallback

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_key_value_heads=size["num_attention_heads"], max_position_embeddings=2048,
                                      use_cache=False, **size)  # fmt: skip
    with device:
        base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    generator = torch.Generator().manual_seed(2)
    batches = [make_batch(*tokens, generator).to(device) for _ in range(4)]
    check_ids = make_batch(*tokens, generator).to(device)
    configs = matrix(args.candidates, args.adapters, args.dropout, args.modes, args.compile_all)
    runs, checks = build_all(base, configs, check_ids, args.compile_backend)
    bad = [c.label for c, check in checks.items() if check.get("agrees") is False]
    print("same function: " + (f"DISAGREE with PEFT or FAILED: {', '.join(bad)}" if bad else
          "every candidate's loss and adapter gradients agree with eager PEFT's (same adapter dtype) within "
          f"{TOLERANCE} (relative); the floor is the frozen model"))  # fmt: skip
    if "aten" in args.candidates:
        print("aten: bf16 adapters and dropout 0 only")

    doc = {
        "schema": "gemmbridge.lora-e2e/1",
        "card": torch.cuda.get_device_name(0) if cuda else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": {**size, "batch": tokens[0], "length": tokens[1], "r": R, "alpha": ALPHA, "lr": LR,
                   "dtype": "bfloat16", "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                   "warm_gpu_s": args.warm_gpu if cuda else 0, "compile_backend": args.compile_backend,
                   "tolerance": TOLERANCE},
        "method": METHOD,
        "failed": [{"label": c.label, **asdict(c), "error": check["error"]} for c, check in checks.items()
                   if "error" in check],
    }  # fmt: skip
    gc.collect()
    if cuda:
        warm_gpu(args.warm_gpu)
    timings = {r.config: Timing([]) for r in runs}
    for i in range(args.rounds):
        for run in rotated(runs, i, args.rounds):
            time_round(run, batches, args.warmup, args.steps, timings[run.config], cuda)
        print(f"round {i + 1}: " + ", ".join(f"{r.config.label} {statistics.median(timings[r.config].steps_ms[-1]):.2f}"
                                             for r in runs), flush=True)  # fmt: skip
        doc["rows"] = [row_of(r, timings[r.config], tokens, checks[r.config], cuda) for r in runs]
        doc["targets"] = targets(doc["rows"])
        doc["rounds_done"] = i + 1
        if args.json:  # after every round: a run cut short still leaves its figures
            Path(args.json).write_text(json.dumps(doc, indent=1))
    print_table(doc)
    if args.json:
        print(f"wrote {args.json}")
    if bad:
        sys.exit(f"candidates disagree with PEFT or failed: {', '.join(bad)}")


if __name__ == "__main__":
    main()
