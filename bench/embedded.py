"""Raw llama-cpp on the embedded GGUF: the yardstick for the gateway's embedded figures.

The prompt is the very one the gateway's `qa` program sends to its engine
(captured from an in-process run), with the same grammar and sampling, so the
two sides generate the same tokens and only the serving path differs. Both
sides count time to the first *visible* character: the gateway streams field
values, so raw output is timed to the first character of a JSON field's value,
not to the `{` that opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import dspy
import jiter

from bench.launch import CHAT, QUESTION, gateway_args, log_model, scrape, start
from bench.loadgen import timed_stream
from bench.soak import rss_mb
from bench.steal import measured
from mlflow_dspy.lm_engine.embedded_settings import EmbeddedSettings
from mlflow_dspy.lm_engine.gguf import locate_gguf
from mlflow_dspy.lm_engine.llama_engine import DEFAULT_CONTEXT, DEFAULT_MAX_TOKENS, LlamaCppEngine, response_schema
from mlflow_dspy.lm_engine.messages import chat_messages


class _Capture(LlamaCppEngine):
    """Records the request it is given, then generates as usual."""

    requests: list = []

    def generate(self, request, cancel=None):
        _Capture.requests.append(request)
        return super().generate(request, cancel)


def captured_request(question: str) -> Any:
    from mlflow_dspy.lm_engine.llama_engine import EMBEDDED_MODEL
    from mlflow_dspy.program.target import open_target

    engine = _Capture()
    lm = dspy.LM(EMBEDDED_MODEL, engine=engine, cache=False)
    # An answer the program cannot parse still made the request.
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()), contextlib.suppress(Exception):
        open_target("qa").chat()(messages=[{"role": "user", "content": question}])
    return _Capture.requests[-1]


def raw_kwargs(request: Any) -> dict[str, Any]:
    """`create_chat_completion` arguments with the sampling and grammar the engine uses for `request`."""
    config = request.config
    kwargs: dict[str, Any] = {"max_tokens": config.max_tokens or DEFAULT_MAX_TOKENS,
                              "temperature": 0.0 if config.temperature is None else config.temperature}
    schema = response_schema(request)
    if schema is not None:
        kwargs["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
    return kwargs


def _visible(text: str) -> bool:
    """Whether the JSON written so far holds the first character of a field's value (what a user sees first)."""
    try:
        value = jiter.from_json(text.encode(), partial_mode="trailing-strings")
    except ValueError:
        return False
    return isinstance(value, dict) and any(isinstance(v, str) and v for v in value.values())


class RawLlama:
    """Bare `Llama.create_chat_completion` on the gateway's own prompt, grammar and sampling."""

    def __init__(self, question: str) -> None:
        from llama_cpp import Llama

        request = captured_request(question)
        self.messages = chat_messages(request)
        self.kwargs = raw_kwargs(request)
        self.llama = Llama(model_path=str(locate_gguf()), n_ctx=DEFAULT_CONTEXT,
                           n_threads=max(1, os.cpu_count() or 1), verbose=False)

    def run(self) -> tuple[float, float, int]:
        """(seconds to the first visible character, seconds in all, completion tokens)."""
        self.llama.reset()
        started = time.perf_counter()
        first, tokens, text = None, 0, ""
        for chunk in self.llama.create_chat_completion(messages=self.messages, stream=True, **self.kwargs):
            piece = chunk["choices"][0].get("delta", {}).get("content")
            if piece:
                tokens += 1
                text += piece
                if first is None and _visible(text):
                    first = time.perf_counter() - started
        return first or float("nan"), time.perf_counter() - started, tokens

    def close(self) -> None:
        self.llama.close()


# -- the section `make bench` runs ------------------------------------------------------------------
TARGETS = {"first_text": 0.35, "concurrent_rate": 2.0, "concurrent_p50": 2.0, "single_rate": 0.95}
CONCURRENT = 4


def _cache_figures(base: str) -> dict:
    values: dict[str, float] = {}
    for sample in scrape(base):
        if sample.name == "mlflow_dspy_embedded_prefix_cache_total":
            values[sample.labels["outcome"]] = sample.value
        elif sample.name == "mlflow_dspy_embedded_prefix_cache_bytes":
            values["bytes"] = sample.value
    hits, misses = values.get("hit", 0), values.get("miss", 0)
    return {"hits": int(hits), "misses": int(misses), "evictions": int(values.get("eviction", 0)),
            "hit_rate": round(hits / (hits + misses), 3) if hits + misses else 0.0,
            "bytes": int(values.get("bytes", 0))}


async def _together(url: str, body: dict, n: int) -> tuple[float, list]:
    began = time.perf_counter()
    timings = await asyncio.gather(*(timed_stream(url, body) for _ in range(n)))
    return time.perf_counter() - began, list(timings)


def embedded_figures(env: dict[str, str], tmp: Path, runs: int = 5, rounds: int = 3) -> dict:
    """The embedded model through the gateway (its defaults: batching and the prefix cache on) against raw
    llama-cpp-python one request at a time (`create_chat_completion`, same prompt, grammar and sampling):
    warm time to the first visible character and tokens/s at one request (calls interleaved, raw then
    gateway, so both see the same machine; medians), then 4 requests at once, the prefix cache's hit rate
    and the gateway's memory."""
    embedded_env = {k: v for k, v in env.items() if k not in ("DSPY_LM", "DSPY_LM_API_BASE")}
    model_uri, _ = log_model(embedded_env)
    raw = RawLlama(QUESTION)
    context, base, began = start(gateway_args(model_uri), "/ready", embedded_env, tmp / "embedded.log")
    with context as gateway, measured() as steal:
        cold = time.perf_counter() - began
        rss_ready = rss_mb(gateway.pid, children=False)  # the gateway alone, not its trace writer
        url = f"{base}/v1/chat/completions"
        asyncio.run(timed_stream(url, CHAT))  # warm both: the program's prefix is cached from here on
        raw.run()
        raw_runs, single_runs = [], []
        for _ in range(runs):
            raw_runs.append(raw.run())
            timing = asyncio.run(timed_stream(url, CHAT))
            single_runs.append((timing.first_token_s, timing.total_s, timing.completion_tokens))
        concurrent = [asyncio.run(_together(url, CHAT, CONCURRENT)) for _ in range(rounds)]
        cache = _cache_figures(base)
        rss_end = rss_mb(gateway.pid, children=False)
    raw.close()
    grammar = grammar_figures(QUESTION)
    settings = EmbeddedSettings.from_env()

    def figures(runs_: list[tuple[float, float, int]]) -> dict:
        return {"tokens_per_s": round(statistics.median(n / total for _, total, n in runs_), 2),
                "first_text_s": round(statistics.median(first for first, _, _ in runs_), 3),
                "latency_p50_s": round(statistics.median(total for _, total, _ in runs_), 3),
                "completion_tokens": statistics.median(n for _, _, n in runs_)}

    ours, theirs = figures(single_runs), figures(raw_runs)
    # One request at a time, the engine's own rate: its tokens over the time they took (a queue's rate).
    single_rate = sum(n for _, _, n in single_runs) / sum(total for _, total, _ in single_runs)
    together_rate = statistics.median(sum(t.completion_tokens for t in timings) / wall for wall, timings in concurrent)
    together_p50 = statistics.median(t.total_s for _, timings in concurrent for t in timings)
    ratios = {
        "first_text": round(ours["first_text_s"] / theirs["first_text_s"], 3),
        "single_rate": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "concurrent_rate": round(together_rate / single_rate, 3),
        "concurrent_p50": round(together_p50 / ours["latency_p50_s"], 3),
    }
    passed = {"first_text": ratios["first_text"] <= TARGETS["first_text"],
              "single_rate": ratios["single_rate"] >= TARGETS["single_rate"],
              "concurrent_rate": ratios["concurrent_rate"] >= TARGETS["concurrent_rate"],
              "concurrent_p50": ratios["concurrent_p50"] <= TARGETS["concurrent_p50"],
              "memory": rss_end - rss_ready <= settings.cache_mb}
    return {"raw_llama_cpp": theirs, "gateway": ours, "gateway_cold_start_s": round(cold, 2), "runs": runs,
            "concurrent": {"requests": CONCURRENT, "rounds": rounds, "tokens_per_s": round(together_rate, 2),
                           "single_tokens_per_s": round(single_rate, 2), "latency_p50_s": round(together_p50, 3)},
            "ratios": ratios, "targets": TARGETS, "pass": passed, "prefix_cache": cache, "grammar": grammar,
            "settings": {"parallel": settings.parallel, "cache_mb": settings.cache_mb, "queue": settings.queue},
            "memory": {"rss_ready_mb": round(rss_ready, 1), "rss_end_mb": round(rss_end, 1),
                       "growth_mb": round(rss_end - rss_ready, 1), "cache_limit_mb": settings.cache_mb},
            # the earlier figures' names, kept for the README's history
            "tokens_per_s_ratio": ratios["single_rate"], "first_token_ratio": ratios["first_text"],
            "cpu_steal_percent": steal["percent"]}


def embedded_target_line(e: dict) -> str:
    r, t, p, c = e["ratios"], e["targets"], e["pass"], e["concurrent"]

    def verdict(key: str) -> str:
        return "met" if p[key] else "MISSED"

    s = e['settings']
    return (f"embedded model (gateway defaults: {s['parallel']} sequences, {s['cache_mb']:g} MB "
            f"prefix cache) against raw llama-cpp-python: warm first visible text {e['gateway']['first_text_s']} vs "
            f"{e['raw_llama_cpp']['first_text_s']} s = {r['first_text']}x (target <= {t['first_text']}x: "
            f"{verdict('first_text')}); one request {e['gateway']['tokens_per_s']} vs "
            f"{e['raw_llama_cpp']['tokens_per_s']} tokens/s = {r['single_rate']}x (target >= {t['single_rate']}x: "
            f"{verdict('single_rate')}); {c['requests']} at once {c['tokens_per_s']} vs {c['single_tokens_per_s']} "
            f"tokens/s one at a time = {r['concurrent_rate']}x (target >= {t['concurrent_rate']}x: "
            f"{verdict('concurrent_rate')}), p50 {c['latency_p50_s']} vs {e['gateway']['latency_p50_s']} s = "
            f"{r['concurrent_p50']}x (target <= {t['concurrent_p50']}x: {verdict('concurrent_p50')}); prefix cache "
            f"hit rate {e['prefix_cache']['hit_rate']} ({e['prefix_cache']['bytes'] / 2**20:.1f} MB held); RSS "
            f"{e['memory']['rss_ready_mb']} -> {e['memory']['rss_end_mb']} MB (+{e['memory']['growth_mb']}, limit "
            f"{e['memory']['cache_limit_mb']:g} MB: {verdict('memory')}); the grammar's share of a token's time "
            f"{e['grammar']['grammar_share']['checked_first']} checking the sampled token first "
            f"({e['grammar']['grammar_share']['full_grammar_pass']} with a full pass every token); "
            f"steal {e['cpu_steal_percent']}%")


def grammar_figures(question: str, repeats: int = 3) -> dict:
    """How much of the time per token the grammar takes: the captured qa request decoded by one
    sequence with the grammar filtering the whole vocabulary before every token (as `Llama` does),
    with the sampled token checked first (the engine's way; same tokens), and with no grammar."""
    from mlflow_dspy.lm_engine.llama_engine import embedded_model, scheduler_job
    from mlflow_dspy.lm_engine.llama_native import ContextShape
    from mlflow_dspy.lm_engine.llama_scheduler import Outcome, Scheduler

    request = captured_request(question)
    scheduler = Scheduler(embedded_model(), ContextShape(sequences=1, tokens_per_sequence=2048,
                                                         threads=max(1, os.cpu_count() or 1)), 64 << 20, 4)

    def per_token(grammar: str) -> tuple[float, float]:
        spent = tokens = passes = 0.0
        for _ in range(repeats):
            items: queue.SimpleQueue = queue.SimpleQueue()
            job = scheduler_job(scheduler.model, request, DEFAULT_MAX_TOKENS, items.put, threading.Event())
            if grammar == "none":
                job.sampling = dataclasses.replace(job.sampling, grammar=None)
            job.max_tokens = 40
            job.sampling = dataclasses.replace(job.sampling, grammar_first=grammar == "full")
            before = scheduler.stats()
            scheduler.submit(job)
            while not isinstance(items.get(timeout=300), Outcome):
                pass
            after = scheduler.stats()
            spent += after.decode_seconds - before.decode_seconds
            tokens += after.steps - before.steps
            passes += after.grammar_passes - before.grammar_passes
        return spent / tokens * 1000, passes / max(1.0, tokens + repeats)

    try:
        per_token("checked")  # warm: the prefix is cached for every run after this one
        (full_ms, _), (checked_ms, checked_share), (none_ms, _) = (per_token(g) for g in ("full", "checked", "none"))
    finally:
        scheduler.close()
    return {"ms_per_token": {"full_grammar_pass": round(full_ms, 2), "checked_first": round(checked_ms, 2),
                             "no_grammar": round(none_ms, 2)},
            "grammar_share": {"full_grammar_pass": round(max(0.0, full_ms - none_ms) / full_ms, 3),
                              "checked_first": round(max(0.0, checked_ms - none_ms) / checked_ms, 3)},
            "tokens_needing_the_full_pass": round(checked_share, 3)}
