"""What ``gemmbridge stress`` is asked for (``StressOptions``) and what a run resolves it to (``Plan``).

Options nobody set (None) take the defaults below; a value that cannot run (``--iterations 0``,
``--check-every 0``, a negative count or tolerance) is refused with an ``OptionError``, never replaced.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import OptionError
from ..info import resolve_device
from ..testing import FRAMEWORKS, Framework, Unavailable

ITERATIONS = {"normal": 1000, "short": 200}
MAX_DIM = {"normal": 300, "short": 64}
CHECK_EVERY = {"normal": 10, "short": 1}
# Host RSS on CUDA grows by a few hundred MiB over the first few thousand distinct problems — CUDA's lazy
# kernel loading and the libraries' own per-kernel state (measured on an H200: growth in steps up to about
# 4000 calls, then flat; the same with CUDA_MODULE_LOADING=EAGER minus the module part, and with gemmbridge's
# graph replay off), so the measured run starts after this many calls.
PRIME_CALLS_CUDA = 5000


@dataclass
class StressOptions:
    iterations: int | None = None  # default 1000 (200 with short)
    seed: int | None = None  # None: drawn and printed
    device: str | None = None  # "cpu" or "cuda"; None: cuda when torch sees one
    frameworks: str | None = None  # comma list of numpy, torch, cupy, jax
    max_dim: int | None = None  # default 300 (64 with short)
    short: bool = False
    check_every: int | None = None  # default 10 (1 with short)
    prime_calls: int | None = None  # random calls before the counted ones; default 5000 on cuda, else 0
    problems: int = 2000  # every call is one of this many fixed problems, with fresh data; 0: a new problem each call
    rss_tolerance_mb: float = 8.0
    device_tolerance_mb: float = 64.0
    json_path: str | None = None
    progress: bool = True
    log: Callable[[str], None] = field(default=print)


@dataclass(frozen=True)
class Plan:
    """A run, resolved: every count is set, every name checked."""

    device: str
    frameworks: tuple[str, ...]
    seed: int
    iterations: int
    max_dim: int
    check_every: int
    problems: int
    set_pass: bool  # each problem of the set is made once before the warm-up sample (bounded set, not --short)
    prime_calls: int  # random calls after that pass, before the warm-up

    @property
    def first_counted(self) -> int:
        """Index of the first counted call: after the pass over the set and the priming calls."""
        return 2 * self.problems * self.set_pass + self.prime_calls

    @property
    def rss_unjudged(self) -> str | None:
        """Why host RSS is reported but not judged, or None when it is judged.

        Host RSS is judged only once every per-shape cache has met the whole set of problems (JAX's compiled
        executables, torch's and CUDA's kernels, the plan cache): after the pass over a bounded set, and on
        CUDA after the priming calls as well. Before that, those caches still grow with each new problem.
        """
        if not self.problems:
            return "a new problem every call keeps growing per-shape caches (JAX's executables, CUDA's kernels)"
        if not self.set_pass:
            return "a short run makes no pass over the problem set, so per-shape caches are still growing"
        if self.device == "cuda" and self.prime_calls < PRIME_CALLS_CUDA // 2:
            return f"fewer than {PRIME_CALLS_CUDA // 2} priming calls: CUDA's lazy kernel loading has not settled"
        return None


def default_frameworks(device: str) -> list[str]:
    """numpy and torch on the CPU, torch and cupy on CUDA: those installed and able to run there."""
    found = []
    for name in ("numpy", "torch") if device == "cpu" else ("torch", "cupy"):
        try:
            Framework(name, device)
        except Unavailable:
            continue
        found.append(name)
    return found


def _frameworks(text: str | None, device: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",")] if text else default_frameworks(device)
    if set(names) - set(FRAMEWORKS) or not names:
        raise OptionError(f"--frameworks {text!r}: choose from {', '.join(FRAMEWORKS)}")
    if device == "cuda" and "numpy" in names:
        raise OptionError("numpy arrays live on the CPU; use --device cpu for them")
    if device == "cpu" and "cupy" in names:
        raise OptionError("cupy arrays live on the GPU; use --device cuda for them")
    return tuple(names)


def _at_least(values: dict[str, float], minimum: float) -> None:
    for flag, value in values.items():
        if value < minimum:
            raise OptionError(f"{flag} {value:g}: at least {minimum:g}")


def resolve(options: StressOptions) -> Plan:
    """The run ``options`` ask for; an ``OptionError`` (or ``BackendUnavailableError``) when it cannot run."""
    device = resolve_device(options.device)
    mode = "short" if options.short else "normal"

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    iterations = given(options.iterations, ITERATIONS[mode])
    max_dim = given(options.max_dim, MAX_DIM[mode])
    check_every = given(options.check_every, CHECK_EVERY[mode])
    prime = given(options.prime_calls, PRIME_CALLS_CUDA if device == "cuda" and not options.short else 0)
    _at_least({"--iterations": iterations, "--max-dim": max_dim, "--check-every": check_every}, 1)
    if options.seed is not None:
        _at_least({"--seed": options.seed}, 0)
    _at_least({"--prime-calls": prime, "--problems": options.problems, "--rss-tolerance-mb": options.rss_tolerance_mb,
               "--device-tolerance-mb": options.device_tolerance_mb}, 0)  # fmt: skip
    return Plan(
        device=device,
        frameworks=_frameworks(options.frameworks, device),
        seed=options.seed if options.seed is not None else random.SystemRandom().randrange(2**31),
        iterations=iterations,
        max_dim=max_dim,
        check_every=check_every,
        problems=options.problems,
        set_pass=options.problems > 0 and not options.short,
        prime_calls=prime,
    )
