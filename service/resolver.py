"""Which adapter set serves a request: the one it names (`name` = newest, `name@version`, `none`), else the
task's default (settings, then the shipped demo sets), checked against the kinds the task accepts."""

from __future__ import annotations

from collections.abc import Mapping

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import ConflictError
from uniadapter_serve.service.tasks import TASK_KINDS


class AdapterResolver:
    def __init__(self, registry: AdapterRegistry, defaults: Mapping[str, str | None]) -> None:
        self.registry = registry
        self.defaults = {task: defaults.get(task) for task in TASK_KINDS}

    def resolve(self, ref: str | None, task: str) -> AdapterSetMeta | None:
        """The set a request names (or the task's default); None = bare backbone."""
        if ref is None:
            ref = self.defaults[task]
        if ref is None or ref in ("none", "bare"):
            return None
        meta = self.registry.resolve(ref)
        if meta.config.task not in TASK_KINDS[task]:
            raise ConflictError(f"adapter set {meta.ref} is a {meta.config.task} set; /{task} needs a "
                                f"{' or '.join(TASK_KINDS[task])} set")
        return meta
