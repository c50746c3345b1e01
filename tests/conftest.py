import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def python_without():
    """Run Python code in a fresh interpreter in which the named modules cannot be imported: an
    optional extra left out, on a machine that has it."""
    def run(modules, code):
        head = f"import sys\nfor m in {tuple(modules)!r}:\n    sys.modules[m] = None\n"
        return subprocess.run([sys.executable, "-c", head + code], capture_output=True, text=True, timeout=120)
    return run
