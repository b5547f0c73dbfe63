"""GPU tests: skipped cleanly where cupy or a CUDA device is missing."""

import pytest


def _gpu_available() -> str | None:
    try:
        import cupy
    except ImportError:
        return "cupy is not installed"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device"
    except Exception as e:  # no driver
        return f"no CUDA device ({e.__class__.__name__})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_available()
    for item in items:
        if "gpu" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))
