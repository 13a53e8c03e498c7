"""Several server processes on one port (`PROCESSES` > 1): `uniadapter serve` becomes a supervisor that starts
that many copies of itself, each binding the port with SO_REUSEPORT, so the kernel spreads incoming connections
among them by their addresses; each child is a whole replica (its model, batcher, FAISS indexes) sharing
DATA_ROOT as replicas on one host do, and starts listening only once it is ready (uvicorn listens after the
app's start-up). Why: on a CPU a small model is Python-bound, and one process keeps about one core busy whatever
its threads; a second process uses the next one.

The supervisor forwards SIGTERM and SIGINT to every child (each drains its requests, as one server does; the
children run in their own sessions, so a terminal's Ctrl-C reaches them once, through the supervisor) and exits
with status 0 once all have; a child whose supervisor dies (SIGKILL) gets SIGTERM (Linux) and drains; if a child
exits on its own, the others are stopped and the supervisor exits with that child's status (a process manager
restarts the group, as it would one server)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from types import FrameType

from uniadapter_serve.service.settings import Settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when its parent dies (Linux)"""
STOP_TIMEOUT_S = 60.0
"""how long the supervisor waits for the children after forwarding a stop, beyond their graceful shutdown"""


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening: uvicorn listens on it once the app
    has started, so the kernel gives connections only to children that are ready. OSError (the port taken by
    another program, or no SO_REUSEPORT) ends the child, and so the group."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("PROCESSES > 1 needs SO_REUSEPORT (Linux, BSD, macOS)")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def child_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: the supervisor's, and TORCH_THREADS, unless set, the cores divided among the
    processes (two processes of two threads on two cores would contend for them). A child does not supervise:
    it is started with `--reuse-port`."""
    env = dict(os.environ if environ is None else environ)
    if settings.torch_threads is None:
        threads = max(1, (os.cpu_count() or 1) // settings.processes)
        env["UNIADAPTER_TORCH_THREADS"] = str(threads)
    return env


def _in_own_session() -> None:
    """A child's set-up before exec: its own session, so a terminal's Ctrl-C (SIGINT to the whole foreground
    process group) reaches only the supervisor, which forwards it once (uvicorn takes a second SIGINT as "exit
    now, do not drain"); and, on Linux, SIGTERM when the supervisor dies, so a killed supervisor leaves no child
    serving on the port unsupervised (the child drains and exits)."""
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        pass


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run `settings.processes` copies of `argv` (the serve command) with `--reuse-port` until a stop signal
    (status 0 once every child has drained) or until one child exits (the rest stopped; its status)."""
    env = child_env(settings)
    children: list[subprocess.Popen[bytes]] = []
    signalled: set[int] = set()
    stopping = False

    def tell(child: subprocess.Popen[bytes], sig: int) -> None:
        if child.poll() is None:
            signalled.add(child.pid)
            child.send_signal(sig)

    def forward(signum: int, frame: FrameType | None) -> None:
        """A stop signal, forwarded to every child each time, as a single server takes it: the first drains, a
        second (Ctrl-C twice) makes uvicorn exit at once."""
        nonlocal stopping
        stopping = True
        for child in children:
            tell(child, signum)

    def stop_the_rest() -> None:
        """Stop every child not yet told (a second SIGTERM would cut a draining one short)."""
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid not in signalled:
                tell(child, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for _ in range(settings.processes):
            if stopping:  # a stop signal while starting: start no more, and stop those already started
                break
            children.append(subprocess.Popen([*argv, "--reuse-port"], env=env, preexec_fn=_in_own_session))
        if stopping:
            stop_the_rest()
        log.info("serving on %s:%d with %d processes (pids %s)", settings.host, settings.port, len(children),
                 ", ".join(str(c.pid) for c in children))
        status = 0
        while True:
            ended = [c for c in children if c.poll() is not None]
            if ended and not stopping:
                status = ended[0].returncode or 1
                log.error("server process %d exited with %s: stopping the others", ended[0].pid, ended[0].returncode)
                stop_the_rest()
            if len(ended) == len(children):
                break
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            for child in children:
                if child.pid == pid:
                    child.returncode = os.waitstatus_to_exitcode(code)
        for child in children:
            try:
                child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("server process %d did not stop in time: killed", child.pid)
                child.kill()
                child.wait()
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
