"""The residency board of the Ray Serve app: what each model replica holds, and which replicas are alive.

Each model replica posts its residency table and adapter statistics every `POST_INTERVAL_S` to one named
actor (`ResidencyBoard`); the ingress reads them for `GET /adapters`, `/readyz` and `/metrics`. A replica
killed outright (kill -9, a lost node) never says goodbye, so the board forgets a table that has not been
posted for `STALE_AFTER_S` (a few post intervals), and the ingress keeps only the tables of the replicas
Serve's controller reports RUNNING (`running_replicas`), which is also what it counts as the model replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ray

BOARD = "uniadapter-residency"
NAMESPACE = "uniadapter"
POST_INTERVAL_S = 0.5
"""how often a model replica posts its table"""
STALE_AFTER_S = 6 * POST_INTERVAL_S
"""a table not posted for this long is a replica gone without a graceful shutdown (a few missed posts, so a
replica slowed down by a busy host is not dropped between two posts)"""


@ray.remote(num_cpus=0)
class ResidencyBoard:
    """What each model replica holds, and its adapter statistics, keyed by replica (an async actor: a reader
    may wait for fresh posts without holding up the posters)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Condition()

    def _forget_stale(self) -> None:
        cutoff = time.time() - STALE_AFTER_S
        for replica in [k for k, t in self.tables.items() if t["posted"] < cutoff]:
            del self.tables[replica]

    async def post(self, replica: str, table: dict[str, Any]) -> None:
        async with self.changed:
            self.tables[replica] = {**table, "posted": time.time()}
            self._forget_stale()
            self.changed.notify_all()

    async def drop(self, replica: str) -> None:
        self.tables.pop(replica, None)

    async def read(self) -> dict[str, dict[str, Any]]:
        """The tables of the replicas that posted within `STALE_AFTER_S`."""
        self._forget_stale()
        return dict(self.tables)

    async def read_posted_after(self, moment: float, replicas: int, timeout: float) -> dict[str, dict[str, Any]]:
        """The tables posted after `moment` (a time.time()), once `replicas` of them are, or at `timeout` seconds
        whatever there is."""

        def fresh() -> dict[str, dict[str, Any]]:
            return {k: t for k, t in self.tables.items() if t["posted"] > moment}

        async with self.changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: len(fresh()) >= replicas), timeout)
            return fresh()


def board() -> Any:
    actor: Any = ResidencyBoard
    return actor.options(name=BOARD, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


def running_replicas(app: str, deployment: str = "Model", timeout: float = 5.0) -> set[str]:
    """The ids of the deployment's replicas that Serve's controller reports RUNNING (its own view of which
    are alive: it sees a dead actor at once, and an unhealthy one by its health checks)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details: Any = ray.get(controller.get_serve_instance_details.remote(), timeout=timeout)
    replicas = details["applications"][app]["deployments"][deployment].get("replicas", [])
    return {str(r["replica_id"]) for r in replicas if r["state"] == "RUNNING"}  # a str Enum, or its value
