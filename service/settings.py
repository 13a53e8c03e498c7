"""Service configuration: one pydantic-settings class, env prefix UNIADAPTER_ (e.g. UNIADAPTER_PORT)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024
FRAMES_HELD = 8
"""Full-size frames one video decode holds at most: `model.media.video.FRAMES_HELD` (a unit test keeps them
equal), written out here so loading the configuration never loads PyAV, FFmpeg or torch."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNIADAPTER_", env_file=None, extra="ignore")

    # -- model ---------------------------------------------------------------------------------
    backbone: str = Field(
        "demo",
        description="Backbone source: 'demo' (embedded), a bundled config name, a transformers-format "
        "folder, or a hub id (needs network).",
    )
    data_root: Path = Field(Path("data"), description="Data volume: adapter sets, collections.")
    adapters_root: Path | None = Field(
        None, description="Adapter sets: one sub-folder per name, versions inside; default DATA_ROOT/adapters."
    )
    media_root: Path | None = Field(
        None, description="Files that collection items may name by path (nothing outside it); default DATA_ROOT/media."
    )
    redis_url: str | None = Field(
        None, description="redis://host:port/db: shared embedding cache and events between replicas."
    )
    database_url: SecretStr | None = Field(
        None, description="postgresql://user:password@host:port/db: collections in PostgreSQL, shared by replicas on "
        "several hosts (default: SQLite files under DATA_ROOT/collections, for replicas on one host).",
    )
    redis_timeout_s: float = Field(
        0.5, gt=0, le=30, description="Socket timeout of Redis calls: the most a hung Redis adds to a request."
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = Field(
        "auto", description="'auto' (fp16 on CUDA; on a CPU bf16 where the backbone, timed at start, runs at least "
        "1.2x faster in bf16 than in fp32 for one request and for a full batch, else fp32: /readyz?verbose=true shows "
        "the timing), 'float32', 'float16', 'bfloat16'.",
    )
    vit_bf16_from: int | None = Field(None, ge=1, le=4096, description=(
        "CPU, float32 backbone: run the ViT's batches of at least this many frames under bfloat16 autocast (the "
        "linears and attention in bf16; residual stream, LayerNorms and output in fp32; the text towers stay fp32). "
        "The demo's vision stage then costs 1.4-1.5x less CPU on 32 images or two 8-frame clips (bench/"
        "vit_autocast.py), but its relation captions lost ~0.05 R@1 and VQA at load gains nothing; outputs are "
        "checked with bf16's tolerances. Unset: off. Set it alike on every replica: it is never timed or guessed."))
    faiss_device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Collection indexes: 'auto' puts flat indexes on the backbone's GPU when FAISS passes "
        "a self-test there (else the CPU, with a warning in /readyz); 'cpu'; 'gpu' (the same as auto, but a "
        "failed self-test is logged as an error).",
    )
    answer_list: Path | None = Field(
        None, description="JSON list of VQA candidate answers for sets without their own (default: the demo list)."
    )
    default_retrieval_adapter: str | None = Field(None, description="Set used by /retrieve when none is named.")
    default_vqa_adapter: str | None = Field(None, description="Set used by /vqa when none is named.")
    default_videoqa_adapter: str | None = Field(None, description="Set used by /videoqa when none is named.")
    demo_content: bool = Field(
        True, description="With backbone 'demo': publish the shipped demo sets, use them when a request names "
        "none, and create the demo-images / demo-videos collections (each only if missing).",
    )
    num_frames: int = Field(8, ge=1, le=64, description="Frames sampled per video when the set does not say.")

    # -- adapter budgets -------------------------------------------------------------------------
    device_adapter_budget_mb: float = Field(2048, gt=0, description="Bytes of adapter sets kept on the device.")
    cpu_adapter_budget_mb: float = Field(4096, ge=0, description="Bytes of CPU copies of evicted sets.")

    # -- verification ----------------------------------------------------------------------------
    golden_check: bool = Field(True, description=(
        "Recompute each set's golden record (golden.json: its outputs on fixed probes) on this device and dtype "
        "before it first serves, and the backbone's at start; a mismatch refuses the set (409) or keeps the "
        "server unready."))
    golden_required: bool = Field(False, description="Refuse sets that have no golden record (else they serve "
                                  "unverified, shown in /readyz?verbose=true).")
    self_check_rate: float = Field(0.001, ge=0, le=1, description=(
        "Share of mixed-set batches in which one sampled row is recomputed alone afterwards and compared "
        "(a mismatch is logged with the sets involved and counted in uniadapter_self_checks); 0 = off."))

    # -- batching --------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="A batch closes at this many jobs ...")
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="... or when its oldest job waited this long.")
    max_vision_batch_size: int | None = Field(
        None, ge=1, le=1024, description="Cap on jobs per vision batch (CPUs gain little past ~8-12 images)."
    )
    model_workers: int | None = Field(None, ge=1, le=16, description=(
        "Model threads, each running one batch at a time from the same queues; a batch alone gets every intra-op "
        "thread, batches side by side share them (default: 2 on the CPU, where a second batch overlaps the "
        "first's Python-bound steps and, with large models, uses the cores one intra-op thread leaves idle; "
        "1 on a GPU)."))
    parallel_min_mmacs: float = Field(64.0, ge=0, description=(
        "CPU: a batch whose forward step does fewer million multiply-adds runs on one intra-op thread (splitting "
        "small matmuls costs more than it saves: the demo model's decoding is 1.1-1.35x slower on 2 threads); "
        "0 = always all threads."))
    split_batches: bool = Field(True, description=(
        "CPU, several model workers: a batch that closes while other workers idle is shared out among them when "
        "each share still has PARALLEL_MIN_MMACS of work (at one intra-op thread per worker, the only way a lone "
        "batch uses more than one core)."))
    processes: int = Field(1, ge=1, le=64, description=(
        "Server processes on one port (`uniadapter serve`): each its own model, batcher and FAISS indexes, as "
        "replicas on one host sharing DATA_ROOT; the kernel spreads connections among them (SO_REUSEPORT). A small "
        "model on the CPU is Python-bound (the GIL: one process keeps about one core busy), and a second process "
        "uses the next core; a large one is not, and gains nothing. Each process gets TORCH_THREADS, by default "
        "the cores divided among the processes. /metrics and /readyz answer for the process that took the "
        "connection."))
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads (default: torch's choice; 1 suits small shared hosts)."
    )
    rank_k: int = Field(128, ge=1, le=4096, description=(
        "VQA rank mode: candidates from the answer list scored in full after the first-token pruning (BLIP and "
        "UniAdapter's k_test = 128; capped by the list). A set's `extra.rank_k` overrides it, up to MAX_RANK_K."))
    max_rank_k: int = Field(1024, ge=1, le=4096, description=(
        "Most candidates a set's `extra.rank_k` may have scored in full (at least RANK_K): publishing a set that "
        "asks for more is refused (409); one already on disk is clamped to it. Ranking BLIP's 3,128 answers on "
        "BLIP-base costs one CPU thread about 1 s / +36 MB at k = 128, 6 s / +425 MB at 1024, 19 s / +1.2 GB for "
        "the whole list."))
    max_answer_list: int = Field(20_000, ge=1, description=(
        "Most answers in a set's own VQA answer list (BLIP's has 3,128): publishing a set with more is refused "
        "(409), and a set already on disk with more answers 409 (cutting its list would change its answers)."))
    max_queue: int = Field(512, ge=1, description="Jobs waiting over all stages before 429.")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="Per-request deadline (504 after it).")

    # -- limits ----------------------------------------------------------------------------------
    max_request_bytes: int = Field(64 * MB, ge=1024, description="Largest request body.")
    max_image_bytes: int = Field(10 * MB, ge=1024, description="Largest image file.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest image (width x height): bomb protection.")
    max_video_bytes: int = Field(50 * MB, ge=1024, description="Largest video file.")
    max_video_seconds: float = Field(600.0, gt=0, description="Longest video.")
    max_video_pixels: int = Field(1920 * 1080, ge=1, description="Largest video frame (width x height).")
    moment_window_s: float = Field(8.0, gt=0, description=(
        "Moment collections: the window (seconds) a collection created with `\"moments\": {}` cuts its videos "
        "into; each window is sampled like a clip and embedded."))
    moment_stride_s: float = Field(4.0, gt=0, description="Moment collections: the default step between windows.")
    max_moment_video_seconds: float = Field(3600.0, gt=0, description=(
        "Longest video a moment collection takes (its own limit, above MAX_VIDEO_SECONDS: long videos are what "
        "moments are for)."))
    max_moment_video_bytes: int = Field(512 * MB, ge=1024, description=(
        "Largest video file a moment collection takes (a path under the media root; uploads are also bounded by "
        "MAX_REQUEST_BYTES)."))
    moment_add_timeout_s: float = Field(1800.0, gt=0, le=86_400, description=(
        "Deadline of an add to a moment collection, and of each re-index chunk of one (REQUEST_TIMEOUT_S is for one "
        "clip: a long video's windows take minutes to embed on a CPU)."))
    max_moments_per_video: int = Field(2048, ge=3, le=65536, description=(
        "Most moments one video may have: a collection whose window and stride would cut a video of "
        "MAX_MOMENT_VIDEO_SECONDS into more is refused at creation."))
    max_text_chars: int = Field(512, ge=1, description="Longest question or query text.")
    max_top_k: int = Field(100, ge=1, description="Largest top_k.")
    max_candidates: int = Field(64, ge=1, description="Most inline candidates in one /retrieve request.")
    max_items_per_request: int = Field(256, ge=1, description="Most items in one add-items request.")
    decode_budget_mpix: float = Field(
        100.0, gt=0, description="Megapixels all uploads being decoded may hold at once (about 8 bytes each at "
        "peak); decodes past it wait. Must fit the largest image (MAX_IMAGE_PIXELS) and video frame x 8.",
    )
    decode_wait_s: float = Field(10.0, ge=0, description=(
        "Longest wait of a task route's decode (/vqa, /videoqa, /retrieve, search) for the decode budget before "
        "503; bulk work waits up to the request deadline instead."))
    decode_bulk_share: float = Field(0.5, gt=0, le=1, description=(
        "Share of the decode budget bulk work (collection adds, re-indexing, thumbnails) may hold at once; the "
        "rest is kept for task routes, which also go first. One bulk decode larger than the share runs alone."))
    body_budget_mb: float = Field(96.0, gt=0, description=(
        "Megabytes of request bodies all requests may hold at once, from their first byte read to their answer "
        "(bodies over 64 KB; one is charged its Content-Length before it is read, a chunked one as it arrives; "
        "about 4 bytes of memory each at peak: body, parsed text, decoded media); bodies past it wait. A body "
        "larger than the budget runs alone."))
    body_wait_s: float = Field(10.0, ge=0, description="Longest wait for the body budget before 503 (Retry-After).")
    header_timeout_s: float = Field(10.0, ge=0, description=(
        "A request's line and headers must arrive within this many seconds (from the connection opening or the "
        "request's first byte), else 408 and the connection is closed; 0 = no limit."))
    body_timeout_s: float = Field(10.0, ge=0, description=(
        "A request body must bring BODY_MIN_RATE_KBPS x this many KB in every window of this many seconds while "
        "it is read (time the server spends not reading, e.g. waiting for the body budget, does not count), "
        "else 408 and the connection is closed; 0 = no limit."))
    body_min_rate_kbps: float = Field(
        1.0, ge=0, description="Slowest request body accepted, in KB/s (see BODY_TIMEOUT_S).")
    max_connections: int = Field(1000, ge=0, description=(
        "Open connections at once; a connection past it is answered 503 and closed at once; 0 = no limit."))
    max_connections_per_client: int = Field(128, ge=0, description=(
        "Open connections from one client address (an IPv6 /64 counts as one); past it, 503 and closed; 0 = no "
        "limit. Behind a reverse proxy every client has the proxy's address: raise it, or 0."))

    # -- auth ------------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="If set, task routes need it (Bearer or X-API-Key).")
    admin_key: SecretStr | None = Field(None, description=(
        "If set, adapter/collection writes need it. With API_KEY set and no ADMIN_KEY, every write is refused "
        "(403): auth fails closed."))
    allowed_hosts: str = Field("localhost,127.0.0.1,[::1]", description=(
        "Comma-separated host names (no ports; HOST is added unless 0.0.0.0/::) that routes no key protects "
        "accept in Host and Origin: with no keys, a page on another origin or a DNS-rebinding one gets 403. "
        "'*' turns the check off."))

    # -- Ray Serve (service/ray_app.py) ------------------------------------------------------------
    ray_model_replicas: int = Field(
        1, ge=1, description="Ray: model replicas (one backbone each), when not autoscaling.")
    ray_min_replicas: int = Field(1, ge=0, description="Ray: fewest model replicas when autoscaling.")
    ray_max_replicas: int | None = Field(None, ge=1, description="Ray: most model replicas; set to autoscale.")
    ray_target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ray: requests in flight per model replica the autoscaler aims at.")
    ray_model_gpus: float = Field(0.0, ge=0, description="Ray: GPUs per model replica (1 on a GPU cluster).")
    ray_model_cpus: float = Field(1.0, ge=0, description="Ray: CPUs per model replica.")
    ray_ingress_replicas: int = Field(1, ge=1, description="Ray: ingress replicas (HTTP, decoding, collections).")
    ray_ingress_cpus: float = Field(1.0, ge=0, description="Ray: CPUs per ingress replica.")
    ray_sets_per_replica: int = Field(
        8, ge=1, description="Ray: adapter sets a model replica keeps for multiplexed routing (the adapter "
        "budget still caps the bytes).")
    ray_set_turn_s: float = Field(
        2.0, gt=0, description="Ray: a replica asked for more sets than RAY_SETS_PER_REPLICA at once (a survivor "
        "of a killed replica) serves them in turns of at least this many seconds instead of reloading them for "
        "each batch; a request that waits half its deadline for its turn gets 503 with Retry-After.")
    ray_router: Literal["affinity", "serve", "none"] = Field(
        "affinity", description="Ray: how model calls find a replica: 'affinity' (a set goes where it is resident; "
        "new sets spread at once), 'serve' (Serve's own multiplexed routing), 'none' (any replica: benchmarks).")
    ray_max_ongoing_requests: int = Field(64, ge=1, description="Ray: requests a replica takes at once.")
    ray_max_queued_requests: int = Field(
        512, ge=-1, description="Ray: requests queued for the model deployment before 429 (-1: no limit).")

    # -- server ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port uvicorn binds.")
    log_level: str = Field("info", description="Python log level.")

    @model_validator(mode="after")
    def _default_paths(self) -> Settings:
        budget = self.decode_budget_pixels
        for name, need in (("MAX_IMAGE_PIXELS", self.max_image_pixels),
                           (f"MAX_VIDEO_PIXELS x {FRAMES_HELD}", self.max_video_pixels * FRAMES_HELD)):
            if need > budget:
                raise ValueError(f"DECODE_BUDGET_MPIX ({self.decode_budget_mpix:g}) is smaller than {name} "
                                 f"({need / 1e6:g} Mpix): the largest allowed upload could never decode")
        for name, value in (("MOMENT_WINDOW_S", self.moment_window_s), ("MOMENT_STRIDE_S", self.moment_stride_s)):
            if value < self.min_moment_stride_s:
                raise ValueError(f"{name} ({value:g} s) is under MAX_MOMENT_VIDEO_SECONDS / "
                                 f"(MAX_MOMENTS_PER_VIDEO - 2) ({self.min_moment_stride_s:.4g} s): a long video "
                                 "would have too many moments")
        if self.rank_k > self.max_rank_k:
            raise ValueError(f"RANK_K ({self.rank_k}) is over MAX_RANK_K ({self.max_rank_k}): raise MAX_RANK_K too")
        if self.adapters_root is None:
            self.adapters_root = self.data_root / "adapters"
        if self.media_root is None:
            self.media_root = self.data_root / "media"
        return self

    @property
    def min_moment_stride_s(self) -> float:
        """The shortest stride a moment collection may have: a video of MAX_MOMENT_VIDEO_SECONDS then has at most
        MAX_MOMENTS_PER_VIDEO moments (duration / stride strided windows, plus a tail window)."""
        return self.max_moment_video_seconds / (self.max_moments_per_video - 2)

    @property
    def decode_budget_pixels(self) -> int:
        return int(self.decode_budget_mpix * 1_000_000)

    @property
    def adapters_dir(self) -> Path:
        assert self.adapters_root is not None
        return self.adapters_root

    @property
    def media_dir(self) -> Path:
        assert self.media_root is not None
        return self.media_root
