"""The OpenAPI spec a deployment serves: built from the wire model and the profile's settings,
loadable by schemathesis, and printed by `small4 openapi` without a running stack."""

from __future__ import annotations

import json

import schemathesis
import yaml

from cluster.cli import main
from cluster.settings import parse_settings
from services.api import openapi
from services.api.schemas import UNSUPPORTED

PROFILE = {"auth": {"enabled": False}, "model": {"name": "small4-test"},
           "limits": {"max_tokens_cap": 48, "max_messages": 7}}


def test_the_spec_carries_the_profiles_limits_and_names():
    spec = openapi.build(parse_settings(PROFILE).ingress_settings())
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["model"]["enum"] == ["small4-test"]
    assert request["max_tokens"]["anyOf"][0]["maximum"] == 48
    assert request["messages"]["maxItems"] == 7
    assert "high" in request["reasoning_effort"]["anyOf"][0]["enum"]
    loaded = schemathesis.openapi.from_dict(spec)
    operations = {op.ok().label for op in loaded.get_all_operations()}
    assert operations == {"POST /v1/chat/completions", "GET /v1/models", "GET /health",
                          "GET /ready", "GET /v1/models/{model}", "HEAD /v1/models",
                          "HEAD /health", "HEAD /ready"}
    assert spec["paths"]["/health"]["get"]["security"] == []  # probes are open
    assert spec["paths"]["/health"]["head"]["security"] == []


def test_the_spec_documents_the_spec_fields_nulls_and_ranges():
    """What the wire model accepts is what the spec says: nulls where OpenAI allows them,
    penalties in [-2, 2], top_p from 0, and the fields refused unless neutral declared."""
    spec = openapi.build(parse_settings(PROFILE).ingress_settings())
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in ("temperature", "top_p", "stream", "seed", "stop", "max_tokens"):
        assert {"type": "null"} in request[field]["anyOf"], field
    assert request["top_p"]["anyOf"][0]["minimum"] == 0
    # fields refused unless neutral: the spec states exactly the values that are accepted
    for field in ("prediction",):
        accepted = [option.get("const") for option in request[field]["anyOf"]]
        assert accepted == [*UNSUPPORTED[field], None], field
    # n: up to the deployment's cap (limits.max_n), not the spec's 128
    assert request["n"]["anyOf"][0] | {"type": "integer"} == {
        "type": "integer", "minimum": 1, "maximum": parse_settings(PROFILE).limits.max_n}
    for field in ("presence_penalty", "frequency_penalty"):  # implemented: the spec's range
        assert (request[field]["anyOf"][0]["minimum"],
                request[field]["anyOf"][0]["maximum"]) == (-2, 2)
    for field in ("response_format", "logprobs", "top_logprobs", "logit_bias",
                  "parallel_tool_calls"):
        assert "const" not in json.dumps(request[field]), field
    schemas = spec["components"]["schemas"]

    def resolve(schema):
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
    choice = resolve(schemas["ChatCompletion"]["properties"]["choices"]["items"])
    message = resolve(choice["properties"]["message"])
    assert "refusal" in message["required"] and "content" in message["required"]
    assert "reasoning_content" not in message["required"]
    assert "prefix" in spec["components"]["schemas"]["AssistantMessage"]["properties"]


def test_small4_openapi_prints_the_spec_of_a_profile(tmp_path, capsys):
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    assert main(["openapi", "--config", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == openapi.build(parse_settings(PROFILE).ingress_settings())
