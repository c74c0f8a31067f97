"""The sdist carries the test suite, the docs the README links and the license; the wheel carries ``py.typed``;
CI runs the README's test command, ruff and mypy.

The sdist and the wheel are built offline with the project's own build backend (``setuptools.build_meta``, as
``python -m build --no-isolation`` calls it), from a copy of the source tree, so that the tree is left as it was.
"""

from __future__ import annotations

import os
import re
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


def test_the_sdist_carries_the_tests_what_they_run_docs_and_license(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        archive.extractall(built["out"], filter="data")
    tests = {f"tests/{path.name}" for path in (ROOT / "tests").glob("*.py")}
    assert tests <= names and "tests/conftest.py" in names
    assert {"docs/errors.md", "LICENSE", "README.md", "src/gemmbridge/py.typed"} <= names
    assert {f"src/gemmbridge/backends/cuda/kernels/{name}" for name in KERNEL_SOURCES} <= names
    referenced = set(re.findall(r'"(examples|benchmarks|scripts)" / "([\w.]+)"', "".join(
        path.read_text() for path in (ROOT / "tests").glob("*.py"))))  # fmt: skip
    assert referenced and {f"{folder}/{name}" for folder, name in referenced} <= names  # files the tests run
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


def test_import_gemmbridge_torch_without_torch_names_the_extra():
    hidden = "import sys; sys.modules['torch'] = None; import gemmbridge.torch"
    result = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gemmbridge.errors.MissingPackageError: gemmbridge.torch needs torch (")
    assert last.endswith("pip install 'gemmbridge[torch]'")


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:  # import name → ImportError, whether or not it was imported before
        monkeypatch.setitem(sys.modules, name, None)


def test_adapter_checkpoints_without_safetensors_name_the_extra(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    import gemmbridge.torch as gt
    from gemmbridge.errors import MissingPackageError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    gt.apply_lora(model, ["0"], r=2, alpha=4)
    _hide(monkeypatch, "safetensors", "safetensors.torch")
    for call in (gt.save_adapters, gt.load_adapters):
        with pytest.raises(MissingPackageError, match=r"needs safetensors \(.*\): pip install 'gemmbridge\[lora\]'$"):
            call(model, tmp_path / "adapters.safetensors")
    assert not (tmp_path / "adapters.safetensors").exists()


def test_the_peft_bridge_without_peft_names_the_extra(monkeypatch):
    torch = pytest.importorskip("torch")
    from gemmbridge.errors import MissingPackageError
    from gemmbridge.torch.peft import use_gemmbridge

    _hide(monkeypatch, "peft", "peft.tuners", "peft.tuners.lora", "peft.tuners.lora.layer", "peft.tuners.tuners_utils")
    with pytest.raises(
        MissingPackageError, match=r"^use_gemmbridge needs peft \(.*\): pip install 'gemmbridge\[peft\]'$"
    ):
        use_gemmbridge(torch.nn.Linear(4, 4))
    with pytest.raises(ImportError):  # what code catching a missing package expects
        use_gemmbridge(torch.nn.Linear(4, 4))


def test_pytest_q_ends_with_the_fuzz_lines_and_why_tests_were_skipped():
    env = {**os.environ, "GEMMBRIDGE_FUZZ_CPU": "25", "GEMMBRIDGE_FUZZ_GPU": "25", "GEMMBRIDGE_FUZZ_SEED": "7"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    dots = next(i for i, line in enumerate(lines) if re.fullmatch(r"[.sxXFE]+ +\[ *\d+%\]", line))
    assert "fuzz" not in lines[dots]  # nothing printed among the dots
    summary = lines[dots + 1 :]
    assert "fuzz cpu/numpy: 25 problems, seed 7, 0 failures" in summary
    if "fuzz gpu/torch: 25 problems, seed 7, 0 failures" not in summary:  # a machine without a GPU
        assert "1 skipped: 1 GPU tests (marked gpu): no CUDA GPU here" in summary


def test_what_the_examples_and_the_readme_commands_write_is_ignored_by_git():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    written = set(re.findall(r"--(?:plot|json) ([\w.-]+\.(?:png|json))\b", readme))
    for example in (ROOT / "examples").glob("*.py"):
        written |= set(re.findall(r'default="([\w.-]+\.(?:png|json))"', example.read_text()))
    assert {"losses.png", "train_transformer.png", "finetune_lora.png", "finetune_lora.json"} <= written
    ignored = subprocess.run(["git", "check-ignore", *sorted(written)], cwd=ROOT, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(written)


@pytest.mark.parametrize(("nvidia_smi", "extras"), [(None, "bench"), ("exit 9", "bench"), ("exit 0", "bench,cuda")])
def test_the_readme_main_command_takes_the_cuda_wheels_only_where_there_is_a_driver(tmp_path, nvidia_smi, extras):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (command,) = [line for line in (ROOT / "README.md").read_text().splitlines() if line.endswith("gemmbridge bench")]
    install = re.fullmatch(r".* && pip install (.*) && gemmbridge bench", command)
    assert install and command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")
    if nvidia_smi:  # a driver that answers (exit 0), or an nvidia-smi without a working driver
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    words = subprocess.run([bash, "-c", f"set -- {install.group(1)}; printf '%s\\n' \"$@\""], capture_output=True,
                           text=True, env={"PATH": str(tmp_path)}, timeout=30)  # fmt: skip
    assert words.stdout.split() == ["torch==2.13.0", "-e", f".[{extras}]"], words.stderr
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith(("nvidia", "cuda", "nvmath")) for dep in extra["bench"])
    assert any(dep.startswith("nvidia-cublas") for dep in extra["cuda"])


def test_the_skip_summary_counts_gpu_tests_and_whole_skipped_modules():
    from conftest import skip_summary

    def test(name: str, reason: str, gpu: bool = False) -> pytest.TestReport:
        keywords = {name: 1, "gpu": 1} if gpu else {name: 1}
        return pytest.TestReport(f"t.py::{name}", ("t.py", 1, name), keywords, "skipped", ("t.py", 1, reason), "call")

    module = pytest.CollectReport("t2.py", "skipped", ("t2.py", 3, "Skipped: could not import 'cupy'"), [])
    reports = [test("a", "Skipped: needs a CUDA GPU", gpu=True), test("b", "Skipped: needs a CUDA GPU", gpu=True),
               test("c", "Skipped: no triton"), module]  # fmt: skip
    assert skip_summary(reports, cuda=False) == [
        "4 skipped: 2 GPU tests (marked gpu): no CUDA GPU here, 2 other tests",
        "      1  no triton",
        "      1  could not import 'cupy'",
    ]
    assert skip_summary(reports, cuda=True)[:2] == ["4 skipped: 4 tests", "      2  needs a CUDA GPU"]
    assert skip_summary([], cuda=False) == []
