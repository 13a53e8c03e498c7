"""Which adapter sets a model replica serves at once: its places, each held by a set for a turn.

A replica has `places` (`ray_sets_per_replica`, what its adapter budget holds). Normally the router gives it
no more sets than that. When it must serve more, as a survivor does while a killed replica's replacement
starts, serving every set at once would cycle them through the budget, a disk load for nearly every batch
(24 loads in 11 s, measured). Instead a set that holds a place keeps it for at least `turn_s`; a request for
a set without one waits (first come, first served) until a place is free, or a turn is over and the set
holding it has finished its running requests (new requests of that set wait behind the others meanwhile).
So a place changes hands at most once per turn: at most `places` loads per `turn_s`, every request served in
a few turns. A request that waits longer than its share of the deadline is shed with 503 + Retry-After
before anything is loaded.

Runs on the replica's event loop (not thread-safe; the replica's request methods all run on that loop).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from uniadapter_serve.errors import ServerBusyError


@dataclass
class _Turn:
    since: float
    last: float
    """when a request of the set last came in (the turn to close first is the least recently used one, as
    Serve's multiplexed cache gives that set up when the next one comes in)"""
    running: int = 0
    closing: bool = False
    """its turn is over and another set waits: no new requests, the place frees when `running` reaches 0"""


class SetPlaces:
    """At most `places` adapter sets served at once by one replica, each for turns of `turn_s` or more."""

    def __init__(self, places: int, turn_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if places < 1 or turn_s <= 0:
            raise ValueError(f"places must be >= 1 and turn_s > 0, got {places} and {turn_s}")
        self.places, self.turn_s, self.clock = places, turn_s, clock
        self._held: dict[str, _Turn] = {}
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.stats: Counter[str] = Counter()
        """place_turns (a set took a place), place_waits (a request waited for one), place_sheds (503)"""

    def held(self) -> dict[str, int]:
        """The sets holding places -> their running requests."""
        return {ref: turn.running for ref, turn in self._held.items()}

    def serving(self, ref: str) -> bool:
        """`ref` holds a place and takes requests (safe to ask from another thread: one dict look-up)."""
        turn = self._held.get(ref)
        return turn is not None and not turn.closing

    def waiting(self) -> int:
        return sum(1 for _, future in self._waiting if not future.done())

    async def enter(self, ref: str, wait_s: float) -> None:
        """Return once `ref` holds a place and this request counts as running in it (call `leave` after);
        ServerBusyError (503, Retry-After) when no place came within `wait_s`."""
        if self._admit(ref):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((ref, future))
        self.stats["place_waits"] += 1
        self._rebalance()
        try:
            await asyncio.wait_for(future, wait_s)
        except asyncio.TimeoutError:
            self.stats["place_sheds"] += 1
            raise ServerBusyError(f"this model replica serves {self.places} other adapter set(s) and {ref} "
                                  f"waited {wait_s:.1f} s for a place; retry", retry_after=self.turn_s) from None
        except BaseException:  # cancelled: a place granted at that moment is given back
            if future.done() and not future.cancelled():
                self.leave(ref)
            raise
        finally:
            self._waiting = [(r, f) for r, f in self._waiting if f is not future]

    def leave(self, ref: str) -> None:
        """One request of `ref` is done."""
        turn = self._held.get(ref)
        if turn is not None and turn.running > 0:
            turn.running -= 1
        if self._waiting:
            self._rebalance()

    def _admit(self, ref: str) -> bool:
        """The fast path: `ref` holds an open place, or a place is free and nobody waits."""
        turn = self._held.get(ref)
        if turn is not None and not turn.closing:
            turn.running += 1
            turn.last = self.clock()
            return True
        if turn is None and len(self._held) < self.places and not self.waiting():
            self._take(ref)
            return True
        return False

    def _take(self, ref: str) -> None:
        now = self.clock()
        self._held[ref] = _Turn(now, now, running=1)
        self.stats["place_turns"] += 1

    def _rebalance(self) -> None:
        """Close the turns that are over while other sets wait, free closed places with nothing running, and
        let waiters in, first come first served; wake up again when the next turn ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = [(r, f) for r, f in self._waiting if not f.done()]
        now = self.clock()
        # sets that wait for a place, less the places that are free or being freed: that many turns that are
        # over close, least recently used first
        wanted = {r for r, _ in self._waiting if r not in self._held or self._held[r].closing}
        short = len(wanted) - (self.places - len(self._held)) - sum(t.closing for t in self._held.values())
        over = sorted((t.last, r) for r, t in self._held.items() if not t.closing and now - t.since >= self.turn_s)
        for _, ref in over[:max(0, short)]:
            self._held[ref].closing = True
        for ref, turn in list(self._held.items()):
            if turn.closing and turn.running == 0:
                del self._held[ref]
        for ref, future in self._waiting:
            holder = self._held.get(ref)
            if holder is not None and not holder.closing:
                holder.running += 1
                holder.last = now
                future.set_result(None)
            elif holder is None and len(self._held) < self.places:
                self._take(ref)
                future.set_result(None)
        self._waiting = [(r, f) for r, f in self._waiting if not f.done()]
        # a turn already over that stayed open needs no timer: what could close it (a new waiter, a place
        # freed) calls this again
        ends = [t.since + self.turn_s for t in self._held.values() if not t.closing and t.since + self.turn_s > now]
        if self._waiting and ends:
            self._timer = asyncio.get_running_loop().call_later(min(ends) - now, self._rebalance)
