"""Build the engine named in settings; unknown kinds raise, heavy engines import lazily."""

from __future__ import annotations

from services.engines.protocol import Engine
from services.engines.stops import OutputMarks
from services.grammar import warmed
from services.settings import EngineSettings, ModelSettings, WorkerSettings
from services.tokenizer import PromptTokenizer


def build_engine(model: ModelSettings, engine: EngineSettings, *, role: str,
                 tokenizer: PromptTokenizer, worker: WorkerSettings | None = None) -> Engine:
    """An engine of `engine.kind` for `role` ("prefill", "decode" or "both"), wrapped in fault
    injection when `engine.faults` asks for any. `worker` (GPU engines) says where it runs."""
    built = _build(model, engine, role=role, tokenizer=tokenizer, worker=worker)
    faults = engine.faults
    if faults.prefill_fail_every or faults.decode_fail_every:
        from services.engines.faults import FaultyEngine

        return FaultyEngine(built, faults)
    return built


def _build(model: ModelSettings, engine: EngineSettings, *, role: str,
           tokenizer: PromptTokenizer, worker: WorkerSettings | None) -> Engine:
    if engine.kind == "reference":
        from services.engines.reference import ReferenceEngine
        from services.model.loader import load_model

        bundle = load_model(model)
        if bundle.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model's vocabulary ({bundle.vocab_size}) is smaller than the "
                             f"tokenizer's ({tokenizer.vocab_size}); use a matching tokenizer")
        return ReferenceEngine(bundle, engine, role=role, context_length=model.context_length,
                               eos_ids=(tokenizer.eos_id,), detokenize=tokenizer.decode,
                               image_end_id=tokenizer.special("[IMG_END]"),
                               guidance=warmed(tokenizer), marks=OutputMarks.of(tokenizer),
                               vocab_size=tokenizer.vocab_size)
    if engine.kind == "simulated":
        from services.engines.simulated import SimulatedEngine

        return SimulatedEngine(engine, role=role, context_length=model.context_length,
                               tokenizer=tokenizer)
    if engine.kind == "sglang":
        from services.engines.sglang_engine import SGLangEngine

        if worker is None:
            raise ValueError("the SGLang engine runs inside a prefill or decode worker")
        return SGLangEngine(worker, role=role, tokenizer=tokenizer)
    raise ValueError(f"unknown engine kind {engine.kind!r}")
