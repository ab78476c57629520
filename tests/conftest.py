"""Markers applied by location.

``megatron``: the tests that run megatron-core code (in the test process or in the ranks it
spawns). `.ci/run` runs them a second time on Python 3.12 with the newest megatron-core
(``pytest -m "megatron and not slow"``). A test directory or file that starts running
megatron-core code belongs in :data:`MEGATRON_TESTS`.
"""

import pathlib

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
MEGATRON_TESTS = ("checkpoint", "convert", "models", "runtime", "run", "trainer", "weight_sync",
                  "plan/test_command.py", "plan/test_measure.py", "plan/test_gpu_layers.py")


def pytest_collection_modifyitems(config, items):
    roots = [TESTS / p for p in MEGATRON_TESTS]
    for item in items:
        path = pathlib.Path(str(item.fspath)).resolve()
        if any(path == root or root in path.parents for root in roots):
            item.add_marker(pytest.mark.megatron)
