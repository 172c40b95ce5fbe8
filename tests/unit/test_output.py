"""Token ids → content, reasoning and tool calls: by id, across any chunking, with stop strings."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.output import IncrementalDetokenizer, OutputParser, parse_completion

MULTILINGUAL = [
    "plain ascii, with punctuation!", "héllo wörld ünïcödé", "世界和平你好吗我很好谢谢你的帮助",
    "こんにちは世界、ありがとう", "한국어 텍스트입니다", "😀🎉🎈 👩‍👩‍👧‍👦 🇫🇷", "ΑΒΓ абв ŧëxŧ",
    "mixed 😀 ünï 中文 end", "  spaces\n\nand\ttabs  ", "emoji😀inside中文words",
]
MARKERS = ("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]")
PROPERTY = settings(max_examples=120, deadline=None, database=None)


@pytest.fixture(scope="module")
def ids_of(tokenizer):
    return lambda text: tokenizer._raw.encode(text, bos=False, eos=False)


@pytest.fixture(scope="module")
def mark(tokenizer):
    return lambda name: [tokenizer.special(name)]


@pytest.fixture(scope="module")
def byte_ids(tokenizer):
    """Ids of single-byte tokens: any byte string, valid UTF-8 or not, one id per byte."""
    return lambda data: [tokenizer._raw.num_special_tokens + b for b in data]


def chunks(ids, sizes):
    """`ids` cut into consecutive pieces whose lengths cycle through `sizes` (0 = empty feed)."""
    out, i, n = [], 0, 0
    while i < len(ids):
        size = sizes[n % len(sizes)]
        out.append(ids[i:i + size])
        i, n = i + size, n + 1
    return out


def random_sizes(rng):
    return [rng.randint(0, 6) for _ in range(rng.randint(1, 8))] + [1]


def stream(parser, ids, sizes, finish="stop"):
    """Feed `ids` in chunks; (content pieces, reasoning, tool calls, finish reason)."""
    content, reasoning, calls = [], [], []
    for piece in chunks(ids, sizes):
        delta = parser.feed(piece)
        content.append(delta.content), reasoning.append(delta.reasoning)
        calls += delta.tool_calls
    delta, reason = parser.finish(finish)
    content.append(delta.content), reasoning.append(delta.reasoning)
    return content, "".join(reasoning), calls + delta.tool_calls, reason


def detokenize_in_chunks(tokenizer, ids, sizes):
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.feed(piece) for piece in chunks(ids, sizes)] + [detok.flush()]


# --- IncrementalDetokenizer ------------------------------------------------------------------

@PROPERTY
@given(text=st.sampled_from(MULTILINGUAL) | st.text(
           st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=40),
       sizes=st.lists(st.integers(0, 5), min_size=1, max_size=6).filter(any))
def test_detokenized_pieces_add_up_to_the_text_and_never_split_a_character(
        tokenizer, ids_of, text, sizes):
    ids = ids_of(text)
    pieces = detokenize_in_chunks(tokenizer, ids, sizes)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_control_tokens_the_format_does_not_use_are_never_text(tokenizer, ids_of, mark):
    """A reserved id (a random model samples any) or a stray [INST] is no text in content or
    reasoning; it still counts as a completion token."""
    ids = (ids_of("a") + [735] + mark("[INST]") + ids_of("b") + mark("[THINK]") + [900]
           + ids_of("c") + mark("[/THINK]") + [tokenizer.eos_id])
    content, reasoning, calls, finish = parse_completion(tokenizer, ids, "stop",
                                                         tools_enabled=True)
    assert (content, reasoning, finish) == ("ab", "c", "stop")


@PROPERTY
@given(parts=st.lists(st.binary(max_size=6) | st.sampled_from(MULTILINGUAL + list(MARKERS)),
                      max_size=12),
       sizes=st.lists(st.integers(0, 7), min_size=1, max_size=6).filter(any))
def test_detokenized_pieces_equal_decode_for_invalid_bytes_and_markers(
        tokenizer, ids_of, byte_ids, parts, sizes):
    ids = [i for part in parts for i in (byte_ids(part) if isinstance(part, bytes) else
                                         [tokenizer.special(part)] if part in MARKERS else
                                         ids_of(part))]
    assert "".join(detokenize_in_chunks(tokenizer, ids, sizes)) == tokenizer.decode(ids)


def test_character_split_over_feeds_is_held_until_complete(tokenizer, byte_ids):
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.feed(byte_ids(b"ab\xe4")), detok.feed(byte_ids(b"\xb8")),
            detok.feed(byte_ids(b"\x96c")), detok.flush()] == ["ab", "", "世c", ""]


def test_flush_releases_an_incomplete_character_as_a_replacement(tokenizer, byte_ids):
    detok = IncrementalDetokenizer(tokenizer)
    assert (detok.feed(byte_ids(b"ok\xf0\x9f")), detok.flush()) == ("ok", "\ufffd")


def test_only_a_short_window_is_decoded_per_feed(tokenizer, ids_of, byte_ids):
    """Feeding one id at a time decodes a bounded window, never the whole sequence."""
    lengths = []

    class CountingTokenizer:
        def decode(self, ids):
            lengths.append(len(ids))
            return tokenizer.decode(ids)

    ids = ids_of(" ".join(MULTILINGUAL) * 20) + byte_ids(b"\x80" * 200 + b"\xe4\xb8\x96" * 50)
    detok = IncrementalDetokenizer(CountingTokenizer())
    text = "".join(detok.feed([i]) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids) and len(ids) > 1000
    assert max(lengths) <= 20


# --- OutputParser ------------------------------------------------------------------------------

def test_reasoning_and_content_split_identically_for_every_chunking(tokenizer, ids_of, mark):
    thought, answer = "Let me think: 世界 😀.", "The answer is 42. ünï"
    ids = mark("[THINK]") + ids_of(thought) + mark("[/THINK]") + ids_of(answer) + [tokenizer.eos_id]
    rng = random.Random(0)
    for _ in range(60):
        parser = OutputParser(tokenizer, tools_enabled=True)
        content, reasoning, calls, finish = stream(parser, ids, random_sizes(rng))
        assert ("".join(content), reasoning, calls, finish) == (answer, thought, [], "stop")
        assert parser.reasoning_tokens == len(ids_of(thought)) + 2
        assert parser.completion_tokens == len(ids)


@PROPERTY
@given(parts=st.lists(st.sampled_from(MULTILINGUAL + ["END", "STOP here", '{"a": 1}', "fn"])
                      | st.sampled_from(MARKERS + ("</s>",)) | st.binary(max_size=3), max_size=14),
       tools_enabled=st.booleans(), stop=st.sampled_from([(), ("END",), ("STOP", "😀🎉")]),
       sizes=st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(any))
def test_streaming_gives_the_same_output_as_the_whole_completion(
        tokenizer, ids_of, byte_ids, parts, tools_enabled, stop, sizes):
    ids = [i for part in parts for i in (
        byte_ids(part) if isinstance(part, bytes) else [tokenizer.eos_id] if part == "</s>"
        else [tokenizer.special(part)] if part in MARKERS else ids_of(part))]
    whole = parse_completion(tokenizer, ids, "stop", tools_enabled=tools_enabled, stop=stop)
    parser = OutputParser(tokenizer, tools_enabled=tools_enabled, stop=stop)
    content, reasoning, calls, finish = stream(parser, ids, sizes)
    assert ("".join(content), reasoning, finish) == (whole[0], whole[1], whole[3])
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole[2]]
    assert not any(s in whole[0] for s in stop)
    assert parser.completion_tokens == len(ids)


def test_text_that_looks_like_a_marker_is_content(tokenizer, ids_of):
    text = "[THINK]not really[/THINK] [TOOL_CALLS]x[ARGS]{}"
    assert not set(ids_of(text)) & {tokenizer.special(name) for name in MARKERS}
    assert parse_completion(tokenizer, ids_of(text), "stop", tools_enabled=True) == (
        text, "", [], "stop")


def test_parallel_tool_calls_in_order(tokenizer, ids_of, mark):
    ids = (mark("[TOOL_CALLS]") + ids_of("get_weather") + mark("[ARGS]")
           + ids_of('{"city": "Paris"}') + mark("[TOOL_CALLS]") + ids_of("get_time")
           + mark("[ARGS]") + ids_of(' {"tz": "CET"}\n') + [tokenizer.eos_id])
    rng = random.Random(1)
    for _ in range(30):
        content, _, calls, finish = stream(OutputParser(tokenizer, tools_enabled=True), ids,
                                           random_sizes(rng))
        assert "".join(content) == "" and finish == "tool_calls"
        assert [(c.name, c.arguments) for c in calls] == [
            ("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')]
        assert all(len(c.id) == 9 and c.id.isalnum() and c.id.isascii() for c in calls)
        assert calls[0].id != calls[1].id


def test_a_call_is_delivered_by_the_feed_that_completes_it(tokenizer, ids_of, mark):
    parser = OutputParser(tokenizer, tools_enabled=True)
    first = parser.feed(mark("[TOOL_CALLS]") + ids_of("a") + mark("[ARGS]") + ids_of("{}"))
    second = parser.feed(mark("[TOOL_CALLS]") + ids_of("b") + mark("[ARGS]"))
    last, finish = parser.finish("stop")
    assert [first.tool_calls, [c.name for c in second.tool_calls]] == [[], ["a"]]
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("b", "{}")]  # took none
    assert finish == "tool_calls"


@pytest.mark.parametrize("finish, arguments", [("stop", "{}"), ("length", "")])
def test_a_call_without_arguments_takes_none_unless_it_was_cut_short(tokenizer, ids_of, mark,
                                                                      finish, arguments):
    _, _, calls, _ = parse_completion(tokenizer, mark("[TOOL_CALLS]") + ids_of("now"), finish,
                                      tools_enabled=True)
    assert [(c.name, c.arguments) for c in calls] == [("now", arguments)]


def test_a_stray_marker_inside_a_call_is_no_part_of_it(tokenizer, ids_of, mark):
    ids = (mark("[TOOL_CALLS]") + ids_of("f") + mark("[ARGS]") + ids_of('{"x": ') + mark("[THINK]")
           + ids_of("1}"))
    _, _, calls, _ = parse_completion(tokenizer, ids, "stop", tools_enabled=True)
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}')]


def test_content_held_for_a_stop_string_comes_before_the_call_that_follows_it(tokenizer, ids_of,
                                                                               mark):
    parser = OutputParser(tokenizer, tools_enabled=True, stop=("STOP",))
    order = []
    for piece in (ids_of("Let me check ST"), mark("[TOOL_CALLS]") + ids_of("f") + mark("[ARGS]")
                  + ids_of("{}"), [tokenizer.eos_id]):
        delta = parser.feed(piece)
        order += [("content", delta.content)] * bool(delta.content) + [
            ("call", c.name) for c in delta.tool_calls]
    delta, finish = parser.finish("stop")
    order += [("content", delta.content)] * bool(delta.content) + [
        ("call", c.name) for c in delta.tool_calls]
    assert order == [("content", "Let me check "), ("content", "ST"), ("call", "f")]
    assert finish == "tool_calls"


def test_content_held_for_a_stop_string_is_released_before_a_call_begun_in_reasoning(
        tokenizer, ids_of, mark):
    """Held content was released before a call only when the call followed the content; after
    a reasoning block it stayed held past the call, and joined with content after it into the
    stop string (the engine's check, which restarts at every call, had not stopped there):
    everything after was lost, the tokens billed."""
    ids = (ids_of("Hello S") + mark("[THINK]") + ids_of("plan") + mark("[TOOL_CALLS]")
           + ids_of("f") + mark("[ARGS]") + ids_of("{}") + [tokenizer.eos_id]
           + ids_of("TOP more"))  # generated on past the end (ignore_eos)
    parser = OutputParser(tokenizer, tools_enabled=True, stop=("STOP",), ignore_eos=True)
    order = []
    for piece in (ids[:len(ids_of("Hello S")) + 3], ids[len(ids_of("Hello S")) + 3:]):
        delta = parser.feed(piece)
        order += [("content", delta.content)] * bool(delta.content) + [
            ("call", c.name) for c in delta.tool_calls]
    delta, _ = parser.finish("length")
    order += [("content", delta.content)] * bool(delta.content)
    text = "".join(t for kind, t in order if kind == "content")
    assert text.startswith("Hello S") and "more" in text  # no stop string across the call
    assert order.index(("call", "f")) > max(i for i, (kind, t) in enumerate(order)
                                            if kind == "content" and "S" in t and "TOP" not in t)


@pytest.mark.parametrize("ids", [
    lambda ids_of, mark: mark("[TOOL_CALLS]") + mark("[ARGS]") + ids_of('{"x": 1}'),
    lambda ids_of, mark: mark("[TOOL_CALLS]"),
    lambda ids_of, mark: mark("[TOOL_CALLS]") + ids_of("   ") + mark("[ARGS]") + ids_of("{}"),
])
def test_a_call_naming_no_function_is_no_call(tokenizer, ids_of, mark, ids):
    """`[TOOL_CALLS][ARGS]{...}` was answered as a call named "" with finish_reason
    tool_calls: an agent loop then dispatched a function named ""."""
    content, _, calls, finish = parse_completion(
        tokenizer, ids(ids_of, mark) + [tokenizer.eos_id], "stop", tools_enabled=True)
    assert calls == [] and finish == "stop"


def test_content_before_a_tool_call_and_invalid_json_arguments_are_kept(tokenizer, ids_of, mark):
    ids = (ids_of("Checking.") + mark("[TOOL_CALLS]") + ids_of("lookup") + mark("[ARGS]")
           + ids_of("{not json") + [tokenizer.eos_id])
    content, _, calls, finish = parse_completion(tokenizer, ids, "stop", tools_enabled=True)
    assert (content, [(c.name, c.arguments) for c in calls], finish) == (
        "Checking.", [("lookup", "{not json")], "tool_calls")


@pytest.mark.parametrize("engine_reason, expected", [
    ("stop", "tool_calls"), ("length", "length"), ("abort", "abort")])
def test_finish_reason_with_a_tool_call(tokenizer, ids_of, mark, engine_reason, expected):
    ids = mark("[TOOL_CALLS]") + ids_of("lookup") + mark("[ARGS]") + ids_of('{"q": "ti')
    _, _, calls, finish = parse_completion(tokenizer, ids, engine_reason, tools_enabled=True)
    assert finish == expected
    assert [(c.name, c.arguments) for c in calls] == [("lookup", '{"q": "ti')]


@pytest.mark.parametrize("engine_reason", ["stop", "length", "abort"])
def test_finish_reason_without_a_tool_call_is_the_engines(tokenizer, ids_of, engine_reason):
    ids = ids_of("just text") + ([tokenizer.eos_id] if engine_reason == "stop" else [])
    assert parse_completion(tokenizer, ids, engine_reason, tools_enabled=True)[3] == engine_reason


def test_a_call_with_tools_disabled_is_neither_a_call_nor_text(tokenizer, ids_of, mark):
    """`tool_choice: none` (or no tools): a call the model emits anyway is dropped, in the
    whole answer and at every chunking of a stream; the content before it is kept."""
    ids = (ids_of("Sure.") + mark("[TOOL_CALLS]") + ids_of("lookup") + mark("[ARGS]")
           + ids_of('{"q": 1}') + mark("[TOOL_CALLS]") + ids_of("other") + [tokenizer.eos_id])
    content, _, calls, finish = parse_completion(tokenizer, ids, "stop", tools_enabled=False)
    assert (content, calls, finish) == ("Sure.", [], "stop")
    rng = random.Random(2)
    for _ in range(20):
        parser = OutputParser(tokenizer, tools_enabled=False)
        pieces, _, calls, finish = stream(parser, ids, random_sizes(rng))
        assert ("".join(pieces), calls, finish) == ("Sure.", [], "stop")
        assert parser.completion_tokens == len(ids)


def test_unclosed_think_stays_reasoning(tokenizer, ids_of, mark):
    ids = mark("[THINK]") + ids_of("still thinking 世")
    parser = OutputParser(tokenizer, tools_enabled=False)
    content, reasoning, _, finish = stream(parser, ids, [1], finish="length")
    assert ("".join(content), reasoning, finish) == ("", "still thinking 世", "length")
    assert parser.reasoning_tokens == len(ids)


def test_markers_are_never_shown(tokenizer, ids_of, mark):
    ids = (ids_of("a") + mark("[/THINK]") + mark("[THINK]") + ids_of("b") + mark("[THINK]")
           + ids_of("c") + mark("[/THINK]") + ids_of("d") + [tokenizer.eos_id])
    parser = OutputParser(tokenizer, tools_enabled=False)
    assert stream(parser, ids, [1])[:3] == (["a", "", "", "", "", "", "", "d", "", ""], "bc", [])
    assert parser.reasoning_tokens == 5  # [THINK] b [THINK] c [/THINK]; the stray close is not


def test_a_tool_call_ends_an_unclosed_thought(tokenizer, ids_of, mark):
    ids = (mark("[THINK]") + ids_of("need data") + mark("[TOOL_CALLS]") + ids_of("fetch")
           + mark("[ARGS]") + ids_of("{}") + [tokenizer.eos_id])
    parser = OutputParser(tokenizer, tools_enabled=True)
    _, reasoning, calls, finish = stream(parser, ids, [2])
    assert (reasoning, [(c.name, c.arguments) for c in calls], finish) == (
        "need data", [("fetch", "{}")], "tool_calls")
    assert parser.reasoning_tokens == 1 + len(ids_of("need data"))


def test_eos_is_never_shown_and_ids_after_it_are_counted_not_shown(tokenizer, ids_of):
    ids = ids_of("done") + [tokenizer.eos_id] + ids_of("ghost")
    parser = OutputParser(tokenizer, tools_enabled=True)
    content, reasoning, calls, finish = stream(parser, ids, [1])
    assert ("".join(content), reasoning, calls, finish) == ("done", "", [], "stop")
    assert parser.completion_tokens == len(ids)


# --- stop strings ------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["END", "lo wo", "\n\n", "界和", "🎉"])
def test_stop_string_is_cut_streaming_and_not(tokenizer, ids_of, stop):
    text = f"hello world 世界和平 then {stop} and 🎉 more"
    ids = ids_of(text)
    expected = text[:text.index(stop)]
    whole = parse_completion(tokenizer, ids, "stop", tools_enabled=False, stop=(stop,))
    assert whole[0] == expected
    rng = random.Random(2)
    for _ in range(30):
        parser = OutputParser(tokenizer, tools_enabled=False, stop=(stop,))
        assert "".join(stream(parser, ids, random_sizes(rng))[0]) == expected


def test_stop_string_split_across_tokens_is_held_then_cut(tokenizer, ids_of):
    ids = ids_of("hello world and more")
    assert not any("lo wo" in tokenizer.decode([i]) for i in ids)  # no one token holds it
    parser = OutputParser(tokenizer, tools_enabled=False, stop=("lo wo",))
    pieces = [parser.feed([i]).content for i in ids]
    last, finish = parser.finish("stop")
    assert pieces[0] == "hel" and "".join(pieces) + last.content == "hel" and finish == "stop"


def test_a_possible_stop_prefix_is_released_once_it_cannot_match(tokenizer, ids_of):
    parser = OutputParser(tokenizer, tools_enabled=False, stop=("ENDING",))
    first = parser.feed(ids_of("the END"))
    second = parser.feed(ids_of(" of it"))
    last, _ = parser.finish("length")
    assert first.content == "the " and second.content == "END of it" and last.content == ""


def test_held_stop_prefix_is_released_at_finish(tokenizer, ids_of):
    parser = OutputParser(tokenizer, tools_enabled=False, stop=("ENDING",))
    assert parser.feed(ids_of("so END")).content == "so "
    assert parser.finish("length")[0].content == "END"


def test_stop_strings_apply_to_content_only_and_end_the_output(tokenizer, ids_of, mark):
    ids = (mark("[THINK]") + ids_of("maybe END") + mark("[/THINK]") + ids_of("fine END")
           + mark("[THINK]") + ids_of("later") + mark("[/THINK]") + ids_of("gone"))
    content, reasoning, calls, finish = parse_completion(tokenizer, ids, "stop",
                                                         tools_enabled=True, stop=("END",))
    assert (content, reasoning, calls, finish) == ("fine ", "maybe END", [], "stop")


def test_sse_events_stay_one_line_for_any_line_splitting():
    import json

    from services.api.http_errors import sse_event

    text = "a\u2028b\u2029c\x85d\ne\r\u00e9"
    event = sse_event({"content": text})
    assert event.endswith("\n\n") and len(event.rstrip("\n").splitlines()) == 1
    assert json.loads(event.removeprefix("data: "))["content"] == text


def test_content_ids_mark_only_the_content_text_of_each_feed(tokenizer, ids_of, mark):
    """What `logprobs.content` covers: content text, never reasoning, a call or a marker."""
    parser = OutputParser(tokenizer, tools_enabled=True)
    thought, answer = ids_of("let me see"), ids_of("It is 4.")
    parser.feed(mark("[THINK]") + thought + mark("[/THINK]") + answer[:1])
    assert parser.content_ids == [False] * (len(thought) + 2) + [True]
    parser.feed(answer[1:] + mark("[TOOL_CALLS]") + ids_of("add") + mark("[ARGS]")
                + ids_of('{"a": 1}'))
    assert parser.content_ids == [True] * (len(answer) - 1) + [False] * (
        len(parser.content_ids) - len(answer) + 1)
    parser.feed([tokenizer.eos_id] + answer)  # nothing after the end is content
    assert parser.content_ids == [False] * (len(answer) + 1)


def test_no_content_id_after_a_stop_string_ended_the_output(tokenizer, ids_of):
    parser = OutputParser(tokenizer, tools_enabled=False, stop=("STOP",))
    parser.feed(ids_of("one two STOP"))
    parser.feed(ids_of(" three"))
    assert parser.content_ids == [False] * len(ids_of(" three"))


def test_logprob_records_are_matched_to_their_own_ids(tokenizer, ids_of, mark):
    """A chunk may carry fewer records than ids (a merged chunk, an engine that gave none for
    its first token): each record is attributed by its own token, never by position."""
    from types import SimpleNamespace

    from services.api.responses import logprob_entries

    parser = OutputParser(tokenizer, tools_enabled=True)
    answer = ids_of("It is 4.")
    ids = mark("[THINK]") + ids_of("hm") + mark("[/THINK]") + answer
    parser.feed(ids)
    record = lambda token: SimpleNamespace(token=token, logprob=-0.5, top=())  # noqa: E731
    whole = logprob_entries([record(t) for t in ids], tokenizer, ids, parser.content_ids)
    assert "".join(e["token"] for e in whole) == tokenizer.decode(answer)
    tail = logprob_entries([record(t) for t in answer[1:]], tokenizer, ids, parser.content_ids)
    assert [e["token"] for e in tail] == [e["token"] for e in whole[1:]]


def test_with_ignore_eos_the_text_past_eos_is_content_and_a_call_it_ended_is_whole(
        tokenizer, ids_of, mark):
    ids = (ids_of("hello") + [tokenizer.eos_id] + ids_of(" more") + mark("[TOOL_CALLS]")
           + ids_of("f") + mark("[ARGS]") + ids_of('{"a": 1}') + [tokenizer.eos_id]
           + ids_of(" after"))
    content, _, calls, _ = parse_completion(tokenizer, ids, "length", tools_enabled=True)
    assert content == "hello" and calls == []  # without it, the output ends at the eos
    parser = OutputParser(tokenizer, tools_enabled=True, ignore_eos=True)
    body = parser.feed(ids)
    last, _ = parser.finish("length")
    assert body.content + last.content == "hello more after"
    assert [(c.name, c.arguments) for c in body.tool_calls + last.tool_calls] == [("f",
                                                                                   '{"a": 1}')]
