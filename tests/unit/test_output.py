"""Token ids → content, reasoning, tool calls: by id, across any chunking, with stop strings."""

from __future__ import annotations

import json
import random

import pytest

from services.api.output import IncrementalDetokenizer, OutputParser, parse_completion


@pytest.fixture(scope="module")
def ids_of(tokenizer):
    return lambda text: tokenizer._raw.encode(text, bos=False, eos=False)


@pytest.fixture(scope="module")
def mark(tokenizer):
    return lambda name: [tokenizer.special(name)]


def feed_in_chunks(parser, ids, rng):
    content, reasoning, calls, i = [], [], [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        delta = parser.feed(ids[i:i + n])
        content.append(delta.content), reasoning.append(delta.reasoning)
        calls += delta.tool_calls
        i += n
    delta, finish = parser.finish("stop")
    content.append(delta.content), reasoning.append(delta.reasoning)
    return "".join(content), "".join(reasoning), calls + delta.tool_calls, finish


TEXTS = ["plain ascii", "héllo wörld", "世界 和平 🎉🎈 done", "mixed 😀 ünï 中文 end", "  spaces  "]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_never_splits_characters(tokenizer, ids_of, text):
    ids = ids_of(text)
    for seed in range(20):
        rng, detok, pieces, i = random.Random(seed), IncrementalDetokenizer(tokenizer), [], 0
        while i < len(ids):
            n = rng.randint(1, 3)
            pieces.append(detok.feed(ids[i:i + n]))
            i += n
        pieces.append(detok.flush())
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


def test_reasoning_and_content_split_at_any_chunking(tokenizer, ids_of, mark):
    ids = (mark("[THINK]") + ids_of("Let me think: 世界.") + mark("[/THINK]")
           + ids_of("The answer is 42.") + [tokenizer.eos_id])
    for seed in range(30):
        parser = OutputParser(tokenizer, tools_enabled=True)
        content, reasoning, calls, finish = feed_in_chunks(parser, ids, random.Random(seed))
        assert (content, reasoning, calls, finish) == ("The answer is 42.", "Let me think: 世界.",
                                                       [], "stop")
        assert parser.reasoning_tokens == len(ids_of("Let me think: 世界.")) + 2
        assert parser.completion_tokens == len(ids)


def test_text_that_looks_like_a_marker_is_content(tokenizer, ids_of):
    content, reasoning, calls, _ = parse_completion(tokenizer, ids_of("[THINK]not really"), "stop",
                                                    tools_enabled=True)
    assert content == "[THINK]not really" and reasoning == "" and calls == []


def test_parallel_tool_calls(tokenizer, ids_of, mark):
    ids = (mark("[TOOL_CALLS]") + ids_of("get_weather") + mark("[ARGS]") + ids_of('{"city": "Paris"}')
           + mark("[TOOL_CALLS]") + ids_of("get_time") + mark("[ARGS]") + ids_of('{"tz": "CET"}')
           + [tokenizer.eos_id])
    for seed in range(10):
        content, _, calls, finish = feed_in_chunks(OutputParser(tokenizer, tools_enabled=True),
                                                   ids, random.Random(seed))
        assert content == "" and finish == "tool_calls"
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
        assert calls[0].id != calls[1].id


def test_tool_call_cut_by_length_keeps_partial_args_and_length(tokenizer, ids_of, mark):
    ids = mark("[TOOL_CALLS]") + ids_of("lookup") + mark("[ARGS]") + ids_of('{"q": "ti')
    _, _, calls, finish = parse_completion(tokenizer, ids, "length", tools_enabled=True)
    assert finish == "length" and calls[0].name == "lookup" and calls[0].arguments == '{"q": "ti'


def test_tools_disabled_keeps_the_marker_as_content(tokenizer, ids_of, mark):
    ids = mark("[TOOL_CALLS]") + ids_of("lookup") + mark("[ARGS]") + ids_of("{}")
    content, _, calls, finish = parse_completion(tokenizer, ids, "stop", tools_enabled=False)
    assert calls == [] and finish == "stop"
    assert content == "[TOOL_CALLS]lookup[ARGS]{}"


def test_unclosed_think_stays_reasoning(tokenizer, ids_of, mark):
    ids = mark("[THINK]") + ids_of("still thinking")
    content, reasoning, _, finish = parse_completion(tokenizer, ids, "length", tools_enabled=False)
    assert (content, reasoning, finish) == ("", "still thinking", "length")


@pytest.mark.parametrize("stop", ["END", "lo wo", "\n\n"])
def test_stop_string_is_cut_streaming_and_not(tokenizer, ids_of, stop):
    text = f"hello world then {stop} and more"
    ids = ids_of(text)
    expected = text[:text.index(stop)]
    content, *_ = parse_completion(tokenizer, ids, "stop", tools_enabled=False, stop=(stop,))
    assert content == expected
    for seed in range(20):
        parser = OutputParser(tokenizer, tools_enabled=False, stop=(stop,))
        streamed, _, _, _ = feed_in_chunks(parser, ids, random.Random(seed))
        assert streamed == expected


def test_partial_stop_prefix_is_released_when_it_cannot_match(tokenizer, ids_of):
    parser = OutputParser(tokenizer, tools_enabled=False, stop=("ENDING",))
    first = parser.feed(ids_of("the END"))
    assert "END" not in first.content  # could still become ENDING
    second = parser.feed(ids_of(" of it"))
    last, _ = parser.finish("length")
    assert first.content + second.content + last.content == "the END of it"


def test_eos_is_never_shown_and_tokens_after_it_are_ignored(tokenizer, ids_of):
    ids = ids_of("done") + [tokenizer.eos_id] + ids_of("ghost")
    content, reasoning, calls, finish = parse_completion(tokenizer, ids, "stop", tools_enabled=True)
    assert (content, reasoning, calls, finish) == ("done", "", [], "stop")
