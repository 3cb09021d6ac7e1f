"""Fixtures of the training-loop tests."""
import pytest

from diffq_bench.train import PREEMPT


@pytest.fixture(autouse=True)
def _clear_preempt():
    """A test that preempts (signal or direct set) must not leave the flag set for the next one."""
    PREEMPT.clear()
    yield
    PREEMPT.clear()
