"""``examples/train_transformer.py``: its options are checked before any training (matplotlib for the plot first),
it runs, and it says where the gemmbridge and torch loss curves part."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_transformer.py"


def run_example(*args: str, hide_matplotlib: bool = False) -> subprocess.CompletedProcess:
    hide = "sys.modules['matplotlib'] = None; " if hide_matplotlib else ""
    code = f"import runpy, sys; {hide}sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, str(EXAMPLE), *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_a_plot_without_matplotlib_is_refused_before_training():
    done = run_example("--steps", "200", hide_matplotlib=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.rstrip().endswith("error: --plot needs matplotlib: pip install matplotlib (or gemmbridge's "
                                         "[bench] extra); --plot '' trains without a plot")  # fmt: skip
    done = run_example("--steps", "0", "--plot", "")
    assert done.returncode == 2 and done.stderr.rstrip().endswith("error: --steps 0: at least 1")


def test_it_trains_both_models_and_says_where_the_curves_part(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "losses.png"
    done = run_example("--steps", "2", "--batch", "4", "--length", "16", "--plot", str(plot))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "largest difference between the two loss curves: " in done.stdout
    assert "within 0.01 at every step (float32)" in done.stdout and plot.stat().st_size > 10_000
    done = run_example("--steps", "2", "--batch", "4", "--length", "16", "--plot", "", "--dtype", "float64")
    assert done.returncode == 0 and "(float64)" in done.stdout, done.stderr[-2000:]


def test_the_curves_part_where_they_first_differ_by_the_agreement_bound():
    spec = importlib.util.spec_from_file_location("train_transformer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.first_parting([2.0, 1.5, 1.2, 1.0], [2.0, 1.5001, 1.21, 1.3]) == 2
    assert example.first_parting([2.0, 1.5], [2.0, 1.5 + example.AGREE / 2]) is None
