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

from genrec_jax.config import ServeConfig

ItemId = Union[Annotated[StrictStr, Field(min_length=1, max_length=256)], StrictInt]
MAX_TIMESTAMP = 2**62


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Event(_Strict):
    item_id: ItemId = Field(description="External item id (as in GET /v1/items)")
    action: Optional[Annotated[StrictStr, Field(max_length=64)]] = Field(
        None, description="Action name (the checkpoint's action vocabulary); default 'view'")
    timestamp: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP)]] = Field(
        None, description="Unix seconds; on every event or on none (then one second per event)")


class Context(_Strict):
    timestamp: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP)]] = Field(
        None, description="Request time, unix seconds (default: the last event's time)")


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


def dump_events(events: list[Event]) -> list[dict[str, Any]]:
    return [{"item_id": e.item_id, "action": e.action, "timestamp": e.timestamp} for e in events]


# What a route hands its backend: plain, JSON-able dicts, so the same call runs in this
# process or, in the multi-process server, travels to the engine process as one frame.


def recommend_args(req: Any) -> dict[str, Any]:
    return {"history": dump_events(req.history), "k": req.k, "mode": req.mode,
            "context": req.context.model_dump() if req.context else None,
            "exclude_history": req.exclude_history, "exclude_items": req.exclude_items,
            "user_id": req.user_id, "timeout_ms": req.timeout_ms}


def rank_args(req: Any) -> dict[str, Any]:
    return {"history": dump_events(req.history), "candidates": req.candidates,
            "context": req.context.model_dump() if req.context else None,
            "user_id": req.user_id, "sort": req.sort, "timeout_ms": req.timeout_ms}


def add_items_args(req: Any) -> dict[str, Any]:
    return {"items": [{"item_id": it.item_id, "features": it.features} for it in req.items]}
