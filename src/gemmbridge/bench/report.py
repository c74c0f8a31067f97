"""The bench's table (rich, or plain text without it) and its JSON document.

JSON schema ``gemmbridge.bench/3`` (``validate`` checks it)::

    schema, card, device ("cpu" | "cuda"), date (ISO 8601, UTC), versions {name: version}, method, notes [str]
    settings   {dtypes, presets, rep_ms, rounds, max_rounds, max_spread_pct, peak_size, seed,
                tolerances {dtype: rel err}}
    candidates [{name, description, available, reason (why not, or null), baseline}]   every candidate
    bandwidth  {bytes_per_s, nbytes, method, cache_bytes (the CPU's last-level cache, or null)}
                                                             device-to-device copy, read + written
    peaks      {dtype: {tflops, measured_tflops, raised_by_a_timed_shape, candidate, shape [M, N, K],
                        by_candidate {name: {status, tflops, reason}}}}
    rows       [{preset, dtype, m, n, k, batch, transpose_a, transpose_b, role, flops, bytes, intensity,
                 roofline_tflops, bound ("compute" | "memory"), in_cache, baseline (name or null),
                 target_pct_of_copy (80 on skinny rows, else null),
                 results {name: {status ("ok" | "wrong" | "error" | "skipped"), reason, rel_err,
                                 ms, ms_runs, spread, stable, tflops, pct_of_roofline, ratio, ratio_stable,
                                 gb_per_s, pct_of_copy, target_met (null without a target), host_us, gpu_us
                                 [, gpu_us_reason: why a CUDA graph could not capture it]}}}]
    environment {thread counts, load_average [start, end], OMP_* / MKL_* / OPENBLAS_* / TF32 / GEMMBRIDGE_*
                 variables that are set}
    summary    {name: {timed_rows, baseline_rows, ratios {baseline: {rows, geomean, min}}, unstable_rows,
                       targets_met, targets_missed, failures [str]}}

``ms`` is the best of ``ms_runs`` (one median per round); ``spread`` is how far the second-best lies above it,
relative; ``stable`` says whether that is within ``max_spread_pct`` (null with one round). ``ratio`` is the
candidate's TFLOP/s over the row's ``baseline``, the framework's matmul (numpy.matmul on the CPU, torch.matmul
where numpy has no BLAS for the dtype or on CUDA); ``ratio_stable`` is false when either cell is unstable, and such
rows are left out of the summary's geo-means, which are kept apart per baseline. ``pct_of_roofline`` is the
TFLOP/s as a percentage of ``min(peak, bandwidth × intensity)``, or of the peak alone for operands that fit in the
CPU's last-level cache (``in_cache``); it is reported as measured, not capped. ``gb_per_s`` is ``bytes`` (the least
a GEMM moves: read A and B, write D) over the time, ``pct_of_copy`` that as a percentage of the copy bandwidth; on a
memory-bound row it equals ``pct_of_roofline``. ``host_us``: host µs per eager call (on the CPU, ``ms`` in µs: the
same measurement); ``gpu_us``: GPU µs per op replayed from a CUDA graph (small shapes; CUDA only, null on the
CPU), shown in parentheses in the table.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from typing import IO, Any

SCHEMA = "gemmbridge.bench/3"
STATUSES = ("ok", "wrong", "error", "skipped")
_TOP = {
    "schema": str, "card": str, "device": str, "date": str, "versions": dict, "method": str, "notes": list,
    "settings": dict, "environment": dict, "candidates": list, "bandwidth": dict, "peaks": dict, "rows": list,
    "summary": dict,
}  # fmt: skip
_ROW = ("preset", "dtype", "m", "n", "k", "batch", "transpose_a", "transpose_b", "role", "flops", "bytes",
        "intensity", "roofline_tflops", "bound", "in_cache", "baseline", "target_pct_of_copy", "results")  # fmt: skip
_OK = ("rel_err", "ms", "ms_runs", "spread", "stable", "tflops", "pct_of_roofline", "ratio", "ratio_stable",
       "gb_per_s", "pct_of_copy", "target_met", "host_us", "gpu_us")  # fmt: skip


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


UNSTABLE = "~"  # before a number from a cell whose best two rounds still differ by more than the spread allowed
PART_HEADS = {"tflops": "TFLOP/s", "pct": "%", "ratio": "ratio", "host": "µs/call", "gpu": "(GPU µs)"}


def cell_parts(r: dict[str, Any], baseline: bool) -> dict[str, str]:
    """A candidate's cell as its parts (keys of ``PART_HEADS``, only those it has); ``baseline``: it is the row's
    baseline, which its ratio column says instead of 1.00×."""
    status = r["status"]
    if status == "skipped":
        return {"tflops": "-"}
    if status != "ok":
        err = r.get("rel_err")
        text = "WRONG" if status == "wrong" else "error"
        return {"tflops": f"{text} {err:.0e}" if isinstance(err, float) and math.isfinite(err) else text}
    parts = {"tflops": f"{UNSTABLE if r.get('stable') is False else ''}{r['tflops']:.4g}"}
    if r.get("target_met") is not None:  # a skinny row: % of the copy bandwidth, target met ✓ or missed ✗
        parts["pct"] = f"{r['pct_of_copy']:.0f}%{'✓' if r['target_met'] else '✗'}"
    elif r.get("pct_of_roofline") is not None:
        parts["pct"] = f"{r['pct_of_roofline']:.0f}%"
    if baseline:
        parts["ratio"] = "base"
    elif r.get("ratio") is not None:
        parts["ratio"] = f"{UNSTABLE if r.get('ratio_stable') is False else ''}{r['ratio']:.2f}×"
    if r.get("host_us") is not None:
        parts["host"] = f"{r['host_us']:.1f}µs"
    if r.get("gpu_us") is not None:
        parts["gpu"] = f"({r['gpu_us']:.3g}µs)"
    return parts


def _rich_cell(r: dict[str, Any], baseline: bool) -> str:
    """One part per line: never wider than its widest number, so that a narrow terminal wraps and cuts nothing."""
    parts = cell_parts(r, baseline)
    if r["status"] == "skipped":
        return "[dim]–[/dim]"
    if r["status"] != "ok":
        return "\n".join(f"[bold red]{part}[/bold red]" for part in parts["tflops"].split())
    if "pct" in parts and r.get("target_met") is None:
        parts["pct"] = f"[dim]{parts['pct']}[/dim]"
    return "\n".join(parts.values())


def _bound(row: dict[str, Any]) -> str:
    limit = row.get("roofline_tflops")
    bound = f"{row['bound']} (in cache)" if row.get("in_cache") else row["bound"]
    return f"{bound} {limit:.4g}" if limit else bound


def _preset(row: dict[str, Any]) -> str:
    return f"{row['preset']} {row['role']}" if row["role"] else row["preset"]


def _shown(doc: dict[str, Any]) -> list[str]:
    """Candidates that ran on at least one row (the others are listed under the table)."""
    return [
        c["name"] for c in doc["candidates"] if any(r["results"][c["name"]]["status"] != "skipped" for r in doc["rows"])
    ]


def _baselines(doc: dict[str, Any]) -> list[str]:
    """Which candidate each row's ratios are to, by dtype, and why where it is not the usual one."""
    usual = next((c["name"] for c in doc["candidates"] if c["baseline"]), None)
    used: dict[str, dict[str, None]] = {}
    why: dict[str, str] = {}
    for row in doc["rows"]:
        base = row["baseline"] or "none"
        used.setdefault(base, {})[row["dtype"]] = None
        if usual and row["baseline"] != usual and row["results"][usual].get("reason"):
            why[base] = f"{usual}: {row['results'][usual]['reason']}"
    parts = [
        f"{'no baseline' if base == 'none' else base} on {', '.join(dtypes)} rows"
        + (f" ({why[base]})" if base in why else "")
        for base, dtypes in used.items()
    ]
    return [f"ratios are to the row's baseline, the framework's matmul: {'; '.join(parts)}"] if parts else []


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _standing(name: str, summary: dict[str, Any], rows: int) -> str:
    text = f"  {name:10} timed on {summary['timed_rows']}/{rows} rows"
    if summary["baseline_rows"]:
        text += f", the baseline on {summary['baseline_rows']}"
    ratios = [
        f"{got['geomean']:.3f}× {base} over {_rows(got['rows'])} (min {got['min']:.3f}×)"
        for base, got in summary["ratios"].items()
    ]
    if ratios:
        text += ", geo-mean " + ", ".join(ratios)
    if summary["unstable_rows"]:
        text += f" ({_rows(summary['unstable_rows'])} left out: unstable)"
    if summary["targets_met"] or summary["targets_missed"]:
        text += f"; skinny target met on {summary['targets_met']}, missed on {summary['targets_missed']}"
    return text


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
    cache = doc["bandwidth"].get("cache_bytes")
    in_cache = sum(bool(row.get("in_cache")) for row in doc["rows"])
    if in_cache and cache:
        lines.append(
            f"{in_cache} row(s) fit in the {cache / 2**20:g} MiB last-level cache: their bound is the peak alone (the "
            "copy bandwidth is measured out of cache)"
        )
    gpu = (
        ", then in parentheses GPU µs per op from a replayed CUDA graph (small shapes)"
        if doc["device"] == "cuda"
        else " (the same measurement as the TFLOP/s); GPU µs per op: not applicable on the CPU"
    )
    lines.append(
        "cells: TFLOP/s, % of the row's bound (min(peak, bandwidth × FLOPs/byte); 'bound' says which applies and its "
        f"TFLOP/s), ratio to the row's baseline ('base' marks it), µs per call (small shapes){gpu}"
    )
    lines += _baselines(doc)
    settings = doc["settings"]
    unstable = sum(r.get("stable") is False for row in doc["rows"] for r in row["results"].values())
    lines.append(
        f"rounds: at least {settings['rounds']}, then more (up to {settings['max_rounds']}) while a candidate's best "
        f"two differ by more than {settings['max_spread_pct']:g} %; {unstable} cell(s) still did ({UNSTABLE}: "
        "unstable, left out of the geo-means)"
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
        lines.append(_standing(name, summary, len(doc["rows"])))
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


def render(
    doc: dict[str, Any], file: IO[str] | None = None, width: int | None = None, rich: bool | None = None
) -> None:
    """Print the table and the lines under it: with rich (when installed) in a terminal, ``width`` columns wide
    (default: the terminal's; cells wrap between their parts, so no number is ever cut); elsewhere (a pipe, a file,
    a log) as plain text, one line per row, columns aligned, nothing wrapped. ``rich``: force one or the other."""
    file = file or sys.stdout
    names = _shown(doc)
    title = f"gemmbridge bench · {doc['card']} · {doc['date']}"
    if rich is None:
        rich = file.isatty()
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        rich = False
    if not rich:
        _render_plain(doc, names, title, file)
        return
    console = Console(file=file, width=width, highlight=False)
    table = Table(show_lines=True)
    table.add_column("dtype shape M×N×K\npreset\nbound TFLOP/s", overflow="fold")  # the one that wraps
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for row in doc["rows"]:
        problem = f"{row['dtype']} {shape_text(row)}\n[dim]{_preset(row)}[/dim]\n{_bound(row)}"
        table.add_row(problem, *(_rich_cell(row["results"][name], name == row["baseline"]) for name in names))
    console.print(title, markup=False)
    console.print(table)
    for line in footer(doc):
        console.print(line, markup=False)


def _render_plain(doc: dict[str, Any], names: list[str], title: str, file: IO[str]) -> None:
    """One line per row: the problem's columns, then per candidate one right-aligned column per part of its cells,
    the candidate's name above its columns."""
    cells = [{name: cell_parts(row["results"][name], name == row["baseline"]) for name in names} for row in doc["rows"]]
    columns = [
        ("", head, [value(row) for row in doc["rows"]], False)
        for head, value in (("dtype", lambda r: r["dtype"]), ("shape M×N×K", shape_text), ("preset", _preset),
                            ("bound TFLOP/s", _bound))
    ]  # fmt: skip
    for name in names:
        kinds = [kind for kind in PART_HEADS if any(kind in cell[name] for cell in cells)]
        columns += [(name if i == 0 else "", PART_HEADS[kind], [cell[name].get(kind, "") for cell in cells], True)
                    for i, kind in enumerate(kinds)]  # fmt: skip
    widths = [max(len(head), *map(len, values)) for _, head, values, _ in columns]
    for i, (group, *_) in enumerate(columns):  # a candidate's name fits over its columns
        span = next((j for j in range(i + 1, len(columns)) if columns[j][0] or not columns[j][3]), len(columns))
        if group and len(group) > sum(widths[i:span]) + 2 * (span - i - 1):
            widths[i] += len(group) - (sum(widths[i:span]) + 2 * (span - i - 1))
    print(title, file=file)
    top = "".join(f"{group:{w + 2}}" if group else " " * (w + 2) for (group, *_), w in zip(columns, widths))
    print(top.rstrip(), file=file)
    lines = [[head for _, head, _, _ in columns]]
    lines += [[values[k] for _, _, values, _ in columns] for k in range(len(doc["rows"]))]
    for cells_of_line in lines:
        text = "  ".join(
            cell.rjust(w) if right else cell.ljust(w) for cell, w, (*_, right) in zip(cells_of_line, widths, columns)
        )
        print(text.rstrip(), file=file)
    print("\n".join(footer(doc)), file=file)
