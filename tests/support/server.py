"""Run the real service in a uvicorn subprocess on a free port."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from uniadapter_serve.adapters.format import BackboneInfo
from uniadapter_serve.adapters.golden import Prober
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.tokenizer import load_answer_list, load_tokenizer
from uniadapter_serve.model.uniadapter import UniAdapterConfig

_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A crashed or interrupted test run must not leave servers behind."""
    for process in _STARTED:
        if process.poll() is None:
            process.kill()


ANSWERS = ["red", "blue", "green", "circle", "square", "one", "two", "yes", "no"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    data_root: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def publish_test_sets(data_root: Path) -> dict[str, str]:
    """Sets for the 'blip-tiny' backbone (the server builds the same seeded model), each with its golden record
    (so every server of the tests verifies them before serving): name -> ref."""
    backbone = load_backbone("blip-tiny")
    prober = Prober(backbone, load_tokenizer("blip-tiny", backbone.config), load_answer_list(None))
    registry = AdapterRegistry(data_root / "adapters")
    info = BackboneInfo.of(backbone)
    refs = {}

    def publish(name: str, config: UniAdapterConfig, seed: int, answers: list[str] | None = None) -> None:
        module = random_adapter(backbone, config, seed=seed)
        refs[name] = registry.publish(module, name, info, answer_list=answers, golden=lambda meta: prober.record(
            module, ref=meta.ref, answer_list=meta.answer_list)).ref

    for i, name in enumerate(("ret-a", "ret-b")):
        publish(name, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4), 100 + i)
    for i, name in enumerate(("vqa-a", "vqa-b")):
        publish(name, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), 200 + i, ANSWERS)
    publish("video-a", UniAdapterConfig.for_task("videoqa", bottleneck=8, kv_rank=4, num_frames=4), 300, ANSWERS)
    publish("ret-video", UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4, num_frames=4,
                                                   temporal_embedding=True, frame_aware_attention=True), 400)
    return refs


def start_server(data_root: Path, log_dir: Path, **settings: object) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIADAPTER_")}
    env.update({"UNIADAPTER_BACKBONE": "blip-tiny", "UNIADAPTER_DATA_ROOT": str(data_root),
                "UNIADAPTER_PORT": str(port), "UNIADAPTER_HOST": "127.0.0.1", "UNIADAPTER_DEVICE": "cpu",
                "OMP_NUM_THREADS": "1"})
    env.update({f"UNIADAPTER_{k.upper()}": str(v) for k, v in settings.items()})
    log = log_dir / f"server-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    _STARTED.append(process)
    server = Server(f"http://127.0.0.1:{port}", process, data_root, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become ready:\n{log.read_text()[-3000:]}")
