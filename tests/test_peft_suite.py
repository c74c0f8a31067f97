"""PEFT's own tests with the bridge on: a LoRA subset of PEFT's ``tests/test_custom_models.py`` passes bridged
exactly as it passes as PEFT ships it.

PEFT's source distribution carries its tests: the one of the installed PEFT version is downloaded at test time
(``pip download``, once per session, into a temporary directory; skipped, with the reason, when it cannot be had)
and its tests run twice in subprocesses with ``tests/peft_suite_plugin.py``: as they are, and with every model
PEFT builds bridged (``use_gemmbridge`` after each ``inject_adapter``). Nothing of PEFT's is kept in this repository.

The subset (``SUBSET``, a regex over node ids) is PEFT's whole custom-model test class on the plain LoRA cases
(MLPs with LoRA on one or both linear layers, ``modules_to_save``, several adapters) and its multiple-adapter and
mixed-batch tests: a few minutes. The larger LoRA set (every node id with ``LoRA`` or ``LoraConfig``) is run by
hand, as the module docstring of ``peft_suite_plugin.py`` says; its counts are in docs/lora.md.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

SUBSET = (
    r"Vanilla MLP [1-6] LoRA-|LoRA (Same|Different)-lora-LoraConfig"
    r"|TestMixedAdapterBatches::test_mixed_adapter_batches_(mlp|different|partly|disabled)"
)
PLUGIN_DIR = Path(__file__).parent


@pytest.fixture(scope="session")
def peft_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed PEFT's source tree with its tests, unpacked from its source distribution."""
    version = importlib.metadata.version("peft")
    where = tmp_path_factory.mktemp("peft-source")
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                "--no-build-isolation", "--dest", str(where), f"peft=={version}"]  # fmt: skip
    try:
        done = subprocess.run(download, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"PEFT {version}'s source distribution: pip download took over 10 minutes")
    archives = sorted(where.glob("peft-*.tar.gz"))
    if done.returncode != 0 or not archives:
        pytest.skip(f"PEFT {version}'s source distribution could not be downloaded (offline?): {done.stderr[-400:]}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(where, filter="data")
    root = where / f"peft-{version}"
    (root / "tests" / "__init__.py").touch()  # PEFT's tests import their helpers relatively
    (where / "pytest.ini").write_text("[pytest]\n")  # not PEFT's own settings (coverage, warnings as errors)
    return root


def run_peft_tests(root: Path, bridged: bool) -> tuple[dict[str, str], str]:
    """Each selected test's outcome (passed, failed, error, skipped) by node id, and the run's output."""
    name = "bridged" if bridged else "baseline"
    report = root.parent / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-c", str(root.parent / "pytest.ini"), "--rootdir", str(root),
               "-p", "no:cacheprovider", "-p", "peft_suite_plugin", "-q", "--tb=line", "-rfE",
               "tests/test_custom_models.py", "--gemmbridge-select", SUBSET, f"--junitxml={report}"]  # fmt: skip
    if bridged:
        command.append("--gemmbridge-bridge")
    path = os.pathsep.join(p for p in (str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return outcomes, done.stdout


def test_peft_s_lora_tests_pass_bridged_as_they_pass_unbridged(peft_source):
    baseline, _ = run_peft_tests(peft_source, bridged=False)
    bridged, output = run_peft_tests(peft_source, bridged=True)
    served = re.search(r"gemmbridge bridge: (\d+) LoRA layers served over (\d+) adapter injections", output)
    assert served and int(served[1]) > 100, output[-2000:]  # the bridge was on, for many models
    assert baseline.keys() == bridged.keys() and len(baseline) > 300
    passed = {name for name, outcome in baseline.items() if outcome == "passed"}
    assert len(passed) > 0.9 * len(baseline)
    lost = sorted(passed - {name for name, outcome in bridged.items() if outcome == "passed"})
    gained = sorted({name for name, outcome in bridged.items() if outcome == "passed"} - passed)
    assert not lost and not gained, f"fail bridged only: {lost}; pass bridged only: {gained}\n{output[-4000:]}"
