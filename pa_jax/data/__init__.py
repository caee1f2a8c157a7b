"""Trajectory data: one schema, loaders per source format, tokenizers, rendering to token ids + step ids."""
from pa_jax.data.loaders import (
    detect_format,
    load,
    load_best_of_n,
    load_file,
    load_tau2,
    load_tau_bench_v1,
    load_who_and_when,
    load_who_and_when_file,
)
from pa_jax.data.render import (
    RENDERINGS,
    Rendered,
    Truncation,
    message_texts,
    render,
    render_chat,
    render_reference,
)
from pa_jax.data.schema import DataError, Dataset, Message, Skipped, ToolCall, Trajectory
from pa_jax.data.tokenizers import check_tokenizers, load_tokenizer

__all__ = [
    "DataError", "Dataset", "Message", "RENDERINGS", "Rendered", "Skipped", "ToolCall", "Trajectory",
    "Truncation", "check_tokenizers", "detect_format", "load", "load_best_of_n", "load_file", "load_tau2",
    "load_tau_bench_v1", "load_tokenizer", "load_who_and_when", "load_who_and_when_file", "message_texts", "render",
    "render_chat", "render_reference",
]
