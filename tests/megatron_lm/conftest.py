"""The vendored Megatron-LM files are those of one megatron-core tag (vendor/README.md): its training code
imports megatron-core modules that later releases removed, and megatron-core >= 0.17's wheel ships a
``megatron.training`` of its own. So the tests that run Megatron-LM's code run only against the megatron-core
they were taken with; under another (e.g. a 0.19 compatibility run) they skip and say why."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import VENDOR, megatron_lm_core_version  # noqa: E402


def _installed_core():
    try:
        from megatron.core.package_info import __version__
    except ImportError:
        return None
    return str(__version__)


def pytest_collection_modifyitems(config, items):
    installed, wanted = _installed_core(), megatron_lm_core_version()
    if installed == wanted:
        return
    skip = pytest.mark.skip(reason=f"the Megatron-LM in {VENDOR} is core_v{wanted}'s; megatron-core is {installed}: "
                                   "run tests/compat/run_with_megatron_lm.sh with a checkout of that tag")
    for item in items:
        # the file-hash check of the vendored copy runs under any core
        if "tests/megatron_lm/" in str(item.fspath).replace("\\", "/") and \
                item.name != "test_vendored_files_are_unmodified_and_complete":
            item.add_marker(skip)
