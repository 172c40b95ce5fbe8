"""Constrained decoding on SGLang: its own llguidance grammar backend, given the Mistral token
table it cannot build itself. Loaded by SGLang as a plugin; imports sglang (GPU hosts only).

Why a plugin: our engines run with `skip_tokenizer_init` (token ids in and out, see
`sglang_args`), and under it SGLang's `GrammarManager` makes no grammar backend at all (its
scheduler has no tokenizer); even with one, SGLang's backends build their token tables from a
`tokenizers` fast tokenizer, and the checkpoint's is Tekken. mistral-common builds llguidance's
token table from `tekken.json` (`GrammarFactory.llg_tokenizer`, the one the reference engine's
masks use), so the grammar, the token table and the matcher are the same on both engines.

How it gets in: `pyproject.toml` lists `install` under SGLang's plugin entry-point group
(`sglang.srt.plugins`); SGLang's `load_plugins()` runs it early in each of its processes (the
engine's, each scheduler's). It hooks `GrammarManager.__init__`: a manager left without a backend,
under `grammar_backend` "llguidance" (what `sglang_args.server_args` sets), on a model directory
holding `tekken.json`, gets `MistralGuidanceBackend`. Any other SGLang deployment is untouched.

What a request sends (`sglang_args.grammar_key`): the Lark grammar as SGLang's `ebnf` sampling
parameter, which llguidance reads as Lark; a leg resumed after tokens were generated puts them
in a first comment line that the backend advances the new matcher over (SGLang's own grammar
starts from nothing). SGLang's PD code carries the grammar's state from prefill to decode itself:
the prefill engine's matcher takes the first token, the decode engine's takes it on arrival.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

from services.engines.sglang_args import ADVANCE_MARKER, GRAMMAR_BACKEND, parse_grammar_key

log = logging.getLogger("small4.grammar")

MANAGER_INIT = "sglang.srt.constrained.grammar_manager.GrammarManager.__init__"

# Compiled grammars a scheduler keeps for reuse, the least recently used dropped first. SGLang's
# own cache keeps every grammar it ever compiled for the life of the process, and a schema is
# cheap to send: distinct ones would grow a scheduler's memory without bound.
CACHED_GRAMMARS = 256


def install() -> None:
    """SGLang plugin entry point: register the hook; SGLang applies it after all plugins ran."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(MANAGER_INIT, give_backend, HookType.AFTER)


def give_backend(result: Any, manager: Any, *args: Any, **kwargs: Any) -> None:
    """After `GrammarManager.__init__`: give a manager left without a backend ours, where ours
    applies (see the module's docstring); leave every other manager as SGLang made it."""
    if manager.grammar_backend is not None:
        return
    server_args = manager.server_args
    if getattr(server_args, "grammar_backend", None) != GRAMMAR_BACKEND:
        return
    tekken = Path(server_args.tokenizer_path or server_args.model_path) / "tekken.json"
    if not tekken.is_file():
        return
    manager.grammar_backend = backend_for(tekken)
    log.info("constrained decoding: SGLang's llguidance backend on %s", tekken)


@cache
def backend_for(tekken: Path) -> Any:
    """One backend per tokenizer file and process (its token table is ~40 MB, ~2 s to build)."""
    from services.grammar import Guidance
    from services.tokenizer import load_tokenizer

    return _backend_class()(Guidance(load_tokenizer(tekken)).llg_tokenizer)


@cache
def _backend_class() -> type:
    """`MistralGuidanceBackend`, defined on first use: it subclasses SGLang's backend, so this
    module imports sglang only when SGLang itself loads it."""
    from sglang.srt.constrained.base_grammar_backend import (BaseGrammarBackend,
                                                             BaseGrammarObject,
                                                             InvalidGrammarObject)
    from sglang.srt.constrained.llguidance_backend import (GuidanceBackend, GuidanceGrammar,
                                                           _get_or_init_mask_executor)

    class MistralGuidanceGrammar(GuidanceGrammar):
        """SGLang's llguidance grammar object, keeping the last token it took (`current_token`)
        as SGLang's other grammar objects do: a PD decode engine resuming a request it
        retracted (its KV was short) gives the request's last token to any grammar whose
        `current_token` is None (`process_prebuilt`), and llguidance's never set it, so a
        retracted structured request took its last token twice and was aborted (a 500)."""

        def accept_token(self, token: int):
            super().accept_token(token)
            self.current_token = token

        def copy(self):  # a request's own (its template's state, no token taken yet)
            return MistralGuidanceGrammar(self.llguidance_tokenizer, self.serialized_grammar,
                                          ll_matcher=self.ll_matcher.deep_copy())

    class MistralGuidanceBackend(GuidanceBackend):
        """SGLang's `GuidanceBackend` (its grammar objects, batched masks, caching, PD
        handling) on mistral-common's llguidance token table; `ebnf` keys are our grammars.
        Its cache is bounded (`CACHED_GRAMMARS`, least recently used out first) and never
        keeps a resumed leg's grammar (its key names that request's tokens: never reused)."""

        def __init__(self, llg_tokenizer: Any):
            BaseGrammarBackend.__init__(self)
            self.cache = OrderedDict()
            self.tokenizer = None
            self.any_whitespace, self.whitespace_pattern = False, None
            self.llguidance_tokenizer = llg_tokenizer
            _get_or_init_mask_executor()

        def _from_serialized(self, serialized_grammar: str) -> BaseGrammarObject:
            try:
                return MistralGuidanceGrammar(self.llguidance_tokenizer, serialized_grammar)
            except Exception as exc:  # as SGLang's own: a grammar llguidance refuses
                return InvalidGrammarObject(str(exc))

        def dispatch_ebnf(self, key_string: str) -> BaseGrammarObject:
            lark, history = parse_grammar_key(key_string)
            grammar = super().dispatch_ebnf(lark)
            if isinstance(grammar, InvalidGrammarObject):
                return grammar
            try:
                for token in history:
                    if grammar.ll_matcher.is_stopped():
                        break
                    grammar.accept_token(token)
            except ValueError as exc:  # a history the grammar does not take
                return InvalidGrammarObject(f"resumed tokens break the grammar: {exc}")
            # where the leg starts, not a token it took: a compiled grammar is the request's
            # own (uncopied), and its decode engine must still give it the leg's first token
            grammar.current_token = None
            return grammar

        def get_cached_or_future_value(self, key: tuple[str, str], require_reasoning: bool):
            value, hit = super().get_cached_or_future_value(key, require_reasoning)
            if hit:
                self.cache.move_to_end(key)
            return value, hit

        def set_cache(self, key: tuple[str, str], value: BaseGrammarObject) -> None:
            if key[1].startswith(ADVANCE_MARKER):
                return
            self.cache[key] = value
            self.cache.move_to_end(key)
            while len(self.cache) > CACHED_GRAMMARS:
                self.cache.popitem(last=False)

    return MistralGuidanceBackend
