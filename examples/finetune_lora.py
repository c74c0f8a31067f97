"""Fine-tune a small Llama with LoRA — through PEFT, and through PEFT with gemmbridge's bridge — and compare.

The model is a ``transformers`` Llama built from a config (random weights, no downloads) and the data is generated
here: sequences of sums ``a+b=c;``. LoRA (r = 16, alpha = 32) goes on every linear layer of the blocks (q, k, v, o,
gate, up, down) and AdamW (gradients clipped to norm 1) trains the adapters. Runs, each from the same weights on
the same batches:

- ``frozen (floor)``: no LoRA, every weight frozen, backward down to the embeddings — what LoRA's cost is measured
  against;
- ``peft defaults``: ``get_peft_model`` as it comes (adapters upcast to float32);
- ``peft bf16 adapters``: ``autocast_adapter_dtype=False``;
- ``gemmbridge bridge``: ``peft defaults`` plus ``gemmbridge.torch.peft.use_gemmbridge(model)``;
- ``gemmbridge bridge, bf16 adapters``: ``peft bf16 adapters`` plus the bridge.

Without a GPU the example runs the small configuration on the CPU (``--small``: float32, where the two adapter
dtypes are the same run, and says so), on one thread: its ops are too small to gain from more, and on a busy 2-core
host two threads made the same run 4–12× slower in one process than in the next. Each run is first warmed up for
three steps (discarded); then the runs are timed in rounds, A B C D E, at least ``--rounds`` of them, and more (up
to 6 in all) while a run's best two median step times differ by more than 5 % (``gemmbridge.bench.timing.settle``; a
run that never settles is marked ~ as unstable). Prints each run's loss curve, best median step time and its spread,
the step time over the floor's, peak memory (CUDA: the largest allocation of the run, weights included) and the
largest gap between the bridge's loss curve and PEFT's; saves a plot (matplotlib, looked for first) and, with
``--json``, the figures. Needs torch, peft and transformers (``pip install 'gemmbridge[peft]'``); the CPU run takes
a few minutes on 2 cores.

    python examples/finetune_lora.py                 # the GPU: hidden 2048, 4 layers, batch 4 × 1024, bf16
    python examples/finetune_lora.py --small         # a tiny float32 model on the CPU (the default without a GPU)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import statistics
import sys
import time
from typing import Any

import torch

try:
    import peft
    import transformers
except ImportError as missing:
    sys.exit(f"examples/finetune_lora.py needs peft and transformers ({missing}): pip install 'gemmbridge[peft]'")

from gemmbridge.bench.timing import MAX_ROUNDS, MAX_SPREAD, settle, spread
from gemmbridge.torch.peft import use_gemmbridge

VOCAB = "0123456789+=;"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "full": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "vocab_size": 32000,
        "batch": 4,
        "length": 1024,
        "steps": 40,
    },
    "small": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 64,
        "batch": 2,
        "length": 32,
        "steps": 30,
    },
}
RUNS = [
    "frozen (floor)",
    "peft defaults",
    "peft bf16 adapters",
    "gemmbridge bridge",
    "gemmbridge bridge, bf16 adapters",
]


def make_batch(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` token sequences of concatenated sums ``a+b=c;`` (token i is ``VOCAB[i]``)."""
    rows = []
    for _ in range(n):
        text = ""
        while len(text) < length:
            a, b = (int(v) for v in torch.randint(0, 100, (2,), generator=generator))
            text += f"{a}+{b}={a + b};"
        rows.append([VOCAB.index(ch) for ch in text[:length]])
    return torch.tensor(rows)


def build(base: torch.nn.Module, run: str, r: int, device: torch.device) -> tuple[torch.nn.Module, list, Any]:
    """(model on ``device``, the parameters AdamW trains, the bridge's report or None) for one run."""
    model = copy.deepcopy(base).to(device)
    if run == "frozen (floor)":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # the embeddings' output requires grad: backward runs down to them
        return model, [], None
    torch.manual_seed(1)  # every run's adapters start alike
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype="bf16" not in run)
    report = use_gemmbridge(model) if run.startswith("gemmbridge") else None
    return model, [p for p in model.parameters() if p.requires_grad], report


def train(model: torch.nn.Module, params: list, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Loss per step, median step time (after the first quarter) and peak memory of one run."""
    generator = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(params, lr=args.lr) if params else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(args.steps):
        tokens = make_batch(args.batch, args.length, generator).to(device)
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # as fine-tuning recipes do; it keeps bf16 runs from spiking
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"losses": losses, "step_ms": statistics.median(times[len(times) // 4 :]), "peak_mib": peak}


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, r in results.items():
        if name != "frozen (floor)":
            curves.plot(r["losses"], label=name, linewidth=3 if name.startswith("gemmbridge") else 1.5, alpha=0.8)
    curves.set(xlabel="step", ylabel="cross-entropy", title="loss curves")
    curves.legend()
    names = list(results)
    bars.barh(names, [results[n]["step_ms"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        peak = results[n]["peak_mib"]
        label = f" {results[n]['step_ms']:.1f} ms" + (f", {peak:.0f} MiB" if peak is not None else "")
        bars.text(results[n]["step_ms"], i, label, va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set(xlabel="median step (ms)", title="step time (and peak memory)")
    bars.set_xlim(0, 1.45 * max(results[n]["step_ms"] for n in names))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked before any work (matplotlib for the plot first)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--small", action="store_true", help="a tiny float32 model on the CPU (the default without a GPU)"
    )
    parser.add_argument("--steps", type=int, help="steps per run (default 40; 30 small)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of every run, at least (2)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--plot", default="finetune_lora.png", help="where to save the plot ('' for none)")
    parser.add_argument("--json", help="where to save the figures")
    args = parser.parse_args(argv)
    for flag in ("steps", "rounds", "r"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: at least 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib (or gemmbridge's [bench] extra); --plot '' "
                         "runs without a plot")  # fmt: skip
    return args


def noise_pair(dtype: torch.dtype) -> str:
    """The label of PEFT's two adapter dtypes against each other: bf16 rounding on the GPU, the same run on the CPU."""
    if dtype == torch.float32:
        return "peft bf16 adapters vs peft defaults (in float32 the same run: 0 expected)"
    return "peft bf16 adapters vs peft defaults (bf16 noise)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        print("no CUDA GPU: the small configuration on the CPU (--small)")
        args.small = True
    size = dict(SIZES["small" if args.small else "full"])
    args.batch, args.length = size.pop("batch"), size.pop("length")
    args.steps = args.steps or size.pop("steps")
    size.pop("steps", None)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":  # the small model's ops gain nothing from threads, which a busy host makes wait
        torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_key_value_heads=size["num_attention_heads"], max_position_embeddings=2048,
                                      **size)  # fmt: skip
    base = transformers.LlamaForCausalLM(config).to(dtype)
    results: dict[str, dict[str, Any]] = {}

    def measure(run: str, steps: argparse.Namespace = args) -> float:
        """One run from the same weights: trained, its figures kept (losses and peak from its first round)."""
        model, params, report = build(base, run, args.r, device)
        if report is not None and run not in results and steps is args:
            print(f"{run}: {len(report.served)} LoRA layers on gemmbridge, {len(report.skipped)} left to PEFT")
        got = train(model, params, steps, device)
        del model, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if steps is args:
            kept = results.setdefault(run, got)
            if got["peak_mib"] is not None:
                kept["peak_mib"] = max(kept["peak_mib"], got["peak_mib"])
        return float(got["step_ms"])

    warm_up = argparse.Namespace(**{**vars(args), "steps": 3})
    for run in RUNS:  # a short round first, discarded: lazy loading, kernels met once, thread pools
        measure(run, warm_up)
    for run, times in settle(RUNS, measure, args.rounds, max(args.rounds, MAX_ROUNDS), MAX_SPREAD).items():
        results[run].update(step_ms=min(times), step_ms_runs=times, spread=spread(times))
        results[run]["stable"] = None if results[run]["spread"] is None else results[run]["spread"] <= MAX_SPREAD
    floor = results["frozen (floor)"]["step_ms"]
    cuda = device.type == "cuda"
    print(f"\n{'run':34} {'loss first → last':>20} {'step ms':>9} {'spread':>7} {'× floor':>8}"
          + (f" {'peak MiB':>9}" if cuda else ""))  # fmt: skip
    for run, r in results.items():
        step = ("~" if r["stable"] is False else "") + f"{r['step_ms']:.2f}"
        spread_text = "" if r["spread"] is None else f"{100 * r['spread']:.0f}%"
        print(f"{run:34} {r['losses'][0]:9.4f} → {r['losses'][-1]:7.4f} {step:>9} {spread_text:>7} "
              f"{r['step_ms'] / floor:8.3f}" + (f" {r['peak_mib']:9.0f}" if cuda else ""))  # fmt: skip
    print(f"step ms: the best of a run's rounds' median steps (at least {args.rounds} rounds); spread: how far the "
          f"second best lies above it; ~: still over {100 * MAX_SPREAD:g} % after {MAX_ROUNDS} rounds (unstable)"
          + ("" if cuda else "; peak memory: measured on CUDA only"))  # fmt: skip
    pairs = {  # the last pair is the noise floor: PEFT against itself with the other adapter dtype
        "gemmbridge bridge vs peft defaults": ("gemmbridge bridge", "peft defaults"),
        "gemmbridge bridge, bf16 adapters vs peft bf16 adapters": ("gemmbridge bridge, bf16 adapters",
                                                                   "peft bf16 adapters"),
        noise_pair(dtype): ("peft bf16 adapters", "peft defaults"),
    }  # fmt: skip
    gaps = {
        name: max(abs(a - b) for a, b in zip(results[one]["losses"], results[other]["losses"]))
        for name, (one, other) in pairs.items()
    }
    for name, gap in gaps.items():
        print(f"largest loss gap, {name}: {gap:.4f}")
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    shape = (f"hidden {size['hidden_size']}, {size['num_hidden_layers']} layers, batch {args.batch} × {args.length}, "
             f"{str(dtype).removeprefix('torch.')}, r = {args.r}")  # fmt: skip
    if args.plot:
        plot(results, args.plot, f"LoRA fine-tune of a small Llama on {where}: {shape}")
        print(f"wrote {args.plot}")
    if args.json:
        doc = {
            "schema": "gemmbridge.finetune-lora/2",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": where,
            "versions": {
                "torch": torch.__version__,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
            },
            "config": {
                **size,
                "batch": args.batch,
                "length": args.length,
                "steps": args.steps,
                "r": args.r,
                "lr": args.lr,
                "dtype": str(dtype),
            },
            "method": "median step (forward, backward, AdamW) over the last three quarters of the steps, per round; "
            f"rounds A B C D E until each run's best two medians agree within {100 * MAX_SPREAD:g} % (or "
            f"{MAX_ROUNDS} rounds), the best kept; peak = torch.cuda.max_memory_allocated over the run, weights "
            "included (CUDA only)",
            "runs": {run: {**r, "vs_floor": r["step_ms"] / floor} for run, r in results.items()},
            "loss_gaps": gaps,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
