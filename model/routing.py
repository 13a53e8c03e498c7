"""Per-sample routing of adapter branches inside one batch.

The frozen backbone runs once over the whole batch; only the adapter branches are
computed per group of samples that share an adapter set (index_select -> branch ->
index_copy). Samples with no set get a zero delta, which leaves their values unchanged.
Swapping between resident sets is therefore routing, not copying weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from uniadapter_serve.errors import InputError
from uniadapter_serve.model.uniadapter import AdapterSetModule

BranchFn = Callable[[AdapterSetModule, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Route:
    adapter: AdapterSetModule
    index: torch.Tensor | None
    """Batch rows this set serves; None means the whole batch."""


class Routing:
    """Which adapter set serves which rows of a batch."""

    def __init__(self, routes: Sequence[Route], batch_size: int) -> None:
        self.routes = tuple(routes)
        self.batch_size = batch_size

    @classmethod
    def none(cls, batch_size: int) -> Routing:
        return cls((), batch_size)

    @classmethod
    def single(cls, adapter: AdapterSetModule | None, batch_size: int) -> Routing:
        if adapter is None:
            return cls.none(batch_size)
        return cls((Route(adapter, None),), batch_size)

    @classmethod
    def per_sample(cls, adapters: Sequence[AdapterSetModule | None], device: torch.device | None = None) -> Routing:
        """Group samples by set (None = bare backbone). One Python step per distinct set."""
        n = len(adapters)
        distinct = {id(a): a for a in adapters if a is not None}
        if not distinct:
            return cls.none(n)
        if len(distinct) == 1 and all(a is not None for a in adapters):
            return cls.single(next(iter(distinct.values())), n)
        rows: dict[int, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is not None:
                rows.setdefault(id(a), []).append(i)
        routes = [Route(distinct[k], torch.tensor(v, dtype=torch.long, device=device)) for k, v in rows.items()]
        return cls(routes, n)

    @property
    def is_bare(self) -> bool:
        return not self.routes

    def repeat_interleave(self, repeats: int) -> Routing:
        """Routing for a batch in which each row was repeated `repeats` times in place
        (frames of a video, candidate answers of a question)."""
        if repeats == 1 or not self.routes:
            return Routing(self.routes, self.batch_size * repeats)
        routes = []
        for r in self.routes:
            if r.index is None:
                routes.append(r)
                continue
            offsets = torch.arange(repeats, device=r.index.device)
            index = (r.index[:, None] * repeats + offsets[None, :]).reshape(-1)
            routes.append(Route(r.adapter, index))
        return Routing(routes, self.batch_size * repeats)

    def select(self, rows: torch.Tensor) -> Routing:
        """Routing for the sub-batch `x[rows]` (rows: 1-D long tensor)."""
        n = int(rows.numel())
        if not self.routes:
            return Routing.none(n)
        owner = torch.full((self.batch_size,), -1, dtype=torch.long, device=rows.device)
        for k, r in enumerate(self.routes):
            if r.index is None:
                owner.fill_(k)
            else:
                owner[r.index.to(rows.device)] = k
        picked = owner[rows]
        routes = []
        for k, r in enumerate(self.routes):
            idx = torch.nonzero(picked == k).flatten()
            if idx.numel() == n:
                routes.append(Route(r.adapter, None))
            elif idx.numel():
                routes.append(Route(r.adapter, idx))
        return Routing(routes, n)

    def delta(self, x: torch.Tensor, fn: BranchFn) -> torch.Tensor | None:
        """Apply `fn(set, rows)` per group; return a (B, ...) delta or None if no set applies."""
        if not self.routes:
            return None
        if len(self.routes) == 1 and self.routes[0].index is None:
            return fn(self.routes[0].adapter, x)
        out: torch.Tensor | None = None
        for r in self.routes:
            assert r.index is not None
            d = fn(r.adapter, x.index_select(0, r.index))
            if d is None:
                continue
            if out is None:
                out = x.new_zeros((x.shape[0], *d.shape[1:]))
            out.index_copy_(0, r.index, d.to(out.dtype))
        return out

    def head(self, name: str, x: torch.Tensor, default: torch.nn.Module | None) -> torch.Tensor:
        """Apply head `name` row-wise: the set's own head where it has one, else the backbone's."""
        overrides = [r for r in self.routes if r.adapter.head(name) is not None]
        if not overrides:
            if default is None:
                raise_missing_head(name)
            return default(x)
        if len(overrides) == 1 and overrides[0].index is None:
            return overrides[0].adapter.head(name)(x)  # type: ignore[misc]
        covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for r in overrides:
            index = r.index if r.index is not None else torch.arange(x.shape[0], device=x.device)
            module = r.adapter.head(name)
            assert module is not None
            parts.append((index, module(x.index_select(0, index))))
            covered[index] = True
        rest = torch.nonzero(~covered).flatten()
        first = parts[0][1]
        out = x.new_empty((x.shape[0], *first.shape[1:]))
        if rest.numel():
            if default is None:
                raise_missing_head(name)
            out.index_copy_(0, rest, default(x.index_select(0, rest)))
        for index, value in parts:
            out.index_copy_(0, index, value)
        return out


def raise_missing_head(name: str) -> NoReturn:
    raise InputError(f"the backbone has no {name} head and the adapter set does not carry one")
