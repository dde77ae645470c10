"""Shared test set-up. What lives where:

- this file: the fixtures used by more than one test module. `one_thread` (torch on one thread for
  a module's tests: on tiny tensors OpenMP threads only wait for each other; a module opts in with
  `pytestmark = pytest.mark.usefixtures("one_thread")`), `tiny_model` (the untrained two-layer
  mini model saved once per session; read-only, runs write elsewhere) and `single` (the one-process
  reference run the multi-process tests of test_distributed.py and test_deepspeed.py reproduce);
- tests/helpers.py: the plain functions and constants shared by test modules (tiny models, short
  training runs, the child-process and `accelerate launch` runners, checkpoint comparisons), imported
  as `from helpers import ...`. A test module never imports another test module.

The `slow` marker (declared in pyproject.toml): every test that starts a child process (the CLI as a
process, `accelerate launch` / torchrun, multiprocessing) or runs a whole pipeline (the demo, a full
train / sft run of many steps, the distributed and DeepSpeed tests) is marked `@pytest.mark.slow`, or
its module sets `pytestmark = pytest.mark.slow`. `make test` runs everything; the fast lane,
`make test PYTEST_ARGS="-m 'not slow'"`, leaves them out and stays under 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import one_process, save_tiny_mini


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module's tests; the previous count is restored after them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """`helpers.save_tiny_mini`: an untrained two-layer mini model saved like an SFT result."""
    return save_tiny_mini(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def single(tiny_model, tmp_path_factory) -> Path:
    """The multi-process tests' reference: one process, one micro-batch of 4 prompts per step
    (`helpers.one_process`, gradients dumped under grads/). Read-only."""
    return one_process(tiny_model, tmp_path_factory.mktemp("single") / "run")
