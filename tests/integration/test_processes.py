"""PROCESSES > 1: `uniadapter serve` supervises that many server processes on one port (SO_REUSEPORT), each a
whole replica on the shared DATA_ROOT. Real servers: the kernel's spreading of connections, signals and exits
are what is tested."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support.server import free_port, start_server
from support.waiting import until

from uniadapter_serve.service.processes import child_env
from uniadapter_serve.service.settings import Settings

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


def _pid(url: str) -> int:
    """The pid of the process that took a fresh connection (httpx.get opens one per call)."""
    body = httpx.get(f"{url}/readyz", params={"verbose": "true"}, timeout=30).json()
    return int(body["details"]["process"]["pid"])


def _children(pid: int) -> set[int]:
    return {int(p) for p in (open(f"/proc/{pid}/task/{pid}/children").read().split())}


def _gone(pid: int) -> bool:
    """No such process, or one that has exited and waits to be reaped (a zombie runs nothing and holds no
    socket; an orphan's reaper is whatever this machine's PID 1 is)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def group(tmp_path):
    server = start_server(tmp_path / "data", tmp_path, processes=2)
    # start_server returned once one child answered; the other may still be loading
    children = _children(server.process.pid)
    assert len(children) == 2, children
    yield server, children
    server.stop(signal.SIGKILL)
    for pid in children:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_connections_reach_every_process_and_each_serves(group):
    server, children = group
    seen: set[int] = set()

    def both_seen() -> bool:
        seen.add(_pid(server.url))
        return seen == children

    until(both_seen, what=f"a connection to each of the processes {sorted(children)}", timeout=120,
          stop=lambda: server.process.poll() is not None and "the supervisor exited")
    # each process answers a model request itself (its own model and batcher)
    answered: set[int] = set()

    def both_answer() -> bool:
        with httpx.Client(base_url=server.url, timeout=60) as c:  # one connection: one process
            pid = int(c.get("/readyz", params={"verbose": "true"}).json()["details"]["process"]["pid"])
            r = c.post("/vqa", json={"image": _png(), "question": "what colour?", "adapter": "none"})
            assert r.status_code == 200, r.text
            assert r.json()["answer"], r.json()
        answered.add(pid)
        return answered == children

    until(both_answer, what="an answer from each process", timeout=120)


def test_sigterm_stops_the_group_cleanly(group):
    server, children = group
    assert server.stop(signal.SIGTERM, timeout=90) == 0
    assert all(_gone(pid) for pid in children), children


def test_a_child_that_dies_takes_the_group_down(group):
    server, children = group
    victim, other = sorted(children)
    os.kill(victim, signal.SIGKILL)
    server.process.wait(90)
    assert server.process.returncode != 0
    until(lambda: _gone(other), what=f"the other process {other} stopped", timeout=60)


def test_sigterm_while_the_processes_start_stops_them_all(tmp_path):
    """A stop before any child is ready (a deploy rolled back at once): every child started is stopped, none is
    left listening, and the supervisor exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIADAPTER_")} | {
        "UNIADAPTER_BACKBONE": "blip-tiny", "UNIADAPTER_DATA_ROOT": str(tmp_path / "data"),
        "UNIADAPTER_PORT": str(free_port()), "UNIADAPTER_HOST": "127.0.0.1", "UNIADAPTER_PROCESSES": "2",
        "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def two_children() -> set[int] | None:
            found = _children(proc.pid)
            return found if len(found) == 2 else None

        children = until(two_children, what="the supervisor's 2 children", timeout=60,
                         stop=lambda: proc.poll() is not None and f"the supervisor exited with {proc.returncode}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        until(lambda: all(_gone(pid) for pid in children), what=f"children {sorted(children)} gone", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _started_alone(tmp_path) -> tuple[subprocess.Popen[bytes], str, set[int]]:
    """A PROCESSES=2 supervisor in its own session (as a shell runs a foreground job: signals to its process group
    do not reach pytest), once both children answer."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIADAPTER_")} | {
        "UNIADAPTER_BACKBONE": "blip-tiny", "UNIADAPTER_DATA_ROOT": str(tmp_path / "data"),
        "UNIADAPTER_PORT": str(port), "UNIADAPTER_HOST": "127.0.0.1", "UNIADAPTER_PROCESSES": "2",
        "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    seen: set[int] = set()

    def both_answered() -> bool:
        try:
            seen.add(_pid(url))
        except httpx.HTTPError:
            return False
        return len(seen) == 2 and seen == _children(proc.pid)

    until(both_answered, what="both processes answering", timeout=120,
          stop=lambda: proc.poll() is not None and f"the supervisor exited with {proc.returncode}")
    return proc, url, set(seen)


def test_ctrl_c_reaches_each_child_once(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group. The children are in sessions of their
    own, so only the supervisor's forward reaches them: one SIGINT each, which drains (a second would make uvicorn
    exit at once, dropping requests in flight). The group then exits 0."""
    proc, _, children = _started_alone(tmp_path)
    try:
        assert all(os.getpgid(pid) != os.getpgid(proc.pid) for pid in children)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 0
        until(lambda: all(_gone(pid) for pid in children), what=f"children {sorted(children)} gone", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_children_do_not_outlive_a_killed_supervisor(tmp_path):
    """SIGKILL of the supervisor (no chance to forward anything): each child gets SIGTERM from the kernel
    (PR_SET_PDEATHSIG), drains and exits, and the port stops answering."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    proc, url, children = _started_alone(tmp_path)
    try:
        proc.kill()
        proc.wait(30)
        until(lambda: all(_gone(pid) for pid in children), what=f"children {sorted(children)} gone", timeout=90)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        for pid in children:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_port_held_by_another_program_fails_the_start(tmp_path):
    port = free_port()
    with socket.socket() as holder:  # no SO_REUSEPORT: no group can join it
        holder.bind(("127.0.0.1", port))
        holder.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIADAPTER_")} | {
            "UNIADAPTER_BACKBONE": "blip-tiny", "UNIADAPTER_DATA_ROOT": str(tmp_path / "data"),
            "UNIADAPTER_PORT": str(port), "UNIADAPTER_HOST": "127.0.0.1", "UNIADAPTER_PROCESSES": "2",
            "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"], env=env,
                              capture_output=True, timeout=180)
    assert proc.returncode != 0
    assert b"Address already in use" in proc.stdout + proc.stderr


def test_each_child_gets_a_share_of_the_cores():
    cores = os.cpu_count() or 1
    env = child_env(Settings(processes=2), {"PATH": "/bin"})
    assert env["UNIADAPTER_TORCH_THREADS"] == str(max(1, cores // 2))
    assert env["PATH"] == "/bin"
    explicit = child_env(Settings(processes=2, torch_threads=3), {})
    assert "UNIADAPTER_TORCH_THREADS" not in explicit  # the child reads the same setting itself


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()

