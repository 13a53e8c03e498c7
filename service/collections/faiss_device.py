"""Where collection indexes live: the CPU, or one GPU that FAISS was shown to run on.

FAISS GPU builds carry kernels for a fixed list of compute capabilities (the community `faiss-gpu-cu12`
wheels: sm_70 and sm_80 only, so an H100/H200 at 9.0 fails with "no kernel image"; the gpu extra's
`faiss-gpu` 1.15 adds sm_90), and a failing kernel aborts the process. So a GPU is used only after a
self-test, one tiny search, passed on that very device in a subprocess: an unsupported device costs a
warning in /readyz, never the server.

The device itself (`FaissDevice`, with its `GpuWorker` thread) is defined beside the index that runs on it
(`index.py`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import faiss

from uniadapter_serve.service.collections.index import CPU, FaissDevice, GpuWorker

__all__ = ["CPU", "FaissDevice", "GpuWorker", "builds_for", "capability", "choose", "faiss_has_gpu", "self_test"]

log = logging.getLogger(__name__)

SELF_TEST = """
import sys, numpy as np, faiss
res = faiss.StandardGpuResources()
cfg = faiss.GpuIndexFlatConfig()
cfg.device = int(sys.argv[1])
index = faiss.GpuIndexFlatIP(res, 16, cfg)
x = np.eye(16, dtype=np.float32)
index.add(x)
scores, ids = index.search(x[:4], 1)
assert ids[:, 0].tolist() == [0, 1, 2, 3], ids
print("faiss-gpu-ok")
"""
SELF_TEST_TIMEOUT_S = 120.0


def faiss_has_gpu() -> bool:
    """This faiss build has GPU support and sees a device (it says nothing of kernels for that device)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def self_test(gpu: int, *, code: str = SELF_TEST, timeout: float = SELF_TEST_TIMEOUT_S) -> tuple[bool, str]:
    """One tiny search on GPU `gpu`, in a subprocess (a kernel that does not exist aborts the process).
    -> (passed, what happened)."""
    try:
        done = subprocess.run([sys.executable, "-c", code, str(gpu)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the self-test did not finish in {timeout:g} s"
    if done.returncode == 0 and "faiss-gpu-ok" in done.stdout:
        return True, "passed"
    tail = (done.stderr.strip().splitlines() or [""])[-1][:300]
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    return False, f"the self-test failed ({how}): {tail}"


def choose(setting: str, torch_device: Any, *, has_gpu: Callable[[], bool] = faiss_has_gpu,
           test: Callable[[int], tuple[bool, str]] = self_test) -> FaissDevice:
    """`setting`: auto (the backbone's GPU when FAISS passes its self-test there), cpu, or gpu (the same,
    but a failure is logged as an error). Falls back to the CPU with a warning, never raises."""
    if setting == "cpu" or (setting == "auto" and getattr(torch_device, "type", "cpu") != "cuda"):
        return CPU
    gpu = torch_device.index if getattr(torch_device, "type", "cpu") == "cuda" and torch_device.index else 0
    if not has_gpu():
        why = "this faiss build has no GPU support or sees no device (install the gpu extra: faiss-gpu>=1.15)"
    else:
        ok, why = test(gpu)
        if ok:
            log.info("FAISS indexes on cuda:%d (self-test passed)", gpu)
            return FaissDevice(gpu, None, GpuWorker(gpu))
    warning = f"FAISS on the CPU: cuda:{gpu} not usable by FAISS ({why}){capability(gpu)}"
    (log.error if setting == "gpu" else log.warning)("%s", warning)
    return FaissDevice(None, warning)


def capability(gpu: int) -> str:
    """The warning's tail: the device's compute capability and which FAISS builds serve it ("" without CUDA)."""
    try:
        import torch

        major, minor = torch.cuda.get_device_capability(gpu)
    except Exception:  # no CUDA here: nothing to add
        return ""
    return f"; the device has compute capability {major}.{minor}; {builds_for(major, minor)}"


def builds_for(major: int, minor: int) -> str:
    """Which FAISS builds carry kernels for compute capability `major.minor` (what each was built with, as the
    README's table lists; a cubin also serves later minors of its major)."""
    if (major, minor) < (7, 0):
        return "no current FAISS GPU build covers it (7.0 is their lowest): collections stay on the CPU"
    if major < 9:
        return "the gpu extra's faiss-gpu>=1.15 (7.0-9.0) serves it, as does the community faiss-gpu-cu12 (7.0-8.9)"
    if major == 9:
        return ("the gpu extra's faiss-gpu>=1.15 serves it (sm_90 kernels); the community faiss-gpu-cu12 "
                "(7.0-8.9) does not")
    return ("the gpu extra's faiss-gpu 1.15 has no kernels for it (only sm_90 PTX, for the driver to JIT-compile "
            "if it can); conda's faiss-gpu or faiss-gpu-cuvs 1.15 (CUDA 13, kernels for 10.0 and 12.0) is the one "
            "to try")
