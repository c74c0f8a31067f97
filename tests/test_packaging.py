"""The sdist carries the test suite, the docs the README links and the license; the wheel carries ``py.typed``;
CI runs the README's test command, ruff and mypy.

The sdist and the wheel are built offline with the project's own build backend (``setuptools.build_meta``, as
``python -m build --no-isolation`` calls it), from a copy of the source tree, so that the tree is left as it was.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".whl", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    ".hypothesis")  # fmt: skip
KERNEL_SOURCES = sorted(p.name for p in (ROOT / "src/gemmbridge/backends/cuda/kernels").iterdir()
                        if p.suffix in (".cu", ".cuh"))  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("setuptools", minversion="77")
    tree = tmp_path_factory.mktemp("tree") / "gemmbridge"
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE)
    hooks = "from setuptools import build_meta as b; b.build_sdist('dist'); b.build_wheel('dist')"
    result = subprocess.run([sys.executable, "-c", hooks], cwd=tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (sdist,), (wheel,) = (list((tree / "dist").glob(pattern)) for pattern in ("*.tar.gz", "*.whl"))
    return {"sdist": sdist, "wheel": wheel, "out": tmp_path_factory.mktemp("sdist")}


def test_the_sdist_carries_the_tests_docs_and_license(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        archive.extractall(built["out"], filter="data")
    tests = {f"tests/{path.name}" for path in (ROOT / "tests").glob("*.py")}
    assert tests <= names and "tests/conftest.py" in names
    assert {"docs/errors.md", "LICENSE", "README.md", "src/gemmbridge/py.typed"} <= names
    assert {f"src/gemmbridge/backends/cuda/kernels/{name}" for name in KERNEL_SOURCES} <= names
    (unpacked,) = built["out"].iterdir()
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests/test_cli.py", "tests/test_contract.py"], cwd=unpacked, capture_output=True,
                               text=True, timeout=300)  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]


def test_the_wheel_is_typed_and_licensed_without_the_tests(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    assert {"gemmbridge/py.typed", "gemmbridge/__main__.py", "gemmbridge/testing.py"} <= names
    assert {f"gemmbridge/backends/cuda/kernels/{name}" for name in KERNEL_SOURCES} <= names  # compiled at run time
    assert "gemmbridge-0.1.0.dist-info/licenses/LICENSE" in names
    assert not any(name.startswith("tests/") for name in names)


def test_ci_runs_the_readme_test_command_then_ruff_and_mypy():
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("not a checkout: the sdist has no .ci/")
    (readme_command,) = [line for line in (ROOT / "README.md").read_text().splitlines() if line.endswith("pytest -q")]
    install_and_test = readme_command.split(" && ", 2)[2]  # after making and activating the venv
    lines = ci.read_text().splitlines()
    assert install_and_test in lines
    assert "ruff check . && ruff format --check src tests scripts benchmarks" in lines and "mypy src" in lines
