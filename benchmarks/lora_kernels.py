"""The LoRA layer's fused kernels (docs/kernels.md, "Dropout" and "dy read once"): the GEMMs with dropout inside the
skinny kernel, against the kernel without the mask and against cuBLASLt on a materialized ``x ⊙ m`` plus its mask
pass; and the dy-once kernels against two skinny kernels and two cuBLASLt GEMMs.

Per T ∈ {4096, 16384}, r ∈ {16, 64}, d = 4096, bf16, keep 0.9, the three masked roles (``dropout.MaskedGemm``):

- ``a``: ``xa = (1/keep)·(x ⊙ m)·Aᵀ`` — against the unmasked kernel, and cuBLASLt after the mask pass of today's
  unfused op (``bernoulli_`` into a bool mask, ``x ⊙ m`` written);
- ``b``: ``dA = (s/keep)·gᵀ·(x ⊙ m)`` (float32) — against the unmasked kernel, and ``x ⊙ m`` rebuilt then cuBLASLt;
- ``d``: ``t = (s/keep)·(g·A) ⊙ m`` alone (beta 0) and accumulated onto dx (beta 1) — against the write-bound tile
  without the mask, and cuBLASLt's ``g·A`` then ``t ⊙= m``;

and ``dy``: ``g = dy·B`` with ``dB = s·dyᵀ·xa`` (float32) from one read of dy (``lora.DyOnce``; ranks it does not
serve are listed with the reason).

Each fused candidate (the tile the library picks, and neighbouring tiles) is first checked against float64 with the
device's own mask (``fill_mask``). Timing: the steady state of a training step, ``CALLS`` calls
captured in one CUDA graph cycling through input sets of at least 160 MiB, the median of 5 replays; ``ROUNDS``
rounds after a warm-up to the power cap, candidates in a rotated order each round, the median kept. % of copy: the
least bytes the fused role moves over its time, against the copy bandwidth of the same run (the same floor for
every candidate of a role, so the unfused paths show what their extra passes cost).

    python benchmarks/lora_kernels.py --json out.json        # about two minutes on an H200
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

import gemmbridge as gb
from gemmbridge import info
from gemmbridge.backends.cuda.kernels import config as tiles
from gemmbridge.backends.cuda.kernels import device_info, dropout, launch, lora
from gemmbridge.bench import peaks, report, runner, timing
from gemmbridge.problem import Operands, TensorMeta, describe

SCHEMA = "gemmbridge.lora-kernels/1"
D, KEEP, SCALE = 4096, 0.9, 2.0
STEADY_BYTES = 160 * 2**20
CALLS, REPLAYS, ROUNDS = 20, 5, 3
Run = Callable[[int], None]  # one call on input set i
GPU = device_info(0) or (0, "", 0)  # compute capability, architecture, SMs


def meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), f"cuda:{t.device.index}")


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def clock_mhz() -> str:
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        return found.stdout.strip()
    except OSError as error:
        return f"nvidia-smi: {error}"


class Sets:
    """Input sets of one (T, r): x, A, g, dx, dy, B, a seed each, and the outputs every candidate writes."""

    def __init__(self, t: int, r: int) -> None:
        count = max(2, -(-STEADY_BYTES // (t * D * 2)))
        self.t, self.r = t, r
        self.sets = []
        shapes = {"x": (t, D), "A": (r, D), "g": (t, r), "dx": (t, D), "xa": (t, r), "t": (t, D), "xm": (t, D),
                  "dy": (t, D), "B": (D, r)}  # fmt: skip
        for _ in range(count):
            found = {name: torch.randn(*shape, device="cuda").bfloat16() for name, shape in shapes.items()}
            found["seed"] = torch.randint(-(2**62), 2**62, (1,), device="cuda")
            found["dA"], found["dB"] = torch.randn(r, D, device="cuda"), torch.randn(D, r, device="cuda")
            found["mask"] = torch.empty(t, D, dtype=torch.bool, device="cuda")
            self.sets.append(found)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sets[i % len(self.sets)]

    def pointer(self, name: str) -> Callable[[int], int]:
        """The address of ``name`` in set i."""
        return lambda i: self[i][name].data_ptr()


def _kernel(problem: Any, config: tiles.Config, alpha: float, beta: float, operands: Callable[[int], Operands],
            seeded: bool, sets: Sets) -> Run:  # fmt: skip
    plan = launch.KernelPlan(problem, config, 0, GPU[1], config.name, dropout.threshold(KEEP))
    return lambda i: plan.launch(operands(i), alpha, beta, 0, stream(), sets[i]["seed"].data_ptr() if seeded else 0)


Written = dict[str, tuple[str, ...]]  # the outputs each fused candidate writes
Candidates = tuple[dict[str, Run], Written, Callable[[int], dict[str, torch.Tensor]], str]


def candidates(role: str, sets: Sets) -> Candidates:
    """(name → run, name of each fused candidate → the outputs it writes, the reference outputs of set i, the name of
    the tile ``MaskedGemm`` chose); "fused" first."""
    s0, t = sets[0], sets.t
    sms = GPU[2]
    ptr = {name: sets.pointer(name) for name in s0}
    runs: dict[str, Run] = {}
    if role == "a":
        problem, alpha, beta = describe(meta(s0["x"]), meta(s0["A"]), transpose_b=True), 1 / KEEP, 0.0
        ops = lambda i: Operands(ptr["x"](i), ptr["A"](i), 0, ptr["xa"](i), 0)  # noqa: E731
        output = "xa"
    elif role == "b":
        problem = describe(meta(s0["g"]), meta(s0["x"]), transpose_a=True, out_dtype="float32")
        alpha, beta = SCALE / KEEP, 0.0
        ops = lambda i: Operands(ptr["g"](i), ptr["x"](i), 0, ptr["dA"](i), 0)  # noqa: E731
        output = "dA"
    else:
        problem, alpha, beta = describe(meta(s0["g"]), meta(s0["A"])), SCALE / KEEP, 0.0
        ops = lambda i: Operands(ptr["g"](i), ptr["A"](i), 0, ptr["t"](i), 0)  # noqa: E731
        output = "t"
    chosen = dropout.MaskedGemm(problem, 0, role, KEEP)
    runs["fused"] = lambda i: chosen.launch(ops(i), alpha, beta, sets[i]["seed"].data_ptr(), stream())
    written: Written = {"fused": (output,)}
    base = chosen.config
    if role in "ab":
        # the split of K either way, and two blocks an SM (half the pipeline, twice the split): Philox latency hidden
        # by twice the warps
        neighbours = [replace(base, splits=base.splits * 2), replace(base, splits=max(1, base.splits // 2)),
                      replace(base, stages=2, splits=base.splits * 2),
                      replace(base, bk=base.bk // 2, splits=base.splits * 2)]  # fmt: skip
    else:
        neighbours = [replace(base, bm=128, wm=2, wn=4), replace(base, bn=64, wm=2, wn=2),
                      replace(base, bm=128, bn=128, wm=4, wn=2)]  # fmt: skip
    for config in neighbours:
        if config != base and config.valid and tiles.fits_grid(problem, config):
            runs[f"masked {config.name}"] = _kernel(problem, config, alpha, beta, ops, True, sets)
            written[f"masked {config.name}"] = (output,)
    if role == "d":
        dx_problem = describe(meta(s0["g"]), meta(s0["A"]), c=meta(s0["dx"]), out=meta(s0["dx"]))
        accumulate = dropout.MaskedGemm(dx_problem, 0, "d", KEEP)
        runs["masked, accumulated onto dx (beta 1)"] = lambda i: accumulate.launch(
            Operands(ptr["g"](i), ptr["A"](i), ptr["dx"](i), ptr["dx"](i), 0), alpha, 1.0, sets[i]["seed"].data_ptr(),
            stream())  # fmt: skip
    plain = replace(base, mask="") if role == "d" else tiles.configure(problem, sms)
    assert plain is not None
    runs["unmasked kernel"] = _kernel(problem, plain, alpha, beta, ops, False, sets)
    runs.update(unfused(role, sets, alpha))

    def reference(i: int) -> dict[str, torch.Tensor]:
        x, m = sets[i]["x"], sets[i]["mask"]
        dropout.fill_mask(sets[i]["seed"].data_ptr(), m.data_ptr(), t, D, KEEP, stream(), device=0)
        if role == "a":
            return {output: ((x * m).double() @ sets[i]["A"].double().T) * alpha}
        if role == "b":
            return {output: sets[i]["g"].double().T @ (x * m).double() * alpha}
        return {output: (sets[i]["g"].double() @ sets[i]["A"].double()) * m * alpha}

    return runs, written, reference, base.name


def dy_candidates(sets: Sets) -> Candidates:
    """``g = dy·B`` and ``dB = s·dyᵀ·xa``: the dy-once kernels, two skinny kernels, two cuBLASLt GEMMs."""
    s0, sms = sets[0], GPU[2]
    problem_g = describe(meta(s0["dy"]), meta(s0["B"]))
    problem_db = describe(meta(s0["dy"]), meta(s0["xa"]), transpose_a=True, out_dtype="float32")
    fused = lora.DyOnce(problem_g, problem_db, 0)
    workspace = torch.empty(fused.workspace_bytes, dtype=torch.uint8, device="cuda")  # alive while runs are
    ptr = {name: sets.pointer(name) for name in s0}

    def operands(i: int) -> tuple[Operands, Operands]:
        dy = ptr["dy"](i)
        return Operands(dy, ptr["B"](i), 0, ptr["g"](i), 0, 0, 0), Operands(dy, ptr["xa"](i), 0, ptr["dB"](i), 0, 0, 0)

    plans = []
    for problem in (problem_g, problem_db):
        config = tiles.configure(problem, sms)
        assert config is not None
        plans.append(launch.KernelPlan(problem, config, 0, GPU[1], config.name))

    def skinny(i: int) -> None:
        for plan, ops, alpha in zip(plans, operands(i), (1.0, SCALE)):
            plan.launch(ops, alpha, 0.0, 0, stream())

    def cublaslt(i: int) -> None:
        s = sets[i]
        gb.matmul(s["dy"], s["B"], out=s["g"])
        gb.matmul(s["dy"], s["xa"], transpose_a=True, alpha=SCALE, out=s["dB"], out_dtype="float32")

    runs: dict[str, Run] = {"fused": lambda i: fused.launch(*operands(i), 1.0, SCALE, 0.0, workspace.data_ptr(),
                                                            stream()),
                            "two skinny kernels": skinny, "cuBLASLt, two GEMMs": cublaslt}  # fmt: skip

    def reference(i: int) -> dict[str, torch.Tensor]:
        dy = sets[i]["dy"].double()
        return {"g": dy @ sets[i]["B"].double(), "dB": SCALE * dy.T @ sets[i]["xa"].double()}

    written: Written = {"fused": ("g", "dB"), "two skinny kernels": ("g", "dB")}
    return runs, written, reference, fused.config.name


def unfused(role: str, sets: Sets, alpha: float) -> dict[str, Run]:
    """cuBLASLt (``gemmbridge.matmul`` with the kernels off) with today's elementwise passes, and the GEMM alone."""

    def gemm(i: int) -> None:
        s = sets[i]
        if role == "a":
            gb.matmul(s["xm"], s["A"], transpose_b=True, alpha=alpha, out=s["xa"])
        elif role == "b":
            gb.matmul(s["g"], s["xm"], transpose_a=True, alpha=alpha, out=s["dA"], out_dtype="float32")
        else:
            gb.matmul(s["g"], s["A"], alpha=alpha, out=s["t"])

    def with_passes(i: int) -> None:
        s = sets[i]
        if role == "a":
            s["mask"].bernoulli_(KEEP)
        if role in "ab":
            torch.mul(s["x"], s["mask"], out=s["xm"])
        gemm(i)
        if role == "d":
            s["t"].mul_(s["mask"])

    passes = {"a": "bernoulli mask, x ⊙ m, then cuBLASLt", "b": "x ⊙ m, then cuBLASLt",
              "d": "cuBLASLt, then t ⊙= m"}[role]  # fmt: skip
    return {f"unfused: {passes}": with_passes, "cuBLASLt GEMM alone": gemm}


def fused_bytes(role: str, t: int, r: int, accumulate: bool = False) -> int:
    """The least bytes the fused role moves: a reads x and A, writes xa; b reads g and x, writes dA (float32); d reads
    g and A, writes t (or reads and writes dx)."""
    x, lora_a, narrow = t * D * 2, r * D * 2, t * r * 2
    moved = {"a": x + lora_a + narrow, "b": narrow + x + r * D * 4, "d": narrow + lora_a + x * (1 + accumulate),
             "dy": x + lora_a + 2 * narrow + r * D * 4}  # fmt: skip
    return moved[role]


def cycling(run: Run) -> Callable[[], None]:
    """``run`` on input set 0, 1, 2, … call after call."""
    turn = itertools.count()
    return lambda: run(next(turn))


def header(schema: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON's head: schema, card, SM count, date, versions, ``settings``, the copy bandwidth measured now and the
    clock before timing; printed in one line."""
    copy = peaks.copy_bandwidth("cuda", 60.0)
    doc = {
        "schema": schema,
        "card": runner.card_name("cuda"),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**info.versions(), **info.cuda_versions()},
        "settings": settings,
        "copy_bandwidth": copy,
        "clock_before": clock_mhz(),
    }
    print(f"{doc['card']} · copy {copy['bytes_per_s'] / 1e12:.3g} TB/s · {doc['date']} · {doc['clock_before']}")
    return doc


def warm_to_power_cap(run: Run, sets: int, seconds: float = 1.0) -> None:
    """``run`` on input sets 0 … ``sets`` − 1, then a synchronize, again and again for ``seconds``: the clock down to
    the power cap before timing."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        for i in range(sets):
            run(i)
        torch.cuda.synchronize()


def time_all(runs: dict[str, Run], rounds: int) -> dict[str, dict[str, Any]]:
    """Per candidate the median over ``rounds`` of the steady-state µs, the order rotated each round."""
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            samples[name].append(timing.gpu_us_per_op(cycling(runs[name]), "torch", CALLS, REPLAYS))
    return {name: {"us": statistics.median(v), "us_rounds": v} for name, v in samples.items()}


def check(runs: dict[str, Run], written: Written, reference: Callable[[int], dict[str, torch.Tensor]], sets: Sets,
          errors: dict[str, float]) -> bool:  # fmt: skip
    """Each fused candidate on set 0, its outputs poisoned first, against float64: the worst relative error of its
    outputs into ``errors``; True when every one is below 1e-2."""
    for name, outputs in written.items():
        for output in outputs:
            sets[0][output].fill_(float("nan"))
        runs[name](0)
        refs = reference(0)
        errors[name] = max(((sets[0][o].double() - refs[o]).norm() / refs[o].norm()).item() for o in outputs)
    return all(error < 1e-2 for error in errors.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    gb.set_kernels("on")
    settings = dict(d=D, keep=KEEP, scale=SCALE, dtype="bfloat16", calls=CALLS, replays=REPLAYS, rounds=args.rounds,
                    steady_bytes=STEADY_BYTES)  # fmt: skip
    doc: dict[str, Any] = {**header(SCHEMA, settings), "rows": []}
    copy = doc["copy_bandwidth"]
    failed = False
    for t in map(int, args.tokens.split(",")):
        for r in map(int, args.ranks.split(",")):
            sets = Sets(t, r)
            for role in ("a", "b", "d", "dy"):
                gb.set_kernels("on")  # the fused kernels refuse "off"
                try:
                    runs, written, reference, chosen = dy_candidates(sets) if role == "dy" else candidates(role, sets)
                except gb.GemmError as error:
                    doc["rows"].append({"t": t, "r": r, "d": D, "role": role, "skipped": str(error)})
                    print(f"T={t} r={r} role {role}: not served: {error}")
                    continue
                finally:
                    gb.set_kernels("off")  # gemmbridge.matmul: cuBLASLt
                checks: dict[str, float] = {}
                failed |= not check(runs, written, reference, sets, checks)
                warm_to_power_cap(runs["fused"], 20)
                timed = time_all(runs, args.rounds)
                for name, result in timed.items():
                    moved = fused_bytes(role, t, r, accumulate="beta 1" in name)
                    result.update(peaks.bandwidth_use(moved, result["us"] * 1e-3, copy["bytes_per_s"]))
                    result["rel_err"] = checks.get(name)
                    result["vs_fused"] = result["us"] / timed["fused"]["us"]
                doc["rows"].append({"t": t, "r": r, "d": D, "role": role, "bytes": fused_bytes(role, t, r),
                                    "fused_tile": chosen, "clock": clock_mhz(), "candidates": timed})  # fmt: skip
                print(f"T={t} r={r} role {role} (fused: {chosen}; {doc['rows'][-1]['clock']})")
                print_candidates(timed, 58, "vs_fused", "fused")
            del sets
            torch.cuda.empty_cache()
    return finish(doc, args.json, failed)


def print_candidates(timed: dict[str, dict[str, Any]], width: int, ratio: str, against: str) -> None:
    """One line per candidate: µs, % of copy, its ``ratio`` to ``against``, the check's error."""
    for name, result in timed.items():
        err = f" err {result['rel_err']:.1e}" if result["rel_err"] is not None else ""
        print(f"  {name:{width}} {result['us']:8.1f} µs {result['pct_of_copy']:5.1f} % of copy "
              f"{result[ratio]:5.2f}× {against}{err}")  # fmt: skip


def finish(doc: dict[str, Any], path: str | None, failed: bool) -> int:
    """The clock after the run into ``doc``, ``doc`` written to ``path``; the exit status (1: a check failed)."""
    doc["clock_after"] = clock_mhz()
    print(f"clock after: {doc['clock_after']}")
    if path:
        report.write_json(doc, path)
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
