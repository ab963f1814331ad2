"""Shared test helpers: the real-data folder beside the checkout, a skip fixture for it, a CUDA skip marker.

Real data (third-party weights and text, see shared/realdata/README.md) is read in place, never copied into the
repository: the checkout is <root>/main and the data lives in <root>/shared/realdata.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
# tests import their sibling helpers (hf_fixtures, hf_reference) by module name
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

# FOURBIT_REALDATA points elsewhere, e.g. on a GPU machine where ../shared does not travel
REALDATA = Path(os.environ.get("FOURBIT_REALDATA") or Path(__file__).resolve().parents[2] / "shared" / "realdata")

# Files a real-data test may need; the fixture skips when any is missing.
REALDATA_FILES = ("stories260K.bin", "stories260K.greedy.txt", "tok512.model", "tinystories_val_head794k.txt",
                  "wiki.test.raw")

# The models under test are tiny: with more than one intra-op thread, a machine busy with other work makes every
# small op wait for a descheduled thread (measured here: perplexity on stories260K 2.3 s with 1 thread, 18.5 s
# with 2 under load). One thread by default; FOURBIT_TEST_THREADS=2 for an idle machine (2 at most).
MAX_THREADS = min(2, max(1, int(os.environ.get("FOURBIT_TEST_THREADS", "1"))))

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton.jit decorates them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only test)")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: the test needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes minutes on a CPU; deselect with -m 'not slow' while iterating")


def pytest_collection_modifyitems(config, items):
    # `@pytest.mark.requires_cuda` works as well as the `requires_cuda` skipif object above
    for item in items:
        if item.get_closest_marker("requires_cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (GPU-only test)"))


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, MAX_THREADS))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real-data folder; skips the test with a clear message when it (or a file in it) is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data folder {REALDATA} is absent (it lives beside the checkout, in shared/realdata)")
    missing = [f for f in REALDATA_FILES if not (REALDATA / f).is_file()]
    if missing:
        pytest.skip(f"real data files missing from {REALDATA}: {', '.join(missing)}")
    return REALDATA
