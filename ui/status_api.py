"""The health and status routes: GET /healthz, vLLM's GET /health, and GET /api/status (the
queue, the KV cache and prefix cache, the nodes and the plan; redacted without the API key)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inference.async_engine import AsyncEngine, EngineStats

from .auth import bearer_ok
from .errors import APIError

router = APIRouter()


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    ready = _engine(request).stats().ready
    return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)


@router.get("/health")
async def health(request: Request) -> Response:
    """vLLM's liveness probe (benchmark clients call it): 200 with an empty body once the
    model serves, 503 before."""
    if not _engine(request).stats().ready:
        raise APIError(503, "The model is not ready yet.", code="model_not_ready")
    return Response(status_code=200)


# What /api/status shows a caller without the API key (when one is set): the queue and the
# layout, never an address, a port or a counter of the data plane.
_PUBLIC_NODE_KEYS = ("node_id", "state", "layer_start", "layer_end", "model", "backend", "device", "tok_s")
_PUBLIC_CLUSTER_KEYS = ("mode", "want_workers")


def public_status(body: dict) -> dict:
    """`body` cut down to an allow-list: a key added to the status later stays private until listed."""
    public = {k: body[k] for k in ("quant", *(f.name for f in dataclasses.fields(EngineStats))) if k in body}
    if isinstance(body.get("nodes"), list):
        public["nodes"] = [{k: n[k] for k in _PUBLIC_NODE_KEYS if k in n} for n in body["nodes"]]
    if isinstance(body.get("cluster"), dict):
        public["cluster"] = {k: body["cluster"][k] for k in _PUBLIC_CLUSTER_KEYS if k in body["cluster"]}
    return public


@router.get("/api/status")
async def status(request: Request) -> JSONResponse:
    stats = _engine(request).stats()
    body = dataclasses.asdict(stats)
    if stats.prefix_cache is not None:
        body["prefix_cache"]["hit_rate"] = round(stats.prefix_cache.hit_rate, 4)
    if request.app.state.status_extra is not None:
        body.update(request.app.state.status_extra())
    key = request.app.state.api_key
    if key and not bearer_ok(request.scope["headers"], key):
        body = public_status(body)
    return JSONResponse(body)
