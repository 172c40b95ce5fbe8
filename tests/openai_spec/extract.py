"""Re-vendor chat_schemas.json from a checkout of OpenAI's published OpenAPI spec.

Usage (from the repository root):
    python tests/openai_spec/extract.py path/to/openapi.yaml > tests/openai_spec/chat_schemas.json

Copies the named component schemas and every schema they reference, unchanged; the file keeps
the spec's `components.schemas` layout so each `$ref` still points inside it. Not run by tests.
"""

from __future__ import annotations

import json
import sys

import yaml

ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "ChatCompletionResponseMessage", "ChatCompletionStreamResponseDelta",
         "ChatCompletionMessageToolCall", "ChatCompletionMessageToolCalls",
         "ChatCompletionMessageToolCallChunk", "ChatCompletionTokenLogprob", "CompletionUsage",
         "ErrorResponse", "Error", "Model", "ListModelsResponse")
PREFIX = "#/components/schemas/"


def refs(node):
    """Every `$ref` under a schema node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def excerpt(schemas: dict) -> dict:
    """The roots and their transitive references, in the spec's order."""
    wanted, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(ref.removeprefix(PREFIX) for ref in refs(schemas[name]))
    return {name: schema for name, schema in schemas.items() if name in wanted}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as spec:
        schemas = yaml.safe_load(spec)["components"]["schemas"]
    json.dump({"components": {"schemas": excerpt(schemas)}}, sys.stdout, indent=2,
              ensure_ascii=False)
    sys.stdout.write("\n")
