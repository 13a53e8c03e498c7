"""Adapter-set affinity for the model deployment on Ray Serve (a Serve request router).

Serve's default multiplexed routing learns which replica holds a set from the replicas' reports (every
0.1 s, through the controller), and sends a set it has not seen yet to the replicas holding the fewest
sets. A burst of requests for new sets therefore lands, before any report arrives, on one replica, which
loads and evicts them in turn. This router also keeps its own record of where it sent each set, updated the
moment a request is routed, so the second request of a set follows the first, and new sets spread over the
replicas by how many each already serves:

1. the replica this router sent the set to last (recorded when it chooses, not when the replica reports),
   else one replica that reports holding it;
2. otherwise one replica, chosen and recorded at once (so a burst of a new set's requests follows the
   first): the one with the most free places (`sets_per_replica` minus the sets it serves), else the one
   whose least recently used set is the stalest, as its multiplexed cache would give that one up;
3. every other replica, as a last rank, once a request has waited `spill_after_s` for the preferred ones
   (they are full, or gone): queue lengths decide.

Requests without a set (the bare backbone) go to two random replicas, the lower queue wins, as in Serve's
power-of-two router.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from typing import Any

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, MultiplexMixin, RequestRouter


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, sets_per_replica: int = 8, forget_after_s: float = 600.0, spill_after_s: float = 1.0,
                         **kwargs: Any) -> None:
        self.sets_per_replica = sets_per_replica
        self.forget_after_s = forget_after_s
        self.spill_after_s = spill_after_s

        self._sent: dict[Any, OrderedDict[str, float]] = {}
        """replica id -> sets this router sent it lately (LRU, as the replica's multiplexed cache)"""

    def _slots(self, replica: RunningReplica) -> dict[str, float]:
        """The sets a replica serves -> when this router last sent it each (sets it reports that this router
        did not send count as just used: another router's live traffic)."""
        now = time.monotonic()
        slots = {m: at for m, at in self._sent.get(replica.replica_id, {}).items() if now - at < self.forget_after_s}
        for model in replica.multiplexed_model_ids:
            slots.setdefault(model, now)
        return slots

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        model = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        slots = {r.replica_id: self._slots(r) for r in candidate_replicas}
        # other replicas only once the request has waited `spill_after_s` for the preferred ones: a queue-length
        # probe that is merely slow (a busy host) must not move a set, which would load it on a second replica
        patient = time.time() - pending_request.created_at < self.spill_after_s if pending_request else False
        # where this router put the set last; else a replica that reports holding it (one, recorded from now
        # on: a set several replicas still report would otherwise be spread over all of them and loaded twice)
        holders = [r for r in candidate_replicas if model in self._sent.get(r.replica_id, ())]
        reporting = [r for r in candidate_replicas if model in r.multiplexed_model_ids]
        if not holders and reporting:
            target = min(reporting, key=lambda r: (len(slots[r.replica_id]), hash((model, str(r.replica_id)))))
            self._record(target.replica_id, model)
            holders = [target]
        if not holders:
            # a new set: one replica, chosen now and recorded now, so requests for it routed concurrently (a
            # burst) all follow and the next new set sees this one: the replica with the most free places,
            # else the one whose least recently used set is the stalest (the one its cache gives up)
            def cost(r: RunningReplica) -> tuple[int, float, int]:
                used = slots[r.replica_id]
                return (len(used) - self.sets_per_replica if len(used) < self.sets_per_replica else 0,
                        min(used.values(), default=0.0), hash((model, str(r.replica_id))))

            target = min(candidate_replicas, key=cost)
            self._record(target.replica_id, model)
            holders = [target]
        others = [r for r in candidate_replicas if r not in holders]
        return [holders] if patient or not others else [holders, others]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        model = pending_request.metadata.multiplexed_model_id
        if model:
            self._record(replica_id, model)

    def _record(self, replica_id: Any, model: str) -> None:
        sent = self._sent.setdefault(replica_id, OrderedDict())
        sent[model] = time.monotonic()
        sent.move_to_end(model)
        while len(sent) > self.sets_per_replica:
            sent.popitem(last=False)
        for other, models in self._sent.items():  # a set lives on one replica at a time in this record
            if other != replica_id:
                models.pop(model, None)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id, None)
