"""The OpenAPI 3.1 description of what this deployment accepts and answers.

The request schema is the pydantic wire model narrowed by the deployment's settings (the served
model name, the `max_tokens` cap, the message count, the deadline header's range), so a request
valid under the spec is one this deployment serves, and the fuzzing tests can aim at both sides
of every limit. Served keyed at `/openapi.json`.
"""

from __future__ import annotations

from typing import Any

from services.api.responses import SCHEMAS
from services.api.schemas import UNSUPPORTED, ChatCompletionRequest
from services.settings import IngressSettings

_REF = "#/components/schemas/{model}"

# One server-sent event of a stream (OpenAPI 3.1: `schema` describes each event): `data` is a
# `ChatCompletionChunk` or an `Error` as JSON, and the last event's is `[DONE]`.
EVENT = {"type": "object", "required": ["data"],
         "properties": {"data": {"type": "string", "contentMediaType": "application/json"}}}

# Every answer carries this header (errors and probes too).
TRACE_HEADER = {"x-trace-id": {"description": "the W3C trace id of this answer", "schema": {
    "type": "string", "pattern": "^[0-9a-f]{32}$"}}}

# Every error the chat route can answer, by status (the body is always `Error`).
CHAT_ERRORS = {"400": "invalid request or context length exceeded",
               "401": "missing, unknown or revoked API key", "404": "unknown model",
               "408": "the body did not arrive in time (idle or total upload timeout)",
               "413": "body or a string in it over the limit",
               "415": "the body is not UTF-8 JSON",
               "431": "the request line and headers are over the limit",
               "429": "the key's quota is spent (Retry-After)",
               "502": "prefill failed on every attempt",
               "503": "no pool has room, or no engine is up (Retry-After)",
               "504": "the request's deadline passed"}


def build(settings: IngressSettings) -> dict[str, Any]:
    """The spec for `settings`: paths, bearer security, request/response schemas."""
    request = ChatCompletionRequest.model_json_schema(ref_template=_REF)
    schemas = request.pop("$defs")
    _narrow(request, settings)
    schemas["ChatCompletionRequest"] = request
    for name, model in SCHEMAS.items():  # the models every body is built from
        schema = model.model_json_schema(ref_template=_REF)
        for inner, definition in schema.pop("$defs", {}).items():
            assert schemas.setdefault(inner, definition) == definition, inner
        schemas[name] = schema
    limits = settings.limits
    errors = {code: _error(why) for code, why in CHAT_ERRORS.items()}
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "small4", "version": "1",
                 "description": f"OpenAI-compatible chat completions for {settings.model.name}"},
        "security": [{"bearer": []}],
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "parameters": [{
                    "name": "x-request-timeout", "in": "header", "required": False,
                    "description": "this request's deadline in seconds",
                    "schema": {"type": "number", "exclusiveMinimum": 0,
                               "maximum": limits.max_request_timeout_s}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": _REF.format(model="ChatCompletionRequest")}}}},
                "responses": {"200": {"description": "the completion, or its SSE stream "
                                                     "(sent with cache-control: no-cache) of "
                                                     "ChatCompletionChunk events",
                                      "headers": TRACE_HEADER,
                                      "content": {
                                          "application/json": {"schema": {
                                              "$ref": _REF.format(model="ChatCompletion")}},
                                          "text/event-stream": {"schema": EVENT}}},
                              **errors}}},
            "/v1/models": {"get": {
                "operationId": "listModels",
                "responses": {"200": {"description": "the served model", "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model="ModelList")}}}},
                    "401": errors["401"]}}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel",
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the served model", "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model="ModelCard")}}}},
                    "401": errors["401"], "404": _error("not the served model")}}},
            "/health": {"get": {"operationId": "health", "security": [],
                                "responses": {"200": {"description": "the process is up"}}}},
            "/ready": {"get": {"operationId": "ready", "security": [], "responses": {
                "200": {"description": "every pool has live prefill and decode replicas"},
                "503": {"description": "some pool is not ready"}}}},
        },
    }
    _add_heads(spec["paths"])
    return spec


def _add_heads(paths: dict[str, Any]) -> None:
    """HEAD answers like GET without a body, on the probes and the model list."""
    for path in ("/v1/models", "/health", "/ready"):
        get = paths[path]["get"]
        paths[path]["head"] = {
            **{k: v for k, v in get.items() if k != "responses"},
            "operationId": f"{get['operationId']}Head",
            "responses": {code: {"description": answer["description"]}
                          for code, answer in get["responses"].items()}}


def _narrow(request: dict[str, Any], settings: IngressSettings) -> None:
    """Settings the pydantic model cannot know: the served model, efforts and limits."""
    limits, props = settings.limits, request["properties"]
    props["model"] = {"type": "string", "enum": [settings.model.name]}
    props["reasoning_effort"] = {"anyOf": [{"enum": sorted(settings.routing.effort_map)},
                                           {"type": "null"}]}
    props["messages"]["maxItems"] = limits.max_messages
    for field in ("max_tokens", "max_completion_tokens"):
        props[field] = {"anyOf": [{"type": "integer", "minimum": 1,
                                   "maximum": limits.max_tokens_cap}, {"type": "null"}]}
    props["n"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": limits.max_n},
                            {"type": "null"}],
                  "description": "choices to sample, each its own decode stream"}
    for field, accepted in UNSUPPORTED.items():
        props[field] = {"anyOf": [*({"const": value} for value in accepted), {"type": "null"}],
                        "description": "not supported yet: any other value is refused (400)"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model="Error")}}}}
