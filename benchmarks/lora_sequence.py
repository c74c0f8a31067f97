"""A LoRA layer's skinny GEMMs in sequence, in % of the copy bandwidth (docs/kernels.md, "The skinny sequence at copy
speed"): one training step's GEMMs that move bytes rather than flops, back to back, with programmatic dependent
launch (PDL) between the project's kernels, without it, and torch's own sequence.

The sequence (x and dy T × d, A r × d, B d × r, keep = 1 − p, s the scale; the frozen GEMMs x·Wᵀ and dy·W, which
are compute-bound, left out):

- forward: with dropout the seed drawn (``torch.randint``, as the layer draws it); ``xa = (s/keep)·(x ⊙ m)·Aᵀ`` (the
  skinny kernel, the mask inside: role a); ``y = xa·Bᵀ`` (cuBLASLt: write-bound);
- backward: ``g = s·dy·B`` and ``dB = dyᵀ·xa`` from one read of dy (``lora.DyOnce``: two kernels);
  ``dA = (1/keep)·gᵀ·(x ⊙ m)`` (role b); ``t = (1/keep)·(g·A) ⊙ m`` (role d; without dropout cuBLASLt's ``g·A``).

gemmbridge runs with ``set_kernels("on")`` (the launch lane's own kernels wherever they serve), PDL switched by
``launch.pdl`` when the graph is captured. torch's sequence: the same GEMMs with ``torch.mm`` / ``F.linear``, dropout
as its autograd runs it (``torch.native_dropout`` writing ``x ⊙ m`` and the mask, ``native_dropout_backward`` on
``g·A``). Least bytes: x read twice (forward, backward), dy once, y and t written, the narrow operands (the same
floor for every candidate).

Before timing, both gemmbridge candidates run on poisoned outputs and are checked against float64 and against each
other (bit for bit). Timing as ``lora_kernels.py``: ``CALLS`` sequences captured in one CUDA graph cycling through
input sets of at least 160 MiB, the median of 5 replays; rounds after a warm-up to the power cap, candidates in a
rotated order, the median kept; % of copy against the copy bandwidth of the same run. Also the host µs of one launch
of a small masked GEMM with and without PDL (eager, no sync: the launch path's cost).

    python benchmarks/lora_sequence.py --json out.json        # about a minute on an H200
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from lora_kernels import (
    STEADY_BYTES,
    clock_mhz,
    finish,
    header,
    meta,
    print_candidates,
    stream,
    time_all,
    warm_to_power_cap,
)

import gemmbridge as gb
from gemmbridge.backends.cuda.kernels import dropout, launch, lora
from gemmbridge.bench import peaks
from gemmbridge.problem import Operands, describe

SCHEMA = "gemmbridge.lora-sequence/1"
D, R, SCALE = 4096, 16, 2.0
OUTPUTS = ("xa", "y", "g", "dB", "dA", "t")


class Step:
    """The tensors of one step's skinny GEMMs: inputs x, dy, A, B and the seed; outputs xa, y, g, dB, dA, t; torch's
    dropout output and mask. ``dB_dtype`` float32: adapters kept in float32."""

    def __init__(self, t: int, r: int = R, d: int = D, dB_dtype: torch.dtype = torch.bfloat16) -> None:
        def new(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            return torch.randn(*shape, device="cuda").to(dtype)

        self.t, self.r, self.d = t, r, d
        self.x, self.dy, self.A, self.B = new(t, d), new(t, d), new(r, d), new(d, r)
        self.seed = torch.randint(-(2**62), 2**62, (1,), device="cuda")
        self.xa, self.y, self.g, self.dA, self.tt = new(t, r), new(t, d), new(t, r), new(r, d), new(t, d)
        self.dB = new(d, r, dtype=dB_dtype)
        self.xm, self.mask = new(t, d), torch.ones(t, d, dtype=torch.bool, device="cuda")

    def output(self, name: str) -> torch.Tensor:
        return self.tt if name == "t" else getattr(self, name)

    def poison(self) -> None:
        for name in OUTPUTS:
            self.output(name).fill_(float("nan"))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: self.output(name).clone() for name in OUTPUTS}

    def reference(self, p: float, before_dB: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """float64 of each output from the inputs, the mask of the seed now in ``seed``, and the outputs before it
        (xa for y and dB, g for dA and t: each GEMM checked alone); ``before_dB``: dB accumulated onto."""
        kept = dropout.effective_keep(1 - p) if p else 1.0
        x, dy, xa, g, lora_a, lora_b = (v.double() for v in (self.x, self.dy, self.xa, self.g, self.A, self.B))
        t = g @ lora_a / kept
        if p:
            m = torch.from_numpy(dropout.mask(int(self.seed.item()), self.t, self.d, 1 - p)).cuda()
            x, t = x * m, t * m
        db = dy.T @ xa + (0 if before_dB is None else before_dB.double())
        return {"xa": SCALE / kept * x @ lora_a.T, "y": xa @ lora_b.T, "g": SCALE * dy @ lora_b, "dB": db,
                "dA": g.T @ x / kept, "t": t}  # fmt: skip


Sequence = Callable[[Step], None]


def gemmbridge_sequence(step: Step, p: float, accumulate: bool = False, draw: bool = True) -> Sequence:
    """The lane's kernels for steps shaped like ``step`` (``set_kernels("on")`` must hold while it runs):
    ``accumulate``: dB += dyᵀ·xa (beta 1, in place); ``draw``: the seed drawn on the stream first (with dropout)."""
    keep = 1 - p
    kept = dropout.effective_keep(keep) if p else 1.0
    x, g, lora_a = meta(step.x), meta(step.g), meta(step.A)
    dB = meta(step.dB)
    dB_dtype = "float32" if step.dB.dtype == torch.float32 else None
    once = lora.DyOnce(describe(meta(step.dy), meta(step.B)), describe(meta(step.dy), meta(step.xa), transpose_a=True,
                       c=dB if accumulate else None, out=dB, out_dtype=dB_dtype), 0)  # fmt: skip
    workspace = torch.empty(once.workspace_bytes, dtype=torch.uint8, device="cuda")
    if p:
        forward = dropout.MaskedGemm(describe(x, lora_a, transpose_b=True), 0, "a", keep)
        grad_a = dropout.MaskedGemm(describe(g, x, transpose_a=True), 0, "b", keep)
        grad_x = dropout.MaskedGemm(describe(g, lora_a), 0, "d", keep)

    def run(s: Step) -> None:
        if p:
            if draw:
                s.seed.random_(-(2**62), 2**62)
            at = s.seed.data_ptr()
            forward.launch(Operands(s.x.data_ptr(), s.A.data_ptr(), 0, s.xa.data_ptr(), 0), SCALE / kept, 0.0, at,
                           stream())  # fmt: skip
        else:
            gb.matmul(s.x, s.A, transpose_b=True, alpha=SCALE, out=s.xa)
        gb.matmul(s.xa, s.B, transpose_b=True, out=s.y)
        pdy, pdb = s.dy.data_ptr(), s.dB.data_ptr()
        once.launch(Operands(pdy, s.B.data_ptr(), 0, s.g.data_ptr()), Operands(pdy, s.xa.data_ptr(), pdb, pdb),
                    SCALE, 1.0, 1.0 if accumulate else 0.0, workspace.data_ptr(), stream())  # fmt: skip
        if p:
            grad_a.launch(Operands(s.g.data_ptr(), s.x.data_ptr(), 0, s.dA.data_ptr(), 0), 1 / kept, 0.0, at, stream())
            grad_x.launch(Operands(s.g.data_ptr(), s.A.data_ptr(), 0, s.tt.data_ptr(), 0), 1 / kept, 0.0, at, stream())
        else:
            gb.matmul(s.g, s.x, transpose_a=True, out=s.dA)
            gb.matmul(s.g, s.A, out=s.tt)

    run.workspace = workspace  # type: ignore[attr-defined]  # alive as long as the sequence
    return run


def torch_sequence(p: float) -> Sequence:
    """The same GEMMs as torch runs them (module doc)."""

    def run(s: Step) -> None:
        xm = s.x
        if p:
            xm, s.mask = torch.native_dropout(s.x, p, True)
        torch.mm(xm, s.A.t(), out=s.xa).mul_(SCALE)
        torch.mm(s.xa, s.B.t(), out=s.y)
        torch.mm(s.dy, s.B, out=s.g).mul_(SCALE)
        torch.mm(s.dy.t(), s.xa, out=s.dB)
        torch.mm(s.g.t(), xm, out=s.dA)
        torch.mm(s.g, s.A, out=s.tt)
        if p:
            torch.ops.aten.native_dropout_backward(s.tt, s.mask, 1 / (1 - p))

    return run


def least_bytes(t: int, r: int = R, d: int = D, db_itemsize: int = 2) -> int:
    """x read twice, dy once, y and t written (2 bytes each), and the narrow operands: A read twice, B twice, xa
    written and read twice, g written and read twice, dA and dB written."""
    wide, narrow, adapter = t * d * 2, t * r * 2, r * d * 2
    return 5 * wide + 2 * adapter + 2 * adapter + 3 * narrow + 3 * narrow + adapter + d * r * db_itemsize


def with_pdl(run: Sequence, on: bool) -> Sequence:
    """``run`` with PDL switched on or off while it launches (captured into a graph, the graph keeps that kind)."""

    def switched(s: Step) -> None:
        before, launch.pdl = launch.pdl, on
        try:
            run(s)
        finally:
            launch.pdl = before

    return switched


def on_set(run: Sequence, steps: list[Step]) -> Callable[[int], None]:
    """``run`` on input set i (cycling through ``steps``)."""
    return lambda i: run(steps[i % len(steps)])


def host_us_per_launch(on: bool, launches: int = 400) -> float:
    """Host µs of one eager launch of a small masked x·Aᵀ (T = 64), PDL ``on`` or off: the median of 5 batches."""
    step = Step(64)
    gemm = dropout.MaskedGemm(describe(meta(step.x), meta(step.A), transpose_b=True), 0, "a", 0.9)
    ops = Operands(step.x.data_ptr(), step.A.data_ptr(), 0, step.xa.data_ptr(), 0)
    at, handle = step.seed.data_ptr(), stream()
    samples = []
    before, launch.pdl = launch.pdl, on
    try:
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(launches):
                gemm.launch(ops, 1.0, 0.0, at, handle)
            samples.append((time.perf_counter() - start) / launches * 1e6)
            torch.cuda.synchronize()
    finally:
        launch.pdl = before
    return sorted(samples)[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--dropouts", default="0,0.1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gb.set_kernels("on")
    settings = dict(d=D, r=R, scale=SCALE, dtype="bfloat16", rounds=args.rounds, steady_bytes=STEADY_BYTES,
                    kernels="on", candidates=["gemmbridge, PDL", "gemmbridge, no PDL", "torch"])  # fmt: skip
    doc: dict[str, Any] = {
        **header(SCHEMA, settings),
        "host_us_per_launch": {"PDL": host_us_per_launch(True), "no PDL": host_us_per_launch(False)},
        "rows": [],
    }
    copy = doc["copy_bandwidth"]
    print(f"host µs per launch: PDL {doc['host_us_per_launch']['PDL']:.2f}, "
          f"no PDL {doc['host_us_per_launch']['no PDL']:.2f}")  # fmt: skip
    failed = False
    for t in map(int, args.tokens.split(",")):
        steps = [Step(t) for _ in range(max(2, -(-STEADY_BYTES // (4 * t * D * 2))))]
        for p in map(float, args.dropouts.split(",")):
            lane = gemmbridge_sequence(steps[0], p)
            runs = {"gemmbridge, PDL": with_pdl(lane, True), "gemmbridge, no PDL": with_pdl(lane, False),
                    "torch": torch_sequence(p)}  # fmt: skip
            checks: dict[str, float] = {}
            found = {}
            for name in ("gemmbridge, PDL", "gemmbridge, no PDL"):
                steps[0].seed.fill_(20261204)
                steps[0].poison()
                with_pdl(gemmbridge_sequence(steps[0], p, draw=False), name.endswith(", PDL"))(steps[0])
                refs = steps[0].reference(p)
                found[name] = steps[0].snapshot()
                checks[name] = max(((found[name][o].double() - refs[o]).norm() / refs[o].norm()).item() for o in refs)
            same = all(torch.equal(found["gemmbridge, PDL"][o], found["gemmbridge, no PDL"][o]) for o in OUTPUTS)
            failed |= not same or any(error >= 1e-2 for error in checks.values())
            warm_to_power_cap(on_set(runs["gemmbridge, PDL"], steps), len(steps))
            timed = time_all({name: on_set(run, steps) for name, run in runs.items()}, args.rounds)
            moved = least_bytes(t)
            for name, result in timed.items():
                result.update(peaks.bandwidth_use(moved, result["us"] * 1e-3, copy["bytes_per_s"]))
                result["rel_err"] = checks.get(name)
                result["vs_no_pdl"] = result["us"] / timed["gemmbridge, no PDL"]["us"]
            doc["rows"].append({"t": t, "r": R, "d": D, "dropout": p, "bytes": moved, "pdl_equals_serial": same,
                                "clock": clock_mhz(), "candidates": timed})  # fmt: skip
            print(f"T={t} d={D} r={R} dropout {p}: least {moved / 2**20:.0f} MiB, PDL = serial bit for bit: {same} "
                  f"({doc['rows'][-1]['clock']})")  # fmt: skip
            print_candidates(timed, 22, "vs_no_pdl", "no PDL")
        del steps
        torch.cuda.empty_cache()
    return finish(doc, args.json, failed)


if __name__ == "__main__":
    raise SystemExit(main())
