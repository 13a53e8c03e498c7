"""The service on Ray Serve: the same routes, schemas and errors, on many replicas and machines.

    serve run uniadapter_serve.service.ray_app:build_app              # settings from UNIADAPTER_* (env)
    serve run docker/ray/serve-config.yaml                              # the same, from a Serve config

Two deployments:
- `Ingress` (CPU): the FastAPI app (`serve.ingress`), which parses bodies, decodes media under the decode
  budget, resolves adapter names to exact versions, owns the collections (FAISS per ingress replica, kept in
  step with the shared store, so every replica answers a query with the same hits) and calls the model;
- `Model` (one per GPU, or CPU): a `LocalEngine` (backbone, adapter manager, our mixed-set batcher). The
  ingress calls it with `multiplexed_model_id` = the set's `name@version`, so Serve sends a set's requests to
  replicas that already hold it; the replica's `@serve.multiplexed` loader makes the set resident in the
  adapter manager and unloads it when Serve drops it (`ray_sets_per_replica`; the manager's byte budget is
  the hard limit). Batches still mix sets inside each replica (Serve's `@serve.batch` would split them by
  model id, so it is not used).

A replica serves at most `ray_sets_per_replica` sets at once, each for turns of `ray_set_turn_s` or more
(`ray_places.SetPlaces`): a survivor taking over a killed replica's sets serves them in turns instead of
cycling them from disk.

Each model replica posts its residency table and adapter statistics to a small named actor
(`ray_board.ResidencyBoard`), from which the ingress answers `GET /adapters` and exports
`uniadapter_adapter_events_total` summed over the replicas Serve reports running (a replica killed outright
leaves the board a few post intervals later); the replicas also export their statistics through
Ray's metrics (as `ray_uniadapter_*`), so one Prometheus scrape of the cluster sees every replica.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from uniadapter_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterSetMeta
from uniadapter_serve.adapters.golden import GOLDEN_FILE
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import AdapterInUseError, OverloadedError, ServerBusyError, UniAdapterError
from uniadapter_serve.model.backbone import vision_config
from uniadapter_serve.model.loading import source_config
from uniadapter_serve.service import timing
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.local_engine import LocalEngine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.ray_board import POST_INTERVAL_S, board, running_replicas
from uniadapter_serve.service.ray_places import SetPlaces
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import Deadline, Task

log = logging.getLogger(__name__)

R = TypeVar("R")

GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
"""a model replica went away under the request (killed, node lost, restarting)"""


def settings_payload(settings: Settings) -> dict[str, Any]:
    """Settings as plain values (secrets revealed) for the deployments' constructors."""
    data = settings.model_dump()
    for key in ("api_key", "admin_key", "database_url"):
        secret = getattr(settings, key)
        data[key] = secret.get_secret_value() if secret is not None else None
    return data


class _ResidentSet:
    """What the multiplexed loader returns: Serve drops it (calling `__del__`) when the replica has served
    more sets than `ray_sets_per_replica` lately; the set leaves the adapter manager with it (after its
    running batches), so Serve's routing and the replica's memory agree, unless it still holds one of the
    replica's places (Serve gives up its least recently used set, which need not be the one whose place was
    handed over; its next request registers it again)."""

    def __init__(self, ref: str, engine: LocalEngine, places: SetPlaces) -> None:
        self.ref, self.engine, self.places, self.gone = ref, engine, places, False

    def __del__(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.places.serving(self.ref):
            return
        with contextlib.suppress(AdapterInUseError, UniAdapterError):  # pinned: it stays
            self.engine.manager.unload(self.ref, when_free=True)  # in use: as its last batch ends


class ModelReplica:
    """One backbone and its adapter sets; every task method runs on the multiplexed set of the request."""

    async def multiplexed(self, ref: str) -> _ResidentSet:
        """The `@serve.multiplexed` loader (defined by `model_deployment`, which knows how many to keep)."""
        raise NotImplementedError

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        logging.getLogger("uniadapter_serve").setLevel(self.settings.log_level.upper())
        self.registry = AdapterRegistry(self.settings.adapters_dir)
        self.registry.refresh()
        self.engine = LocalEngine(self.settings, self.registry, ServiceMetrics())
        self.engine.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.board = board()
        self._ray_metrics = _RayMetrics(self.replica)
        self.places = SetPlaces(self.settings.ray_sets_per_replica, self.settings.ray_set_turn_s)
        self.engine.manager.keep = self.places.serving  # a set in its turn is not evicted between its batches
        self._stop = threading.Event()
        self._poster = threading.Thread(target=self._post_loop, name="uniadapter-residency", daemon=True)
        self._poster.start()

    def _snapshot(self) -> dict[str, Any]:
        table = self.engine.residency()
        for row in table["rows"]:
            row["replica"] = self.replica
        return {**table, "stats": {**self.engine.manager.stats, **self.places.stats}, "queued": self.engine.queued(),
                "verification": self.engine.verification(),
                "golden_counts": [[s, r, n] for (s, r), n in sorted(self.engine.verifier.counts.items())]}

    def _post_loop(self) -> None:
        while not self._stop.wait(POST_INTERVAL_S):
            try:
                snapshot = self._snapshot()
                self.board.post.remote(self.replica, snapshot)
                self._ray_metrics.update(snapshot)
            except Exception:  # the board restarting must not take the replica down
                log.debug("cannot post residency", exc_info=True)

    def check_health(self) -> None:
        if not self.engine.ready:
            raise RuntimeError("the model engine is not running")

    def __del__(self) -> None:  # Serve's graceful shutdown: finish accepted work, then stop
        self._stop.set()
        self.engine.stop()
        with contextlib.suppress(Exception):
            self.board.drop.remote(self.replica)

    @contextlib.asynccontextmanager
    async def _serving(self, ref: str | None, deadline: Deadline) -> AsyncIterator[None]:
        """The request's set, held in one of this replica's places while the request runs: the multiplexed
        id Serve routed it by (registered with Serve's record of this replica once it holds a place), or,
        with `ray_router: none`, the one the job names (no places: that mode measures unrouted traffic)."""
        routed = serve.get_multiplexed_model_id()
        if not routed:
            yield
            return
        await self.places.enter(routed, wait_s=deadline.remaining() / 2)  # half what is left: the rest is the work
        try:
            await self.multiplexed(routed)
            yield
        finally:
            self.places.leave(routed)

    async def run(self, job: Task[Any]) -> Any:
        """One task job, forwarded whole to the replica's engine (its deadline arrived as the seconds left)."""
        async with self._serving(job.ref, job.deadline):
            return await self.engine.run(job)

    async def residency_op(self, op: str, ref: str) -> None:
        """load / pin / unload / unpin the request's set on this replica."""
        routed = serve.get_multiplexed_model_id()
        if routed and op in ("load", "pin"):
            await self.multiplexed(routed)
        await getattr(self.engine, op)(routed or ref)

    def check_compatible(self, meta: AdapterSetMeta) -> None:
        self.engine.check_compatible(meta)

    async def golden(self, files: dict[str, bytes]) -> bytes:
        """The record of an uploaded set, sent whole (the ingress's temporary folder is not on this host)."""
        with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
            for name, data in files.items():
                (Path(tmp) / Path(name).name).write_bytes(data)
            return await self.engine.golden(Path(tmp))

    def describe(self) -> dict[str, Any]:
        return {**self.engine.describe(), "replica": self.replica}


class _RayMetrics:
    """The replica's adapter statistics and queue through Ray's metrics (exported as ray_uniadapter_*)."""

    def __init__(self, replica: str) -> None:
        from ray.util.metrics import Gauge

        self.events = Gauge("uniadapter_adapter_events_total", "Adapter manager events, per replica.",
                            tag_keys=("event", "replica"))
        self.queue = Gauge("uniadapter_queue_depth", "Jobs waiting for the model, per replica.",
                           tag_keys=("replica",))
        self.replica = replica

    def update(self, snapshot: dict[str, Any]) -> None:
        for event, value in snapshot["stats"].items():
            self.events.set(float(value), tags={"event": event, "replica": self.replica})
        self.queue.set(float(snapshot["queued"]), tags={"replica": self.replica})


class RayEngine(Engine):
    """The engine of an ingress replica: calls to the model deployment, routed by adapter set."""

    def __init__(self, handle: DeploymentHandle, settings: Settings, metrics: ServiceMetrics,
                 app: str | None = None) -> None:
        config = source_config(settings.backbone)
        self.image_size = int(vision_config(config).image_size)  # type: ignore[arg-type]
        self.embed_dim = int(config.image_text_hidden_size)
        self.handle = handle
        self.multiplexed = settings.ray_router != "none"
        """route by set (multiplexed model ids); `ray_router: none` routes every call at random (benchmarks)"""
        self.board = board()
        self.app = app
        """the Serve application, whose model replicas Serve reports running (None: trust the board alone)"""
        self._tables: dict[str, dict[str, Any]] = {}
        self._running: set[str] | None = None
        self._ready = False
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="uniadapter-residency", daemon=True)
        metrics.adapter_events.collect_from(lambda: [({"event": k}, v) for k, v in sorted(self.stats().items())])
        metrics.golden_checks.collect_from(self._golden_counts)

    @property
    def ready(self) -> bool:
        return self._ready

    def start(self) -> None:
        self._ready = True
        self._reader.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        self._ready = False
        self._stop.set()

    def _read_loop(self) -> None:
        while not self._stop.wait(POST_INTERVAL_S):
            self._refresh()

    def _refresh(self) -> None:
        """The board's tables of the replicas Serve reports running (a replica killed outright posts no more
        and Serve reports it gone at once; the board forgets it a few post intervals later anyway)."""
        try:
            tables: dict[str, dict[str, Any]] = ray.get(self.board.read.remote(), timeout=5)
        except Exception:
            log.debug("cannot read the residency board", exc_info=True)
            return
        if self.app is not None:
            try:
                self._running = running_replicas(self.app)
            except Exception:  # the controller restarting: the board's deadline still drops the dead
                log.debug("cannot read Serve's replicas", exc_info=True)
                self._running = None
        running = self._running
        self._tables = tables if running is None else {k: t for k, t in tables.items() if k in running}

    async def _call(self, method: str, ref: str | None, *args: Any, **kwargs: Any) -> Any:
        """One call to a model replica that holds (or will load) `ref`; a replica that went away mid-call
        is replaced by another once, then 503."""
        with timing.span("replica"):
            return await self._call_replica(method, ref, *args, **kwargs)

    async def _call_replica(self, method: str, ref: str | None, *args: Any, **kwargs: Any) -> Any:
        routed = ref if ref and self.multiplexed else ""
        handle = self.handle.options(method_name=method, multiplexed_model_id=routed)
        for attempt in (1, 2):
            try:
                return await handle.remote(*args, **kwargs)
            except RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else e
                if isinstance(cause, GONE) and attempt == 1:
                    continue
                if isinstance(cause, GONE):
                    break
                raise cause from None
            except GONE:
                if attempt == 1:
                    continue
            except BackPressureError as e:
                raise OverloadedError(f"every model replica is busy ({e}); retry later", retry_after=1.0) from None
        raise ServerBusyError("a model replica went away during the request; retry", retry_after=1.0)

    async def run(self, job: Task[R]) -> R:
        result: R = await self._call("run", job.ref, job)
        return result

    async def load(self, ref: str) -> None:
        await self._call("residency_op", ref, "load", ref)

    async def unload(self, ref: str) -> None:
        await self._call("residency_op", ref, "unload", ref)

    async def pin(self, ref: str) -> None:
        await self._call("residency_op", ref, "pin", ref)

    async def unpin(self, ref: str) -> None:
        await self._call("residency_op", ref, "unpin", ref)

    def check_compatible(self, meta: AdapterSetMeta) -> None:
        self.handle.options(method_name="check_compatible").remote(meta).result()

    async def golden(self, folder: Path) -> bytes:
        files = {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE, GOLDEN_FILE)
                 if (folder / name).is_file()}
        record: bytes = await self._call("golden", None, files)
        return record

    def _golden_counts(self) -> list[tuple[dict[str, str], float]]:
        total: dict[tuple[str, str], float] = {}
        for table in self._tables.values():
            for subject, result, n in table.get("golden_counts", []):
                total[(subject, result)] = total.get((subject, result), 0.0) + float(n)
        return [({"subject": s, "result": r}, n) for (s, r), n in sorted(total.items())]

    def verification(self) -> dict[str, Any]:
        """Every model replica's outcomes: a set or backbone check that failed on any replica shows as failed."""
        tables = [t.get("verification") or {} for t in self._tables.values()]
        sets: dict[str, Any] = {}
        backbone = None
        for table in tables:
            for ref, outcome in (table.get("sets") or {}).items():
                if ref not in sets or outcome.get("result") == "mismatch":
                    sets[ref] = outcome
            mine = table.get("backbone")
            if mine is not None and (backbone is None or mine.get("result") == "mismatch"):
                backbone = mine
        return {"enabled": any(t.get("enabled") for t in tables), "backbone": backbone, "sets": sets,
                "replicas": len(tables)}


    def residency(self) -> dict[str, Any]:
        tables = list(self._tables.values())
        return {"rows": [row for t in tables for row in t["rows"]],
                "device_budget": sum(t["device_budget"] for t in tables),
                "cpu_budget": sum(t["cpu_budget"] for t in tables),
                "device_bytes": sum(t["device_bytes"] for t in tables),
                "cpu_bytes": sum(t["cpu_bytes"] for t in tables),
                "itemsize": max((t["itemsize"] for t in tables), default=4)}

    def stats(self) -> dict[str, float]:
        """Adapter manager statistics summed over the model replicas."""
        total: dict[str, float] = {}
        for table in self._tables.values():
            for event, value in table["stats"].items():
                total[event] = total.get(event, 0.0) + float(value)
        return total

    def queued(self) -> int:
        return int(sum(t.get("queued", 0) for t in self._tables.values()))

    def describe(self) -> dict[str, Any]:
        running = self._running
        return {**super().describe(), "model_replicas": len(self._tables) if running is None else len(running)}


# -- the application ------------------------------------------------------------------------------------

def model_deployment(settings: Settings) -> Any:
    """The model deployment: replicas, resources and autoscaling from the `ray_*` settings."""

    class Model(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=settings.ray_sets_per_replica)
        async def multiplexed(self, ref: str) -> _ResidentSet:
            # Serve's record that this replica serves `ref`; the model thread loads it with its first batch
            # (only the model thread leases sets, so a load here could not make room while batches run)
            self.registry.resolve(ref)  # unknown versions fail here, before any routing state changes
            return _ResidentSet(ref, self.engine, self.places)

    options: dict[str, Any] = {
        "name": "Model", "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "max_queued_requests": settings.ray_max_queued_requests,
        "ray_actor_options": {"num_cpus": settings.ray_model_cpus, "num_gpus": settings.ray_model_gpus},
        "health_check_period_s": 5, "health_check_timeout_s": 30,
        "graceful_shutdown_wait_loop_s": 1, "graceful_shutdown_timeout_s": settings.request_timeout_s + 5,
    }
    if settings.ray_router == "affinity":
        options["request_router_config"] = {
            "request_router_class": "uniadapter_serve.service.ray_router.AdapterAffinityRouter",
            "request_router_kwargs": {"sets_per_replica": settings.ray_sets_per_replica}}
    if settings.ray_max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas, "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests}
    else:
        options["num_replicas"] = settings.ray_model_replicas
    return serve.deployment(Model, **options)


def ingress_deployment(settings: Settings) -> Any:
    """The ingress deployment: the FastAPI app with a RayEngine, on CPU."""
    from uniadapter_serve.service.app import create_app

    def engine(s: Settings, registry: AdapterRegistry, metrics: ServiceMetrics) -> RayEngine:
        # the app's lifespan runs as the replica starts, before the deployment's constructor: look the
        # model deployment up by name in this application
        handle = serve.get_deployment_handle("Model", serve.get_replica_context().app_name)
        return RayEngine(handle, s, metrics, app=serve.get_replica_context().app_name)

    app = create_app(settings, engine=engine)

    @serve.ingress(app)
    class Ingress:
        def __init__(self, model: DeploymentHandle) -> None:
            self.model = model  # binding it makes Serve deploy the model with the ingress

        def check_health(self) -> None:
            core = getattr(app.state, "parts", None)
            if core is not None and not core.ready:
                raise RuntimeError("the ingress is not serving")

    return serve.deployment(Ingress, name="Ingress", num_replicas=settings.ray_ingress_replicas,
                            ray_actor_options={"num_cpus": settings.ray_ingress_cpus},
                            max_ongoing_requests=settings.ray_max_ongoing_requests,
                            graceful_shutdown_timeout_s=settings.request_timeout_s + 5)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application (`serve run uniadapter_serve.service.ray_app:build_app [key=value ...]`):
    settings from UNIADAPTER_* and `args` (lower-case setting names)."""
    settings = Settings(**(args or {}))
    model = model_deployment(settings).bind(settings_payload(settings))
    return ingress_deployment(settings).bind(model)
