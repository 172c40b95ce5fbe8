"""OpenAI response bodies: the completion object, stream chunks, usage."""

from __future__ import annotations

from typing import Any


def usage(prompt: int, completion: int, reasoning: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def tool_call_dicts(calls, start: int = 0, *, streaming: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls, start):
        item = {"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}
        if streaming:
            item["index"] = i
        out.append(item)
    return out


def logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's `logprobs` object; None when the request did not ask for them."""
    return None if entries is None else {"content": entries, "refusal": None}


def logprob_entries(records, tokenizer) -> list[dict[str, Any]]:
    """OpenAI's per-token entries (token text, logprob, bytes, top alternatives) for the sampled
    tokens of the answer's text; control tokens (`[THINK]`, end of sequence...) are not text."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.token_piece(token), "logprob": max(logprob, -9999.0),
                "bytes": list(tokenizer.token_bytes(token))}
    return [{**entry(r.token, r.logprob),
             "top_logprobs": [entry(t, lp) for t, lp in r.top if lp > float("-inf")]}
            for r in records if not tokenizer.is_control(r.token)]


def completion(meta: dict[str, Any], *, content: str, reasoning: str, tool_calls: list,
               finish_reason: str, usage_body: dict[str, Any],
               logprob_list: list[dict[str, Any]] | None = None,
               legacy_functions: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or None,
                               "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls and legacy_functions:  # the deprecated shape: one call, no id
        message["function_call"] = {"name": tool_calls[0].name,
                                    "arguments": tool_calls[0].arguments}
        finish_reason = "function_call" if finish_reason == "tool_calls" else finish_reason
    elif tool_calls:
        message["tool_calls"] = tool_call_dicts(tool_calls)
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                         "logprobs": logprobs(logprob_list)}],
            "usage": usage_body}


def chunk(meta: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None,
          usage_body: dict[str, Any] | None = None, *, include_usage: bool = False,
          logprob_list: list[dict[str, Any]] | None = None) -> dict:
    body = {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": logprobs(logprob_list)}]}
    if include_usage:
        body["usage"] = usage_body
    return body


def usage_chunk(meta: dict[str, Any], usage_body: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage_body}
