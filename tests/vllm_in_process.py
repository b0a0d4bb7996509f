"""`engine_in_this_process()`: the vLLM engines built inside it run their engine core and worker in the test process.

By default (the production path) an engine spawns a core process, which spawns a worker process, and each imports vLLM
again: about 40 s of CPU per engine on a 2-core machine, most of a vLLM test's time. The engine is the same either way;
what the two processes add (requests and weights crossing a process boundary) stays tested by the modules that keep the
default: `tests/jobs/scoring/test_vllm_scorer.py` and the trainer test of `tests/training/grpo/test_vllm_backend.py`.

A worker process starts with nothing loaded; this one starts in a test process that earlier tests loaded modules into.
While it starts, vLLM's CPU worker scans every loaded module for Triton kernels to rebind and calls `hasattr` on each
value, which raises for ibis's deferred expressions (loaded by tea-tasting in the A/B tests): modules holding such a
value are hidden from `sys.modules` while the engine builds (none of them holds a vLLM kernel).

The in-process worker also changes the process for the tests after it, which this undoes on leaving: it replaces
`torch.set_num_threads` with a no-op (its CPU worker forbids resizing the pool it bound) and vLLM caches its environment
variables once an engine core starts. Only the build needs the setting: vLLM reads it when it picks the engine client.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import ModuleType

import pytest


def modules_a_kernel_scan_breaks_on() -> dict[str, ModuleType]:
    """Loaded modules with a value on which `hasattr(value, "__dict__")` raises (vLLM's scan does that on every value)."""
    found = {}
    for name, module in list(sys.modules.items()):
        for value in list(getattr(module, "__dict__", {}).values()):
            try:
                hasattr(value, "__dict__")
            except Exception:
                found[name] = module
                break
    return found


@contextmanager
def engine_in_this_process():
    import torch
    import vllm.envs

    set_num_threads = torch.set_num_threads
    hidden = modules_a_kernel_scan_breaks_on()
    try:
        for name in hidden:
            del sys.modules[name]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            yield
    finally:
        sys.modules.update(hidden)
        torch.set_num_threads = set_num_threads
        vllm.envs.disable_envs_cache()
