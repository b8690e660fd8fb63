"""Request and response schemas of the HTTP API (pydantic; they make the OpenAPI schema).

Types are strict (``"10"`` is not an integer, ``1`` is not a boolean) and unknown fields
are refused, so a client's mistake is a 422 naming the field rather than a guess. Limits
that depend on the deployment (history length, k, candidates) come from ``ServeConfig``,
hence the factory: ``build_schemas(cfg)``.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from typing_extensions import NotRequired, TypedDict  # pydantic needs these, not typing's, before 3.12

from genrec_jax.config import ServeConfig

# str and int never both fit (strict types), so the first member that validates is the
# answer: "left_to_right" skips smart mode's second try (a quarter of a history's time).
ItemId = Annotated[Union[Annotated[StrictStr, Field(min_length=1, max_length=256)], StrictInt],
                   Field(union_mode="left_to_right")]
MAX_TIMESTAMP = 2**62
Stamp = Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Events and the context are TypedDicts, not models: validated straight into the plain
# dicts the backend takes (a history of 256 events validated 2-3x faster than as models,
# which then had to be dumped), with the same strictness, errors and JSON schema.
class Event(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    item_id: Annotated[ItemId, Field(description="External item id (as in GET /v1/items)")]
    action: NotRequired[Optional[Annotated[StrictStr, Field(
        max_length=64, description="Action name (the checkpoint's action vocabulary); default 'view'")]]]
    timestamp: NotRequired[Optional[Annotated[Stamp, Field(
        description="Unix seconds; on every event or on none (then one second per event)")]]]


class Context(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    timestamp: NotRequired[Optional[Annotated[Stamp, Field(
        description="Request time, unix seconds (default: the last event's time)")]]]


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RankedItem(BaseModel):
    item_id: str
    scores: dict[str, float] = Field(description="Task probabilities and the retrieval logit")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str
    latency_ms: float


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="One entry per candidate, in request order")
    model_version: str
    latency_ms: float


class RegisteredItem(BaseModel):
    item_id: str
    semantic_id: list[int]


class AddItemsResponse(BaseModel):
    items: list[RegisteredItem]
    total: int


class CatalogItem(BaseModel):
    item_id: str
    cold_start: bool = Field(description="Registered at serving time (generative mode only)")


class ItemsPage(BaseModel):
    items: list[CatalogItem]
    total: int
    offset: int
    limit: int


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def build_schemas(cfg: ServeConfig) -> types.SimpleNamespace:
    """Request models with this deployment's limits."""
    History = Annotated[list[Event], Field(min_length=1, max_length=cfg.max_history_len)]
    UserId = Optional[Annotated[StrictStr, Field(min_length=1, max_length=256)]]
    Timeout = Optional[Annotated[StrictInt, Field(ge=1, le=int(cfg.timeout_ms))]]

    class RecommendRequest(_Strict):
        user_id: UserId = Field(None, description="Enables the per-user prefix cache")
        history: History
        context: Optional[Context] = None
        k: Annotated[StrictInt, Field(ge=1, le=cfg.max_k)] = 10
        mode: Literal["retrieval", "generative"] = "retrieval"
        exclude_history: StrictBool = False
        exclude_items: Annotated[list[ItemId], Field(max_length=cfg.max_exclude)] = Field(
            default_factory=list, description="Business filter: never recommend these")
        timeout_ms: Timeout = Field(None, description=f"Deadline (default and max {cfg.timeout_ms:g} ms)")

    class RankRequest(_Strict):
        user_id: UserId = None
        history: History
        context: Optional[Context] = None
        candidates: Annotated[list[ItemId], Field(min_length=1, max_length=cfg.max_candidates)]
        sort: StrictBool = Field(False, description="Order the answer by the first task's probability")
        timeout_ms: Timeout = None

    class NewItem(_Strict):
        item_id: ItemId
        features: Annotated[list[Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)]],
                            Field(min_length=1, max_length=65536)] = Field(
            description="Content vector, as the RQ-VAE was trained on (GET /readyz shows its width)")

    class AddItemsRequest(_Strict):
        items: Annotated[list[NewItem], Field(min_length=1, max_length=1000)]

    return types.SimpleNamespace(RecommendRequest=RecommendRequest, RankRequest=RankRequest,
                                 AddItemsRequest=AddItemsRequest, NewItem=NewItem)


# What a route hands its backend: plain, JSON-able dicts, so the same call runs in this
# process or, in the multi-process server, travels to the engine process as one frame.


def request_args(req: BaseModel) -> dict[str, Any]:
    """A validated recommend or rank request as its backend's arguments: every field by name.
    The values are plain already (events and context are TypedDicts, i.e. dicts; an event's
    missing ``action`` / ``timestamp`` is absent, which the engine reads as None)."""
    return dict(req.__dict__)


def add_items_args(req: Any) -> dict[str, Any]:
    return {"items": [{"item_id": it.item_id, "features": it.features} for it in req.items]}
