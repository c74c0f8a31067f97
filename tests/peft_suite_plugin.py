"""A pytest plugin for PEFT's own test suite: with ``--gemmbridge-bridge``, every model PEFT builds runs bridged.

PEFT's tuners inject their adapters through ``BaseTuner.inject_adapter`` (``get_peft_model``, ``add_adapter``,
``inject_adapter_in_model``, ``PeftModel.from_pretrained`` …); the plugin calls ``use_gemmbridge`` on the model
after each injection, so the bridge serves whatever LoRA layers it can, as a user's ``use_gemmbridge`` would.
Without the option the plugin changes nothing but a seed at the start of each test and stand-ins for two packages
that PEFT's test helpers import at module level and the tests run here do not use (``diffusers``, ``datasets``),
so the baseline and bridged runs differ in the bridge alone. ``tests/test_peft_suite.py`` runs it; by hand, from
an unpacked PEFT source tree (with an empty ``pytest.ini`` beside it, and ``tests/__init__.py`` created), the larger
LoRA set, once without and once with ``--gemmbridge-bridge``::

    PYTHONPATH=<gemmbridge>/tests pytest -c ../pytest.ini --rootdir . -p peft_suite_plugin \
        tests/test_custom_models.py --gemmbridge-select "LoRA|LoraConfig" [--gemmbridge-bridge]
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import re
import sys
import types

import pytest

SERVED: list[int] = []  # layers served per injection


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gemmbridge-bridge", action="store_true", help="bridge every PEFT model (use_gemmbridge)")
    parser.addoption("--gemmbridge-select", default=None, help="run only the tests whose node id this regex finds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    pattern = config.getoption("--gemmbridge-select")
    if pattern is not None:
        selected = re.compile(pattern)
        kept = [item for item in items if selected.search(item.nodeid)]
        config.hook.pytest_deselected(items=[item for item in items if not selected.search(item.nodeid)])
        items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Each test starts from seed 0: its random weights do not depend on which tests ran before it (the selection),
    so a test compares the same numbers in a subset as in the whole run, baseline and bridged alike."""
    import torch

    torch.manual_seed(0)


def _stand_in(name: str, attributes: tuple[str, ...]) -> None:
    """An importable ``name`` whose ``attributes`` raise when used, where the package is not installed."""
    if importlib.util.find_spec(name) is not None:
        return

    def missing(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError(f"{name} is not installed (a stand-in from peft_suite_plugin)")

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what importlib.util.find_spec returns for it
    for attribute in attributes:
        setattr(module, attribute, missing)
    sys.modules[name] = module


def pytest_configure(config: pytest.Config) -> None:
    _stand_in("diffusers", ("StableDiffusionPipeline",))
    _stand_in("datasets", ("load_dataset",))
    if not config.getoption("--gemmbridge-bridge"):
        return
    from peft.tuners.tuners_utils import BaseTuner

    from gemmbridge.torch.peft import use_gemmbridge

    inject = BaseTuner.inject_adapter

    @functools.wraps(inject)
    def inject_and_bridge(self, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = inject(self, model, *args, **kwargs)
        SERVED.append(len(use_gemmbridge(model).served))
        return result

    BaseTuner.inject_adapter = inject_and_bridge  # type: ignore[method-assign]


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if terminalreporter.config.getoption("--gemmbridge-bridge"):
        terminalreporter.write_line(
            f"gemmbridge bridge: {sum(SERVED)} LoRA layers served over {len(SERVED)} adapter injections"
        )
