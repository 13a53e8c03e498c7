"""Request and response models. Media travel as base64 in JSON or as files in multipart forms."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ADAPTER_FIELD = Field(
    None, description="Adapter set: 'name' (newest version) or 'name@version'; default: the task's default set; "
    "'none' for the bare backbone.", examples=[None],
)


class VqaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Base64 image (JPEG, PNG, WebP, GIF, BMP). In multipart: a file.")
    question: str = Field(min_length=1, examples=["what colour is the circle?"])
    mode: Literal["rank", "generate"] = Field(
        "rank", description="rank: over the set's answer list; generate: free text."
    )
    top_k: int = Field(3, ge=1, le=100, description="Answers returned (best first).")
    max_answer_length: int = Field(10, ge=1, le=30, description="Tokens, generate mode.")
    adapter: str | None = ADAPTER_FIELD


class VideoQaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video: str = Field(description="Base64 video (MP4, WebM, AVI, ...). In multipart: a file.")
    question: str = Field(min_length=1, examples=["which way does the square move?"])
    mode: Literal["rank", "generate"] = "rank"
    top_k: int = Field(3, ge=1, le=100)
    max_answer_length: int = Field(10, ge=1, le=30)
    num_frames: int | None = Field(None, ge=1, le=64, description="Frames sampled uniformly (default: the set's).")
    adapter: str | None = ADAPTER_FIELD


class AnswerItem(BaseModel):
    answer: str
    score: float = Field(description="Log-likelihood of the answer under the model.")


class VqaResponse(BaseModel):
    answer: str
    score: float
    alternatives: list[AnswerItem]
    mode: str
    adapter: str | None = Field(description="Exact adapter set (name@version) that produced the answer; null = bare.")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query_text: str | None = Field(None, description="Text query: finds images/videos.", examples=["a red circle"])
    query_image: str | None = Field(None, description="Base64 image query: finds texts. In multipart: a file.")
    collection: str | None = Field(None, description="Collection to search.")
    candidate_texts: list[str] | None = Field(None, description="Inline texts to rank for an image query.")
    candidate_images: list[str] | None = Field(
        None, description="Inline base64 images to rank for a text query. In multipart: files."
    )
    top_k: int = Field(10, ge=1, description="Results returned.")
    rerank_k: int = Field(0, ge=0, description="Re-score the top rerank_k by image-text matching (ITM).")
    adapter: str | None = ADAPTER_FIELD


class RetrieveHit(BaseModel):
    id: str
    score: float = Field(description="ITC cosine similarity (or ITM match probability when re-ranked).")
    itc_score: float
    itm_score: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class RetrieveResponse(BaseModel):
    results: list[RetrieveHit]
    adapter: str | None
    collection: str | None = None


class ErrorResponse(BaseModel):
    error: str = Field(description="Error class, e.g. MediaTooLargeError.")
    detail: str = Field(description="What is wrong, naming the field or resource.")


class AdapterInfo(BaseModel):
    ref: str
    name: str
    version: str
    task: str
    bottleneck: int
    tunable_parameters: int
    percent_of_backbone: float
    bytes: int
    created: str
    newest: bool
    resident: bool
    pinned: bool
    tier: list[str]
    answer_list_size: int | None


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    errors: dict[str, str] = Field(description="Folders that look like sets but could not be read.")
    device_budget_bytes: int
    device_bytes: int
    cpu_budget_bytes: int
    cpu_bytes: int


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(examples=["shapes"])
    kind: Literal["image", "video", "text"] = "image"
    adapter: str | None = Field(
        None, description="Retrieval set that embeds items and queries ('name' pins the newest version now); "
        "default: the default retrieval set; 'none' for the bare backbone."
    )
    index: str = Field("flat", description="'flat' (exact) or a FAISS factory string, e.g. 'IVF1024,Flat', 'HNSW32'.")


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=256, description="External id (default: content hash).")
    image: str | None = Field(None, description="Base64 image (image collections).")
    video: str | None = Field(None, description="Base64 video (video collections).")
    path: str | None = Field(None, description="File under the media root, instead of uploading it.")
    text: str | None = Field(None, description="The text (text collections).")
    metadata: dict[str, Any] = Field(default_factory=dict)


class ItemsAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1)


class ItemsAdded(BaseModel):
    collection: str
    ids: list[str]
    items: int


class ReindexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="Retrieval set to re-embed with ('name' = its newest version).")


class CollectionStats(BaseModel):
    name: str
    kind: str
    adapter: str
    index: str
    dim: int
    items: int
    indexed: int
    generation: int
    reindex_target: str | None
    exact_fallback: bool
