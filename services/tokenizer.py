"""Mistral's prompt format through mistral-common: OpenAI messages in, token ids out, and back.

The ingress owns this; engines only ever see the ids. Decoding keeps control tokens (`[THINK]`,
`[TOOL_CALLS]`, ...) so the output parser can split reasoning and tool calls.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np

from services.errors import InvalidRequest
from services.model.standin import write_standin_tokenizer


@dataclass
class EncodedPrompt:
    """Prompt ids with image placeholders expanded, plus the images' CHW float32 pixels."""

    ids: list[int]
    images: list[np.ndarray]
    effort: str
    pixels_owner: Any = None  # where the multimodal service keeps the pixels (a `PixelOwner`)


def _check_tool_schemas_in_rust(validator: Any) -> None:
    """Have mistral-common's request validator check a tool's parameters against the JSON
    Schema Draft 7 meta-schema in Rust (jsonschema_rs), its `pattern`s as regular expressions
    there, then run its own checks (the function's name) on the function without them.

    Its own check compiles every `pattern` (and `patternProperties` name) with Python's `re`,
    on the event loop, for a client's input: a character class over a wide range costs
    milliseconds to compile (`[\\x01-\\uffff]` ~4 ms, case-insensitive ~5 ms), so a
    tool of a few KB of them held the loop for seconds, charged nothing. Rust's regex parser
    takes microseconds. Its dialect is close to the ECMA-262 one JSON Schema defines a
    `pattern` in, not Python's: Python-only syntax (`(?P<name>...)`, a leading `(?i)`, `\\A`,
    `\\Z`) is refused. No other format is checked (`$id`, `$ref` as URIs), as Python's
    check did not (its URI checker is not installed)."""
    import jsonschema
    import jsonschema_rs
    from mistral_common.exceptions import InvalidToolSchemaException

    meta = jsonschema_rs.Draft7Validator(
        _regex_formats_only(jsonschema.Draft7Validator.META_SCHEMA), validate_formats=True)
    base = type(validator)

    class RustSchemaValidator(base):  # type: ignore[misc, valid-type]
        def _validate_function(self, function: Any) -> None:
            try:
                error = next(iter(meta.iter_errors(function.parameters)), None)
            except UnicodeEncodeError:  # a lone surrogate, which Rust's strings cannot hold:
                # checked as U+FFFD (a literal in a pattern too), as mistral-common takes it
                error = next(iter(meta.iter_errors(_surrogates_replaced(function.parameters))),
                             None)
            if error is not None:
                where = "/".join(map(str, error.instance_path)) or "its root"
                raise InvalidToolSchemaException(f"Invalid tool schema at {where}: "
                                                 f"{error.message}")
            super()._validate_function(function.model_copy(update={"parameters": {}}))

    validator.__class__ = RustSchemaValidator  # the one this tokenizer was built with


def _regex_formats_only(schema: Any) -> Any:
    """`schema` (a meta-schema) with every `format` but `regex` taken out."""
    if isinstance(schema, dict):
        return {k: _regex_formats_only(v) for k, v in schema.items()
                if not (k == "format" and v != "regex")}
    if isinstance(schema, list):
        return [_regex_formats_only(v) for v in schema]
    return schema


def _surrogates_replaced(value: Any) -> Any:
    """`value` (JSON) with every lone surrogate in its strings made U+FFFD."""
    text = json.dumps(value, ensure_ascii=False)
    return json.loads(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


def standin_tokenizer_path() -> Path:
    """Where the stand-in `tekken.json` is written (built from mistral-common's own vocabulary)."""
    return write_standin_tokenizer(Path(tempfile.gettempdir()) / "small4-standin")


@cache
def load_tokenizer(path: Path | None = None) -> PromptTokenizer:
    """The process's one `PromptTokenizer` for `path` (the stand-in when None): it is read-only
    once loaded, and each load costs a second and ~70 MB, so the ingress, the multimodal worker
    and the engines of an in-process stack share it rather than each reading it again."""
    return PromptTokenizer(path)


class PromptTokenizer:
    """mistral-common's tokenizer with the few calls the stack makes."""

    def __init__(self, path: Path | None = None):
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.path = Path(path) if path else standin_tokenizer_path()
        self._mt = MistralTokenizer.from_file(str(self.path), mode=ValidationMode.test)
        _check_tool_schemas_in_rust(self._mt._chat_completion_request_validator)
        self._raw = self._mt.instruct_tokenizer.tokenizer

    def __reduce__(self):
        """Rebuilt from its file where it is copied or pickled: mistral-common's own tokenizer
        pickles as its file too, which would drop the Rust schema check installed here."""
        return PromptTokenizer, (self.path,)

    @property
    def mistral(self):
        """mistral-common's `MistralTokenizer` (its grammar factory is built from it)."""
        return self._mt

    @cached_property
    def eos_id(self) -> int:
        return self._raw.eos_id

    @property
    def vocab_size(self) -> int:
        return self._raw.n_words

    def special(self, name: str) -> int:
        """The id of a control token by its name, e.g. `[THINK]`."""
        return self._raw.get_special_token(name)

    def encode_chat(self, messages: list[dict[str, Any]], *, effort: str,
                    tools: list[dict[str, Any]] | None = None,
                    images: dict[tuple[int, int], Any] | None = None) -> EncodedPrompt:
        """Encode an OpenAI-shaped conversation the way Mistral's own tokenizer does.

        `images` maps (message index, part index) of `image_url` parts to decoded PIL images;
        those parts are encoded from them, never fetched or decoded by mistral-common. A last
        assistant message with `prefix: true` (Mistral's prefill) is continued, not answered.
        """
        from mistral_common.exceptions import (InvalidToolException, InvalidToolSchemaException,
                                               MistralCommonException)
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        messages, prefill = _prefill(messages)
        try:
            stripped = _without_images(messages, images or {})
            request = ChatCompletionRequest.from_openai(stripped, tools=tools or None,
                                                        reasoning_effort=effort,
                                                        continue_final_message=prefill)
            if images:
                _put_images(request, messages, images)
            tokenized = self._mt.encode_chat_completion(request)
        except KeyError as exc:
            raise InvalidRequest(f"messages could not be encoded: a message lacks the field "
                                 f"{exc.args[0]!r} its role needs", param="messages") from None
        except (InvalidToolException, InvalidToolSchemaException) as exc:  # a tool's definition
            raise InvalidRequest(f"tools could not be encoded: {reason(exc)}",
                                 param="tools") from None
        except (MistralCommonException, ValueError, TypeError) as exc:
            raise InvalidRequest(f"messages could not be encoded: {reason(exc)}",
                                 param="messages") from None
        except RecursionError:  # a call's `arguments` (a JSON string: no body check saw it)
            raise InvalidRequest("messages could not be encoded: a tool call's arguments nest "
                                 "too deeply to parse", param="messages") from None
        return EncodedPrompt(list(tokenized.tokens), list(tokenized.images), effort)

    def image_tokens(self, width: int, height: int) -> int:
        """Prompt tokens of one `width` x `height` image, known from its header alone: its
        `[IMG]` grid as mistral-common's own image encoder sizes it (reading only the size),
        one `[IMG_BREAK]` or `[IMG_END]` closing each row."""
        cols, rows = self.image_grid(width, height)
        return rows * (cols + 1)

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of `[IMG]` patches a `width` x `height` image is encoded as."""
        encoder = self._mt.instruct_tokenizer.image_encoder
        if encoder is None:
            raise InvalidRequest("this model does not accept images", param="messages")
        return encoder._image_to_num_tokens(_Sized((width, height)))

    @property
    def image_config(self) -> Any:
        """mistral-common's image encoder settings (patch size, spatial merge, largest side)."""
        encoder = self._mt.instruct_tokenizer.image_encoder
        if encoder is None:
            raise InvalidRequest("this model does not accept images", param="messages")
        return encoder.image_config

    @cached_property
    def max_image_tokens(self) -> int:
        """Prompt tokens of the largest image the encoder makes (its longest side at
        `max_image_size`): the most any one image can take."""
        encoder = self._mt.instruct_tokenizer.image_encoder
        if encoder is None:
            return 0
        side = encoder.image_config.max_image_size
        return self.image_tokens(side, side)

    def exceeds(self, texts: Iterable[str], limit: int, piece_chars: int = 1 << 18) -> bool:
        """Whether `texts` take more than `limit` tokens, counted piece by piece and stopped
        once they do: the cost is what reaches the limit, not the texts' size. A cut between
        pieces can split what would be one token (at most two more per cut, counted off)."""
        count = 0
        for text in texts:
            for start in range(0, len(text), piece_chars):
                count += len(self._raw.encode(text[start:start + piece_chars], bos=False,
                                              eos=False)) - (2 if start else 0)
                if count > limit:
                    return True
        return False

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` with control tokens kept as their names."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self._mt.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)

    def token_piece(self, token_id: int) -> str:
        """One token's text; control tokens as their names."""
        return self.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes (a piece of a multi-byte character is not text on its own)."""
        return self._raw.id_to_byte_piece(token_id, special_token_policy="keep")

    def is_control(self, token_id: int) -> bool:
        """Whether the id is a control token (`[THINK]`, `[TOOL_CALLS]`, end of sequence...)."""
        return token_id < self._raw.num_special_tokens


@dataclass(frozen=True)
class _Sized:
    """What mistral-common's image encoder reads of an image to size its token grid."""

    size: tuple[int, int]


def _prefill(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """Messages without `prefix`, and whether the last one is to be continued. Mistral's format
    continues only the last message, an assistant's (its validator checks the rest)."""
    marked = [i for i, m in enumerate(messages) if m.get("prefix")]
    if not marked:
        return messages, False
    last = len(messages) - 1
    if marked != [last] or messages[last].get("role") != "assistant":
        raise InvalidRequest(f"messages.{marked[0]}.prefix: only the last message, an "
                             f"assistant's, may be a prefix to continue", param="messages")
    return [{k: v for k, v in m.items() if k != "prefix"} for m in messages], True


def _without_images(messages, images):
    """Messages with the given image parts replaced by a placeholder text part."""
    if not images:
        return messages
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list) and any((i, j) in images for j in range(len(content))):
            message = {**message, "content": [{"type": "text", "text": "."}]}
        out.append(message)
    return out


def _put_images(request, messages, images) -> None:
    """Rebuild the user turns that carry images, with the decoded images in part order."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage

    if len(request.messages) != len(messages):
        raise ValueError("messages did not map one to one")
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list) or not any((i, j) in images for j in range(len(content))):
            continue
        chunks = [ImageChunk(image=images[(i, j)]) if (i, j) in images
                  else TextChunk(text=part["text"]) for j, part in enumerate(content)]
        request.messages[i] = UserMessage(content=chunks)


def reason(exc: BaseException) -> str:
    """What a library's exception says, on one line: a pydantic validation error by its first
    error's place and message (its first line is only "N validation errors for X")."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(map(str, first.get("loc", ())))
        return f"{where}: {first['msg']}"[:300] if where else first["msg"][:300]
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
