"""Test-wide settings (must run before torch is imported by any test module) and shared fixtures."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see wf_pipeline/__init__.py

import pytest  # noqa: E402 - after the environment is set


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread, restored afterwards. Tiny tensors gain nothing from threads, and OpenMP
    spin-waiting on a shared CPU can make 2-thread runs of many small ops 10-100x slower. A test module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; module scope, so its module-scoped
    fixtures run single-threaded too."""
    from wf_pipeline.fisher.parallel import torch_threads

    with torch_threads(1):
        yield
