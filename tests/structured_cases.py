"""Bounded schemas and tools the structured-output tests share (unit sampler and e2e): bounded
strings, arrays and integers, no additional properties, so a random model's constrained answer
always ends within max_tokens."""

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "count", "inner", "tags"],
          "properties": {
              "name": {"type": "string", "maxLength": 8},
              "count": {"type": "integer", "minimum": 0, "maximum": 99},
              "inner": {"type": "object", "additionalProperties": False,
                        "required": ["ok", "kind"],
                        "properties": {"ok": {"type": "boolean"},
                                       "kind": {"enum": ["red", "green", "blue"]}}},
              "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b"]}}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["utc", "cet"]}}}}}
TOOLS = {"get_weather": WEATHER, "get_time": CLOCK}
