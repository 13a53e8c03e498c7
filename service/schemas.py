"""Request and response models. Media travel as base64 in JSON or as files in multipart forms."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict

from uniadapter_serve.adapters.registry import NAME_BODY
from uniadapter_serve.service.validation import (
    METADATA_MAX_BYTES,
    METADATA_MAX_DEPTH,
    ItemId,
    Metadata,
    StoredText,
    check_metadata,
    json_error,
    readable_metadata,
)

# Patterns are declared in the schema only: the server checks the same rules itself, with messages that
# say what is wrong ("must contain at least one word") rather than quoting a regular expression. They are
# ECMA-262 patterns, anchored with ^...$ (the end of the string there); the server's checks match whole strings
# (fullmatch or \A...\Z: in Python `$` also matches before a final newline).
NAME_PATTERN = rf"^{NAME_BODY}$"
"""Adapter-set and collection names (ASCII: they are folder names on every replica's volume)."""
ADAPTER_PATTERN = rf"^(none|bare|{NAME_BODY}(@[0-9a-f]{{4,64}})?)$"
BASE64_PATTERN = r"^(data:[A-Za-z0-9.+/-]+;base64,)?[A-Za-z0-9+/]+={0,2}$"
WORD_PATTERN = r"\w"
"""a question or query must hold at least one word (punctuation is dropped before tokenising)"""
PATH_PATTERN = r"^(?!/)(?!(.*/)?\.\.(/|$))[^\x00]+$"
"""relative, no '..' segment, no NUL"""
INDEX_PATTERN = r"^(flat|HNSW(8|16|32|64)(,Flat)?|IVF[1-9][0-9]{0,5},(Flat|SQ8))$"

NAME: JsonDict = {"pattern": NAME_PATTERN}
REF: JsonDict = {"pattern": ADAPTER_PATTERN}
BASE64: JsonDict = {"pattern": BASE64_PATTERN}
WORD: JsonDict = {"pattern": WORD_PATTERN}
PATH: JsonDict = {"pattern": PATH_PATTERN}
INDEX: JsonDict = {"pattern": INDEX_PATTERN}

ADAPTER_FIELD = Field(
    None, description="Adapter set: 'name' (newest version) or 'name@version'; default: the task's default set; "
    "'none' for the bare backbone.", examples=[None], json_schema_extra=REF,
)


def _omit_not_null(schema: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Optional fields are omitted, not sent as null: say so (the server takes null as omitted too), so
    that `required` in the one-of rules below means "given"."""
    for name in fields:
        prop = schema["properties"][name]
        branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
        if branches:
            prop.update(branches[0])
        prop.pop("default", None)


def _exactly_one_of(schema: dict[str, Any], fields: tuple[str, ...]) -> None:
    _omit_not_null(schema, fields)
    schema["oneOf"] = [{"required": [f], "properties": {g: False for g in fields if g != f}} for f in fields]


def _retrieve_schema(schema: dict[str, Any]) -> None:
    """A text query ranks a collection or candidate_images; an image query a collection or candidate_texts; a
    video query a collection."""
    fields = ("query_text", "query_image", "query_video", "collection", "candidate_texts", "candidate_images")
    _omit_not_null(schema, (*fields, "filter"))
    schema["oneOf"] = [{"required": list(pair), "properties": {f: False for f in fields if f not in pair}}
                       for pair in (("query_text", "collection"), ("query_text", "candidate_images"),
                                    ("query_image", "collection"), ("query_image", "candidate_texts"),
                                    ("query_video", "collection"))]


RANK_SCORE_FIELD: Any = Field("likelihood", description=(
    "Rank mode: how candidates are scored; likelihood: the answer's log-likelihood; blip: BLIP's and UniAdapter's "
    "ranking score (minus the label-smoothed cross-entropy), as their papers evaluate."))

NUM_BEAMS_FIELD = Field(1, ge=1, le=8, description=(
    "Generate mode: beam search width (BLIP and UniAdapter answer with 3; 1 = greedy). The other finished "
    "beams come back as alternatives (up to top_k)."))


def _beams_schema(schema: dict[str, Any]) -> None:
    """num_beams > 1 only with mode 'generate', said in the schema too (clients and fuzzers read it)."""
    schema["anyOf"] = [{"properties": {"num_beams": {"maximum": 1}}},
                       {"required": ["mode"], "properties": {"mode": {"const": "generate"}}}]


def _check_beams(body: Any) -> Any:
    if body.num_beams > 1 and body.mode != "generate":
        raise ValueError(f"num_beams={body.num_beams} applies to mode 'generate' (mode is {body.mode!r})")
    return body


class VqaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_beams_schema)

    image: str = Field(description="Base64 image (JPEG, PNG, WebP, GIF, BMP). In multipart: a file.",
                       min_length=1, json_schema_extra=BASE64)
    question: str = Field(min_length=1, json_schema_extra=WORD, examples=["what colour is the circle?"])
    mode: Literal["rank", "generate"] = Field(
        "rank", description="rank: over the set's answer list; generate: free text."
    )
    top_k: int = Field(3, ge=1, le=100, description="Answers returned (best first).")
    max_answer_length: int = Field(10, ge=1, le=30, description="Tokens, generate mode.")
    num_beams: int = NUM_BEAMS_FIELD
    rank_score: Literal["likelihood", "blip"] = RANK_SCORE_FIELD
    adapter: str | None = ADAPTER_FIELD

    @model_validator(mode="after")
    def _beams_need_generate(self) -> VqaRequest:
        return _check_beams(self)


SECONDS: Any = {"ge": 0, "le": 86_400, "allow_inf_nan": False}


def _videoqa_schema(schema: dict[str, Any]) -> None:
    """An upload or a collection item (with its moment, or a span: not both); num_beams as /vqa."""
    _beams_schema(schema)
    _omit_not_null(schema, ("video", "collection", "item", "moment", "start_s", "end_s"))
    schema["oneOf"] = [
        {"required": ["video"], "properties": {"collection": False, "item": False, "moment": False}},
        {"required": ["collection", "item"], "properties": {"video": False, "moment": False}},
        {"required": ["collection", "item", "moment"],
         "properties": {"video": False, "start_s": False, "end_s": False}},
    ]


class VideoQaRequest(BaseModel):
    """A question about a video: an upload (`video`), or a collection's item (`collection` + `item`); the whole
    video, a part of it (`start_s` / `end_s`), or one of the item's moments (`moment`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_videoqa_schema)

    video: str | None = Field(None, description="Base64 video (MP4, WebM, AVI, ...). In multipart: a file. Or name "
                              "a collection item instead.", min_length=1, json_schema_extra=BASE64)
    collection: str | None = Field(None, description="Ask about an item of this video collection (with `item`).",
                                   json_schema_extra=NAME)
    item: str | None = Field(None, description="The item's id (with `collection`).", min_length=1, max_length=256)
    moment: int | None = Field(None, ge=0, description="One of the item's moments (its index, as /retrieve "
                               "returns it), in a moment collection.")
    start_s: float | None = Field(None, description="Ask about the part of the video from this second (default: "
                                  "its start).", **SECONDS)
    end_s: float | None = Field(None, description="... to this second (default: its end).", **SECONDS)
    question: str = Field(min_length=1, json_schema_extra=WORD, examples=["what colour does the square become?"])
    mode: Literal["rank", "generate"] = "rank"
    top_k: int = Field(3, ge=1, le=100)
    max_answer_length: int = Field(10, ge=1, le=30)
    num_beams: int = NUM_BEAMS_FIELD
    rank_score: Literal["likelihood", "blip"] = RANK_SCORE_FIELD
    num_frames: int | None = Field(None, ge=1, le=64, description="Frames sampled uniformly (default: the set's).")
    adapter: str | None = ADAPTER_FIELD

    @model_validator(mode="after")
    def _beams_need_generate(self) -> VideoQaRequest:
        return _check_beams(self)

    @model_validator(mode="after")
    def _one_video(self) -> VideoQaRequest:
        """Said in the schema too (`_videoqa_schema`); start_s before end_s and within the video are checked
        against the video itself (`end_s: ...`, `start_s: ...`)."""
        if (self.video is None) == (self.collection is None):
            raise ValueError("give exactly one of video (an upload) and collection + item")
        if (self.collection is None) != (self.item is None):
            raise ValueError("collection and item go together")
        if self.moment is not None and self.collection is None:
            raise ValueError("moment: names a moment of a collection item (give collection and item)")
        if self.moment is not None and (self.start_s is not None or self.end_s is not None):
            raise ValueError("give either a moment or start_s / end_s, not both")
        return self


class AnswerItem(BaseModel):
    answer: str
    score: float = Field(description="Log-likelihood of the answer under the model.")


class VqaResponse(BaseModel):
    answer: str
    score: float
    alternatives: list[AnswerItem]
    mode: str
    adapter: str | None = Field(description="Exact adapter set (name@version) that produced the answer; null = bare.")


MetadataValue = str | int | float | bool
FilterMetadata = Annotated[dict[str, MetadataValue], AfterValidator(check_metadata)]


class RetrieveFilter(BaseModel):
    """Every condition given must hold (AND)."""

    model_config = ConfigDict(extra="forbid")

    caption_contains: str | None = Field(
        None, min_length=1, description="Case-insensitive substring of the item's metadata 'caption' (of the text, "
        "for text items).", examples=["circle"])
    metadata: FilterMetadata | None = Field(
        None, description="Equality on metadata keys: a number matches a number of the same value, a string the "
        "same string, a boolean the same boolean.", examples=[{"source": "demo"}])


class RetrieveRequest(BaseModel):
    """One query (query_text or query_image) against a collection or inline candidates of the other modality."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_retrieve_schema)

    query_text: str | None = Field(None, description="Text query: finds images/videos.", examples=["a red circle"],
                                   min_length=1, json_schema_extra=WORD)
    query_image: str | None = Field(None, description="Base64 image query: finds texts. In multipart: a file.",
                                    min_length=1, json_schema_extra=BASE64)
    collection: str | None = Field(None, description="Collection to search.", json_schema_extra=NAME)
    candidate_texts: list[Annotated[str, Field(min_length=1, json_schema_extra=WORD)]] | None = Field(
        None, min_length=1, description="Inline texts to rank for an image query.")
    candidate_images: list[Annotated[str, Field(min_length=1, json_schema_extra=BASE64)]] | None = Field(
        None, min_length=1, description="Inline base64 images to rank for a text query. In multipart: files."
    )
    query_video: str | None = Field(None, description="Base64 video query: finds images or videos (ITC vision "
                                    "embeddings), or texts, of a collection. In multipart: a file.",
                                    min_length=1, json_schema_extra=BASE64)
    filter: RetrieveFilter | None = Field(None, description="Only hits whose metadata pass (applied inside the "
                                          "search: top_k hits come back whenever that many items pass).")
    top_k: int = Field(10, ge=1, description="Results returned.")
    rerank_k: int = Field(0, ge=0, description="Re-score the top rerank_k by image-text matching (ITM); text <-> "
                          "image/video only (ignored when query and hits are both images or videos).")
    group_by_item: bool = Field(True, description="Moment collections: the best moment of each video (true), or "
                                "every moment, best first (false). Other collections ignore it.")
    adapter: str | None = ADAPTER_FIELD

    @field_validator("filter", mode="before")
    @classmethod
    def _filter_from_form(cls, value: Any) -> Any:
        """In multipart forms the filter comes as JSON text: parsed as JSON bodies are (pydantic-core, with its
        nesting limit; `json.loads` recurses until RecursionError)."""
        if isinstance(value, str):
            try:
                return pydantic_core.from_json(value)
            except ValueError as e:
                raise ValueError(f"not valid JSON ({json_error(str(e))})") from e
        return value


METADATA_ERROR_FIELD: Any = Field(None, description="Why `metadata` is empty though the item has some: it was stored "
                                  "before today's limits and cannot be sent; null normally.")


class _SendsMetadata(BaseModel):
    """A response carrying an item's stored metadata: metadata that cannot be sent back (a row from before the
    limits held) goes out as {} with the reason, so one such item never turns a listing or a search into a 500."""

    metadata: dict[str, Any]
    metadata_error: str | None

    @model_validator(mode="after")
    def _sendable(self) -> _SendsMetadata:
        self.metadata, error = readable_metadata(self.metadata)
        self.metadata_error = self.metadata_error or error
        return self


class RetrieveHit(_SendsMetadata):
    id: str
    score: float = Field(description="ITC cosine similarity (or ITM match probability when re-ranked).")
    itc_score: float
    itm_score: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    metadata_error: str | None = METADATA_ERROR_FIELD
    media_url: str | None = Field(None, description="The hit's media, relative to the server (collection images "
                                  "and videos; null for texts and inline candidates).")
    thumbnail_url: str | None = Field(None, description="Its thumbnail (add ?size=N to choose another side); of the "
                                      "moment's middle frame for a moment.")
    moment: int | None = Field(None, description="Moment collections: which of the video's moments matched (pass "
                               "it to /videoqa with the collection and item).")
    start_s: float | None = Field(None, description="Moment collections: where the moment starts (seconds).")
    end_s: float | None = Field(None, description="... and ends.")


class RetrieveResponse(BaseModel):
    results: list[RetrieveHit]
    adapter: str | None
    collection: str | None = None


class ItemInfo(_SendsMetadata):
    id: str
    kind: Literal["image", "video", "text"]
    metadata: dict[str, Any]
    size: int = Field(description="Bytes of the media (characters of the text, for text items).")
    content_type: str | None = Field(description="Of the media; null for text items.")
    sha256: str | None
    added: float = Field(description="When the item was added (seconds since the epoch, UTC).")
    adapter: str = Field(description="The adapter version its embedding was made with (the collection's; 'none' = "
                         "bare backbone).")
    text: str | None = Field(None, description="The text, for text items.")
    media_url: str | None = None
    thumbnail_url: str | None = None
    metadata_error: str | None = METADATA_ERROR_FIELD
    moments: list[MomentSpan] | None = Field(None, description="Moment collections: the video's moments in order "
                                             "(a moment's index is its place here).")


class MomentSpan(BaseModel):
    start_s: float
    end_s: float


class ItemPage(BaseModel):
    collection: str
    items: list[ItemInfo]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page; null at the end.")


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
    created: str = Field(description="When the set was trained (from its adapter_config.json).")
    published: str = Field(description="When this server last accepted a publish of this version; the newest "
                           "version of a name is the most recently published one.")
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


def _collection_schema(schema: dict[str, Any]) -> None:
    """Moments are for video collections: said in the schema too."""
    _omit_not_null(schema, ("moments",))
    schema["anyOf"] = [{"properties": {"moments": False}},
                       {"required": ["kind"], "properties": {"kind": {"const": "video"}}}]


class CollectionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_collection_schema)

    name: str = Field(examples=["shapes"], json_schema_extra=NAME)
    kind: Literal["image", "video", "text"] = "image"
    adapter: str | None = Field(
        None, description="Retrieval set that embeds items and queries ('name' pins the newest version now); "
        "default: the default retrieval set; 'none' for the bare backbone.", json_schema_extra=REF,
    )
    index: str = Field("flat", description="'flat' (exact), 'IVFn,Flat', 'IVFn,SQ8', 'HNSWm' (the pattern); the "
                       "server also takes any other FAISS factory string it can build (e.g. 'IVF1024,PQ32').",
                       json_schema_extra=INDEX)
    moments: MomentsIn | None = Field(None, description="Video collections: index moments (windows of each video, "
                                      "each embedded) instead of one embedding per video; `{}` takes the server's "
                                      "MOMENT_WINDOW_S / MOMENT_STRIDE_S.")


class MomentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window_s: float | None = Field(None, gt=0, le=86_400, allow_inf_nan=False, description="Seconds per moment "
                                   "(default MOMENT_WINDOW_S; at most MAX_MOMENT_VIDEO_SECONDS, at least the shortest "
                                   "stride); a video no longer than this is one moment.")
    stride_s: float | None = Field(None, gt=0, le=86_400, allow_inf_nan=False, description="Seconds from one "
                                   "moment's start to the next (default: MOMENT_STRIDE_S, or window_s if shorter; "
                                   "longer than window_s leaves gaps: a sparse index). At least "
                                   "MAX_MOMENT_VIDEO_SECONDS / (MAX_MOMENTS_PER_VIDEO - 2), so no video has more than "
                                   "MAX_MOMENTS_PER_VIDEO.")


class MomentsInfo(BaseModel):
    window_s: float
    stride_s: float
    indexed: int = Field(description="Moments in this replica's index.")


class ItemIn(BaseModel):
    """Exactly one of image, video, path (media collections) or text (text collections)."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra=lambda s: _exactly_one_of(s, ("image", "video", "path", "text")))

    id: ItemId | None = Field(None, description="External id (default: a hash of the content): 1-256 characters, "
                              "'/' allowed; no control characters, not '.' or '..', not ending in '/media' or "
                              "'/thumbnail'.")
    image: str | None = Field(None, description="Base64 image (image collections).", min_length=1,
                              json_schema_extra=BASE64)
    video: str | None = Field(None, description="Base64 video (video collections).", min_length=1,
                              json_schema_extra=BASE64)
    path: str | None = Field(None, description="File under the media root, instead of uploading it.", min_length=1,
                             max_length=1024, json_schema_extra=PATH)
    text: StoredText | None = Field(None, description="The text (text collections).")
    metadata: Metadata = Field(default_factory=dict, description=(
        f"Any JSON object: at most {METADATA_MAX_DEPTH} levels of nesting and about {METADATA_MAX_BYTES // 1024} KiB "
        "as JSON."))


class ItemsAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1)


class ItemsAdded(BaseModel):
    collection: str
    uid: str = Field(description="The identity of the collection the items were committed to (a collection "
                     "deleted and created again under its name has another).")
    ids: list[str]
    items: int


class ReindexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="Retrieval set to re-embed with ('name' = its newest version).",
                         json_schema_extra=REF)


class CollectionStats(BaseModel):
    name: str
    uid: str = Field(description="The collection's identity: one deleted and created again under this name has "
                     "another.")
    kind: str
    adapter: str
    index: str
    dim: int
    items: int
    indexed: int
    generation: int
    reindex_target: str | None
    exact_fallback: bool
    store_available: bool = Field(True, description="False while the store (PostgreSQL) cannot be reached: "
                                  "searches answer from this replica's memory, writes get 503.")
    moments: MomentsInfo | None = Field(None, description="How videos are cut into moments; null: one embedding per "
                                        "item.")


LIMITS: dict[str, dict[str, dict[str, str]]] = {
    "VqaRequest": {"question": {"maxLength": "max_text_chars"}},
    "VideoQaRequest": {"question": {"maxLength": "max_text_chars"}},
    "RetrieveFilter": {"caption_contains": {"maxLength": "max_text_chars"}},
    "RetrieveRequest": {"query_text": {"maxLength": "max_text_chars"}, "top_k": {"maximum": "max_top_k"},
                        "rerank_k": {"maximum": "max_top_k"}, "candidate_images": {"maxItems": "max_candidates"},
                        "candidate_texts": {"maxItems": "max_candidates", "items.maxLength": "max_text_chars"}},
    "ItemsAdd": {"items": {"maxItems": "max_items_per_request"}},
    "ItemIn": {"text": {"maxLength": "max_text_chars"}},
    "MomentsIn": {"window_s": {"maximum": "max_moment_video_seconds", "minimum": "min_moment_stride_s"},
                  "stride_s": {"minimum": "min_moment_stride_s"}},
}
"""Schema constraints whose values are settings (model -> property -> keyword -> setting name)."""
FORM_MODELS = {"/vqa": "VqaRequest", "/videoqa": "VideoQaRequest", "/retrieve": "RetrieveRequest"}


def apply_limits(openapi: dict[str, Any], settings: Any) -> None:
    """Write this server's limits into its OpenAPI schema (JSON bodies and their multipart forms), so
    the schema admits exactly what the server takes."""
    components = openapi.get("components", {}).get("schemas", {})
    targets = [(name, components[name]) for name in LIMITS if name in components]
    for path, name in FORM_MODELS.items():
        form = (openapi.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {})
                .get("content", {}).get("multipart/form-data", {}).get("schema"))
        if form is not None:
            targets.append((name, form))
    for name, schema in targets:
        for prop, keywords in LIMITS[name].items():
            target = schema["properties"][prop]
            for keyword, setting in keywords.items():
                node = target
                *inner, key = keyword.split(".")
                for part in inner:
                    node = node.setdefault(part, {})
                node[key] = getattr(settings, setting)
