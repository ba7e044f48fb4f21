"""llama.cpp through llama-cpp-python's low-level (ctypes) API: a model, one
multi-sequence context, batches, per-sequence KV state and sampler chains.

This is the only module that touches `llama_cpp.llama_cpp`; the scheduler
above it speaks in token lists and sequence ids. The low-level API is the
library's public C binding (no private attribute of `Llama` is used).
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_cpp as native
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

from mlflow_dspy.lm_engine.output_schema import KEY_CHARS

PIECE_BUFFER = 64


class NativeError(RuntimeError):
    """llama.cpp refused an operation (a decode, a state restore)."""


def _metadata(model: Any, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(1 << 16)
    n = native.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode("utf-8", errors="replace") if n >= 0 else None


class NativeModel:
    """The GGUF's weights and vocabulary, and its chat template."""

    def __init__(self, path: Path) -> None:
        # llama.cpp logs every tensor it loads through this logger; keep errors only unless someone chose.
        chatter = logging.getLogger("llama-cpp-python")
        if chatter.level == logging.NOTSET:
            chatter.setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        params = native.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = native.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise NativeError(f"could not load the model at {path}")
        self.vocab = native.llama_model_get_vocab(self.model)
        self.n_vocab = native.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = native.llama_model_n_ctx_train(self.model)
        eos = native.llama_vocab_eos(self.vocab)
        bos = native.llama_vocab_bos(self.vocab)
        eos_text = self.token_text(eos) if eos != -1 else ""
        bos_text = self.token_text(bos) if bos != -1 else ""
        template = _metadata(self.model, "tokenizer.chat_template")
        if template is None:
            raise NativeError("the model carries no chat template")
        # The same formatter llama-cpp-python builds from this metadata for `create_chat_completion`,
        # so a prompt here is token for token the one `Llama` would evaluate.
        self.chat = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text,
                                        stop_token_ids=[eos])
        self.chat_head = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text,
                                             add_generation_prompt=False)

    def token_text(self, token: int) -> str:
        return native.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (native.llama_token * capacity)()
        n = native.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, True)
        if n < 0:
            capacity = -n
            tokens = (native.llama_token * capacity)()
            n = native.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos, True)
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(PIECE_BUFFER)
        n = native.llama_token_to_piece(self.vocab, token, buffer, PIECE_BUFFER, 0, False)
        if n < 0:  # a longer token (runs of spaces or symbols): -n is the size it needs
            buffer = ctypes.create_string_buffer(-n)
            n = native.llama_token_to_piece(self.vocab, token, buffer, -n, 0, False)
        return buffer.raw[:max(0, n)]

    def is_end(self, token: int) -> bool:
        return bool(native.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.model:
            native.llama_model_free(self.model)
            self.model = None


@dataclass(frozen=True)
class ContextShape:
    sequences: int
    tokens_per_sequence: int
    threads: int
    batch: int = 512  # llama-cpp-python's `Llama` default, so prompts are cut in the same places


class NativeContext:
    """One llama context holding `sequences` KV streams, one per sequence (not unified: a sequence's
    attention reads only its own cells, whoever else is in the batch)."""

    def __init__(self, model: NativeModel, shape: ContextShape) -> None:
        params = native.llama_context_default_params()
        params.n_ctx = shape.sequences * shape.tokens_per_sequence
        params.n_batch = shape.batch
        params.n_ubatch = shape.batch
        params.n_seq_max = shape.sequences
        params.n_threads = shape.threads
        params.n_threads_batch = shape.threads
        params.kv_unified = False
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = native.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise NativeError("could not create the llama context")
        self.model = model
        self.shape = shape
        self.tokens_per_sequence = native.llama_n_ctx_seq(self.ctx)
        self.memory = native.llama_get_memory(self.ctx)
        self._batch = native.llama_batch_init(max(shape.batch, shape.sequences), 0, 1)

    def clear(self, seq: int) -> None:
        native.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """Evaluate (token, position, sequence, wants logits) rows in one `llama_decode`."""
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        code = native.llama_decode(self.ctx, batch)
        if code != 0:
            raise NativeError(f"llama_decode failed with code {code}")

    def evaluate(self, tokens: Sequence[int], start: int, seq: int, last_logits: bool) -> None:
        """A prompt's tokens for one sequence alone, in chunks of the batch size (the same cuts every time)."""
        size = self.shape.batch
        for offset in range(0, len(tokens), size):
            chunk = tokens[offset:offset + size]
            end = offset + len(chunk) == len(tokens)
            self.decode([(tok, start + offset + j, seq, last_logits and end and j == len(chunk) - 1)
                         for j, tok in enumerate(chunk)])

    def save(self, seq: int) -> bytes:
        size = native.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = native.llama_state_seq_get_data(self.ctx, buffer, size, seq)
        return bytes(buffer)[:written]

    def restore(self, seq: int, state: bytes) -> None:
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if native.llama_state_seq_set_data(self.ctx, buffer, len(state), seq) == 0:
            self.clear(seq)
            raise NativeError("llama.cpp refused a saved prefix state")

    def logit(self, row: int, token: int) -> float:
        return native.llama_get_logits_ith(self.ctx, row)[token]

    def close(self) -> None:
        if self.ctx:
            native.llama_batch_free(self._batch)
            native.llama_free(self.ctx)
            self.ctx = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None
    grammar: str | None = None  # GBNF
    # True: the grammar filters the whole vocabulary before every token (as `Llama` does), instead of
    # checking the sampled token first. Same tokens, slower; kept to measure and to test that.
    grammar_first: bool = False


class _BoundedConverter(SchemaConverter):
    """llama-cpp-python's schema-to-grammar converter, plus what `output_schema.bounded` asks of it: an object
    without declared properties with `maxProperties` (keys of at most `KEY_CHARS` characters)."""

    def visit(self, schema: dict[str, Any], name: str) -> str:
        if schema.get("type") == "object" and "properties" not in schema and "maxProperties" in schema:
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            prefix = f"{name}{'-' if name else ''}"
            char = self._add_primitive("char", PRIMITIVE_RULES["char"])
            key = self._add_rule(f"{prefix}key", rf'"\"" {char}{{0,{KEY_CHARS}}} "\"" space')
            extra = schema.get("additionalProperties")
            value = self.visit(extra if isinstance(extra, dict) else {}, f"{prefix}value")
            member = self._add_rule(f"{prefix}member", f'{key} ":" space {value}')
            more = int(schema["maxProperties"]) - 1
            members = f'({member} ("," space {member}){{0,{more}}})?' if more >= 0 else ""
            return self._add_rule(rule_name, f'"{{" space {members} "}}" space')
        return super().visit(schema, name)


def grammar_for_schema(schema: dict[str, Any] | None) -> str:
    """GBNF for a JSON schema, bounded where it is open (`output_schema.bounded`; llama-cpp-python's
    converter, as `create_chat_completion` uses, does the rest). `{}`/None: any JSON object, bounded."""
    from mlflow_dspy.lm_engine.output_schema import any_object, bounded

    try:
        return _convert(bounded(schema or {}))
    except Exception:  # a schema the converter cannot read: any JSON object, bounded
        return _convert(any_object())


def _convert(schema: dict[str, Any]) -> str:
    converter = _BoundedConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "stdin"), "")
    return converter.format_grammar()


class SamplerChain:
    """One request's sampling: a fast chain without the grammar, and the full chain with it.

    Like llama.cpp's own common sampler, a token is drawn without the grammar
    and then checked against it alone; only when the grammar rejects it does
    the full-vocabulary grammar pass run. For greedy decoding the result is
    the same token (the global best, if allowed, is the best allowed one).
    """

    def __init__(self, model: NativeModel, sampling: Sampling) -> None:
        seed = native.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
        self.fast = self._chain(sampling, seed)
        self.full = None
        self.grammar = None
        if sampling.grammar is not None:
            grammar = native.llama_sampler_init_grammar(model.vocab, sampling.grammar.encode(), b"root")
            if not grammar:
                native.llama_sampler_free(self.fast)
                raise ValueError("the response schema could not be turned into a grammar")
            self.full = native.llama_sampler_chain_init(native.llama_sampler_chain_default_params())
            native.llama_sampler_chain_add(self.full, grammar)
            self._add_choice(self.full, sampling, seed)
            self.grammar = grammar  # owned by the full chain
        self._check = native.llama_token_data_array()
        self._one = native.llama_token_data()
        self._check.data = ctypes.pointer(self._one)
        self.grammar_first = sampling.grammar_first
        self.grammar_passes = 0

    @staticmethod
    def _add_choice(chain: Any, sampling: Sampling, seed: int) -> None:
        if sampling.temperature <= 0.0:
            native.llama_sampler_chain_add(chain, native.llama_sampler_init_greedy())
            return
        # llama-cpp-python's `Llama` defaults for a sampled completion.
        native.llama_sampler_chain_add(chain, native.llama_sampler_init_top_k(40))
        native.llama_sampler_chain_add(chain, native.llama_sampler_init_top_p(sampling.top_p, 1))
        native.llama_sampler_chain_add(chain, native.llama_sampler_init_min_p(0.05, 1))
        native.llama_sampler_chain_add(chain, native.llama_sampler_init_temp(sampling.temperature))
        native.llama_sampler_chain_add(chain, native.llama_sampler_init_dist(seed))

    def _chain(self, sampling: Sampling, seed: int) -> Any:
        chain = native.llama_sampler_chain_init(native.llama_sampler_chain_default_params())
        self._add_choice(chain, sampling, seed)
        return chain

    def _allowed(self, context: NativeContext, row: int, token: int) -> bool:
        self._one.id = token
        self._one.logit = context.logit(row, token)
        self._one.p = 0.0
        self._check.size = 1
        self._check.selected = -1
        self._check.sorted = False
        native.llama_sampler_apply(self.grammar, ctypes.byref(self._check))
        return not math.isinf(self._one.logit)

    def forced(self, context: NativeContext, row: int, tokens: Sequence[int]) -> int | None:
        """The first of `tokens` the grammar allows at this point, taken as the sequence's next token (the
        grammar accepts it); None if it allows none of them (or there is no grammar)."""
        if self.grammar is None:
            return None
        for token in tokens:
            if self._allowed(context, row, token):
                native.llama_sampler_accept(self.grammar, token)
                # Grammar first: the full pass `Llama` makes before each token (the same answer for these).
                self.grammar_passes += self.grammar_first
                return token
        return None

    def sample_unless(self, context: NativeContext, row: int, veto: Callable[[int], bool]) -> int | None:
        """`sample`, unless `veto` refuses the model's own choice (then nothing is taken: None)."""
        if self.grammar is None:
            return self.sample(context, row)
        token = native.llama_sampler_sample(self.fast, context.ctx, row)
        if veto(token):
            return None
        if self.grammar_first:
            return self.sample(context, row)
        if self._allowed(context, row, token):
            native.llama_sampler_accept(self.grammar, token)
            return token
        self.grammar_passes += 1
        return native.llama_sampler_sample(self.full, context.ctx, row)

    def sample(self, context: NativeContext, row: int) -> int:
        if self.grammar is not None and self.grammar_first:
            self.grammar_passes += 1
            return native.llama_sampler_sample(self.full, context.ctx, row)
        token = native.llama_sampler_sample(self.fast, context.ctx, row)
        if self.grammar is None:
            return token
        if self._allowed(context, row, token):
            native.llama_sampler_accept(self.grammar, token)
            return token
        self.grammar_passes += 1
        return native.llama_sampler_sample(self.full, context.ctx, row)  # accepts into the grammar too

    def close(self) -> None:
        for chain in (self.fast, self.full):
            if chain:
                native.llama_sampler_free(chain)
        self.fast = self.full = self.grammar = None
