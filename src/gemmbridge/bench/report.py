"""The bench's table (rich, or plain text without it) and its JSON document.

JSON schema ``gemmbridge.bench/2`` (``validate`` checks it)::

    schema, card, device ("cpu" | "cuda"), date (ISO 8601, UTC), versions {name: version}, method, notes [str]
    settings   {dtypes, presets, rep_ms, rounds, peak_size, seed, tolerances {dtype: rel err}}
    candidates [{name, description, available, reason (why not, or null), baseline}]   every candidate
    bandwidth  {bytes_per_s, nbytes, method}                 device-to-device copy, read + written
    peaks      {dtype: {tflops, measured_tflops, raised_by_a_timed_shape, candidate, shape [M, N, K],
                        by_candidate {name: {status, tflops, reason}}}}
    rows       [{preset, dtype, m, n, k, batch, transpose_a, transpose_b, role, flops, bytes, intensity,
                 roofline_tflops, bound ("compute" | "memory"), baseline (name or null),
                 target_pct_of_copy (80 on skinny rows, else null),
                 results {name: {status ("ok" | "wrong" | "error" | "skipped"), reason, rel_err,
                                 ms, ms_runs, tflops, pct_of_roofline, ratio, gb_per_s, pct_of_copy,
                                 target_met (null without a target), host_us, gpu_us
                                 [, gpu_us_reason: why a CUDA graph could not capture it]}}}]
    environment {thread counts, OMP_* / MKL_* / OPENBLAS_* / TF32 / GEMMBRIDGE_* variables that are set}
    summary    {name: {timed_rows, baseline_rows, geomean_ratio, min_ratio, targets_met, targets_missed,
                       failures [str]}}

``ratio`` is the candidate's TFLOP/s over the framework's matmul (``baseline``) on the same row;
``pct_of_roofline`` is its TFLOP/s as a percentage of ``min(peak, bandwidth × intensity)``; it can pass 100
on a memory-bound row whose operands fit in a cache faster than the measured copy bandwidth (the footer says
so), and is reported as measured, not capped. ``gb_per_s`` is ``bytes`` (the least a GEMM moves: read A and
B, write D) over the time, ``pct_of_copy`` that as a percentage of the copy bandwidth; on a memory-bound row
it equals ``pct_of_roofline``. ``host_us``: host µs per eager call; ``gpu_us``: GPU µs per op replayed from
a CUDA graph (small shapes; CUDA only, null on the CPU), shown in parentheses in the table.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from typing import IO, Any

SCHEMA = "gemmbridge.bench/2"
STATUSES = ("ok", "wrong", "error", "skipped")
_TOP = {
    "schema": str, "card": str, "device": str, "date": str, "versions": dict, "method": str, "notes": list,
    "settings": dict, "environment": dict, "candidates": list, "bandwidth": dict, "peaks": dict, "rows": list,
    "summary": dict,
}  # fmt: skip
_ROW = ("preset", "dtype", "m", "n", "k", "batch", "transpose_a", "transpose_b", "role", "flops", "bytes",
        "intensity", "roofline_tflops", "bound", "baseline", "target_pct_of_copy", "results")  # fmt: skip
_OK = ("rel_err", "ms", "ms_runs", "tflops", "pct_of_roofline", "ratio", "gb_per_s", "pct_of_copy", "target_met",
       "host_us", "gpu_us")  # fmt: skip


def validate(doc: dict[str, Any]) -> None:
    """Raise ValueError naming every way ``doc`` departs from the schema."""
    problems = [
        f"{key}: missing or not {kind.__name__}" for key, kind in _TOP.items() if not isinstance(doc.get(key), kind)
    ]
    if problems:
        raise ValueError("bench JSON: " + "; ".join(problems))
    if doc["schema"] != SCHEMA:
        problems.append(f"schema is {doc['schema']!r}, not {SCHEMA!r}")
    names = [c.get("name") for c in doc["candidates"]]
    for cand in doc["candidates"]:
        if cand.get("available") is False and not cand.get("reason"):
            problems.append(f"candidate {cand.get('name')} is unavailable with no reason")
    for i, row in enumerate(doc["rows"]):
        problems += [f"rows[{i}].{key} missing" for key in _ROW if key not in row]
        results = row.get("results", {})
        if sorted(results) != sorted(names):
            problems.append(f"rows[{i}] lists {sorted(results)}, not every candidate {sorted(names)}")
        for name, r in results.items():
            if r.get("status") not in STATUSES:
                problems.append(f"rows[{i}].{name}.status is {r.get('status')!r}")
            elif r["status"] == "ok":
                problems += [f"rows[{i}].{name}.{key} missing" for key in _OK if key not in r]
            elif not r.get("reason"):
                problems.append(f"rows[{i}].{name} is {r['status']} with no reason")
    if problems:
        raise ValueError("bench JSON: " + "; ".join(problems))


def _finite(obj: Any) -> Any:
    """NaN and infinities as null (JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(doc: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(_finite(doc), f, indent=1)
        f.write("\n")


def shape_text(row: dict[str, Any]) -> str:
    """``M×N×K``, ``B× M×N×K`` for a batch, with ``:nt`` (op(a), op(b): row-major or transposed view) unless both
    are row-major."""
    text = f"{row['m']}×{row['n']}×{row['k']}"
    text = text if row["batch"] == 1 else f"{row['batch']}× {text}"
    layout = "nt"[row["transpose_a"]] + "nt"[row["transpose_b"]]
    return text if layout == "nn" else f"{text}:{layout}"


def _cell(r: dict[str, Any], rich: bool) -> str:
    """A candidate's cell: its parts on one line (plain text), or one part per line (rich: never wider than
    its widest number, so that a narrow terminal wraps nothing and cuts nothing)."""
    status = r["status"]
    if status == "skipped":
        return "[dim]–[/dim]" if rich else "-"
    if status != "ok":
        err = r.get("rel_err")
        parts = ["WRONG" if status == "wrong" else "error"]
        parts += [f"{err:.0e}"] if isinstance(err, float) and math.isfinite(err) else []
        return "\n".join(f"[bold red]{part}[/bold red]" for part in parts) if rich else " ".join(parts)
    parts = [f"{r['tflops']:.4g}"]
    if r.get("target_met") is not None:  # a skinny row: % of the copy bandwidth, target met ✓ or missed ✗
        parts.append(f"{r['pct_of_copy']:.0f}%{'✓' if r['target_met'] else '✗'}")
    elif r.get("pct_of_roofline") is not None:
        parts.append(f"[dim]{r['pct_of_roofline']:.0f}%[/dim]" if rich else f"{r['pct_of_roofline']:.0f}%")
    if r.get("ratio") is not None:
        parts.append(f"{r['ratio']:.2f}×")
    if r.get("host_us") is not None:
        parts.append(f"{r['host_us']:.1f}µs")
    if r.get("gpu_us") is not None:
        parts.append(f"({r['gpu_us']:.3g}µs)")
    return "\n".join(parts) if rich else " ".join(parts)


def _bound(row: dict[str, Any]) -> str:
    limit = row.get("roofline_tflops")
    return f"{row['bound']} {limit:.4g}" if limit else row["bound"]


def _preset(row: dict[str, Any]) -> str:
    return f"{row['preset']} {row['role']}" if row["role"] else row["preset"]


def _shown(doc: dict[str, Any]) -> list[str]:
    """Candidates that ran on at least one row (the others are listed under the table)."""
    return [
        c["name"] for c in doc["candidates"] if any(r["results"][c["name"]]["status"] != "skipped" for r in doc["rows"])
    ]


def footer(doc: dict[str, Any]) -> list[str]:
    """The lines under the table: limits, what the columns mean, each candidate's standing."""
    bw = doc["bandwidth"]["bytes_per_s"]
    lines = []
    for label, peak in doc["peaks"].items():
        if peak["tflops"]:
            where = f"{peak['candidate']} {'×'.join(map(str, peak['shape']))}"
            lines.append(f"measured peak {label}: {peak['tflops']:.4g} TFLOP/s ({where})")
        else:
            lines.append(f"measured peak {label}: none (no candidate ran the peak GEMM correctly)")
    lines.append(f"copy bandwidth: {bw / 1e12:.3g} TB/s ({doc['bandwidth']['method']})")
    gpu = (
        ", then in parentheses GPU µs per op from a replayed CUDA graph (small shapes)"
        if doc["device"] == "cuda"
        else "; GPU µs per op: not applicable on the CPU"
    )
    lines.append(
        "cells: TFLOP/s, % of the row's bound (min(peak, bandwidth × FLOPs/byte); 'bound' says which applies and its "
        f"TFLOP/s), ratio to the framework's matmul, host µs per call (small shapes){gpu}"
    )
    targets = [row for row in doc["rows"] if row["target_pct_of_copy"] is not None]
    if targets:
        lines.append(
            f"skinny rows: % of the copy bandwidth (least bytes moved / time), ✓ at or over the "
            f"{targets[0]['target_pct_of_copy']:g} % target, ✗ under it"
        )
    for cand in doc["candidates"]:
        name, summary = cand["name"], doc["summary"][cand["name"]]
        if not cand["available"]:
            lines.append(f"  {name:10} skipped: {cand['reason']}")
            continue
        text = f"  {name:10} timed on {summary['timed_rows']}/{len(doc['rows'])} rows"
        if summary["baseline_rows"]:
            text += f", the framework's matmul (the ratios' baseline) on {summary['baseline_rows']}"
        if summary["geomean_ratio"]:
            text += (
                f", geo-mean {summary['geomean_ratio']:.3f}× the framework's matmul (min {summary['min_ratio']:.3f}×)"
            )
        if summary["targets_met"] or summary["targets_missed"]:
            text += f"; skinny target met on {summary['targets_met']}, missed on {summary['targets_missed']}"
        lines.append(text)
        results = [row["results"][name] for row in doc["rows"]]
        reasons = Counter(r["reason"] for r in results if r["status"] == "skipped")
        for reason, count in sorted(reasons.items()):
            where = "all rows" if count == len(doc["rows"]) else f"{count}/{len(doc['rows'])} rows"
            lines.append(f"  {'':10} skipped on {where}: {reason}")
        uncaptured = Counter(r["gpu_us_reason"] for r in results if r.get("gpu_us_reason"))
        lines += [f"  {'':10} no GPU µs on {count} rows: {reason}" for reason, count in sorted(uncaptured.items())]
        lines += [f"  {'':10} FAILED {failure}" for failure in summary["failures"]]
    over = [r for row in doc["rows"] for r in row["results"].values() if (r.get("pct_of_roofline") or 0) > 100]
    if over:
        lines.append(
            f"{len(over)} cell(s) over 100 % of the bound: faster than the measured copy bandwidth allows, i.e. the "
            "operands fit in a cache (the bandwidth is measured on a copy larger than the caches)"
        )
    lines += [f"note: {note}" for note in doc["notes"]]
    return lines


def render(doc: dict[str, Any], file: IO[str] | None = None, width: int | None = None) -> None:
    """Print the table and the lines under it (rich when installed), ``width`` columns wide (default: the
    terminal's; 200 when not printing to a terminal). Cells wrap between words, so no number is ever cut."""
    file = file or sys.stdout
    names = _shown(doc)
    title = f"gemmbridge bench · {doc['card']} · {doc['date']}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        _render_plain(doc, names, title, file)
        return
    console = Console(file=file, width=width or (None if file.isatty() else 200), highlight=False)
    table = Table(title=title, show_lines=True)
    table.add_column("dtype shape M×N×K\npreset\nbound TFLOP/s", overflow="fold")  # the one that wraps
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for row in doc["rows"]:
        problem = f"{row['dtype']} {shape_text(row)}\n[dim]{_preset(row)}[/dim]\n{_bound(row)}"
        table.add_row(problem, *(_cell(row["results"][name], rich=True) for name in names))
    console.print(table)
    for line in footer(doc):
        console.print(line, markup=False)


def _render_plain(doc: dict[str, Any], names: list[str], title: str, file: IO[str]) -> None:
    head = ["dtype", "shape M×N×K", "preset", "bound TFLOP/s", *names]
    body = [
        [
            row["dtype"],
            shape_text(row),
            _preset(row),
            _bound(row),
            *(_cell(row["results"][n], rich=False) for n in names),
        ]
        for row in doc["rows"]
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    print(title, file=file)
    for cells in [head, *body]:
        print("  ".join(cell.ljust(w) for cell, w in zip(cells, widths)), file=file)
    for line in footer(doc):
        print(line, file=file)
