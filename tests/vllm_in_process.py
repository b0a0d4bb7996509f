"""`engine_in_this_process()`: the vLLM engines built inside it run their engine core and worker in the test process.

By default (the production path) an engine spawns a core process, which spawns a worker process, and each imports vLLM
again: about 40 s of CPU per engine on a 2-core machine, most of a vLLM test's time. The engine is the same either way;
what the two processes add (requests and weights crossing a process boundary) stays tested by the modules that keep the
default: `tests/jobs/scoring/test_vllm_scorer.py` and the trainer test of `tests/training/grpo/test_vllm_backend.py`.

The in-process worker changes the process for the tests after it, which this undoes on leaving: it replaces
`torch.set_num_threads` with a no-op (its CPU worker forbids resizing the pool it bound) and vLLM caches its environment
variables once an engine core starts. Only the build needs the setting: vLLM reads it when it picks the engine client.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest


@contextmanager
def engine_in_this_process():
    import torch
    import vllm.envs

    set_num_threads = torch.set_num_threads
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            yield
    finally:
        torch.set_num_threads = set_num_threads
        vllm.envs.disable_envs_cache()
