"""The vendored Megatron-LM files are those of one megatron-core tag (vendor/README.md): its training code
imports megatron-core modules that later releases removed, and megatron-core >= 0.17's wheel ships a
``megatron.training`` of its own. So the tests that run Megatron-LM's code run only against the megatron-core
they were taken with; under another (e.g. a 0.19 compatibility run) they skip and say why."""
import pytest

VENDORED_CORE = "0.16.1"


def _installed_core():
    try:
        from megatron.core.package_info import __version__
    except ImportError:
        return None
    return str(__version__)


def pytest_collection_modifyitems(config, items):
    installed = _installed_core()
    if installed == VENDORED_CORE:
        return
    skip = pytest.mark.skip(reason=f"the vendored Megatron-LM is core_v{VENDORED_CORE}'s; megatron-core is "
                                   f"{installed}: refresh tests/megatron_lm/vendor from that tag to run these")
    for item in items:
        # the file-hash check of the vendored copy runs under any core
        if "tests/megatron_lm/" in str(item.fspath).replace("\\", "/") and \
                item.name != "test_vendored_files_are_unmodified_and_complete":
            item.add_marker(skip)
