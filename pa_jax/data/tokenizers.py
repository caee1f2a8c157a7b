"""Tokenizers of checkpoints: loading one, and refusing a (policy, reference) pair that does not share one.

The progress advantage log pi(a|s) - log pi_ref(a|s) compares the probabilities two models give the
same token ids, so both models must map text to ids the same way (``check_tokenizers``); the
trajectories are rendered once, with the policy's tokenizer (``load_tokenizer``).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any


def load_tokenizer(path: str | os.PathLike, *, local_files_only: bool = True) -> Any:
    """The tokenizer of a checkpoint directory (tokenizer.json / tokenizer_config.json) or a .gguf file.

    ``local_files_only`` (default True): read only files already on disk, never the network (the
    ``HF_HUB_OFFLINE`` behaviour): a path that does not exist is an error, not a hub lookup. It is refused
    here, before transformers, because huggingface_hub (2.4) builds request headers even for a
    ``local_files_only`` lookup of a hub name, and that fetches a registry from the Hub. A failure is a
    ValueError naming the path; the loader's own exception is its ``__cause__``."""
    p = pathlib.Path(path)
    if local_files_only and not p.exists():
        raise ValueError(f"{p}: cannot load a tokenizer (no such file or directory; tokenizers are read from "
                         "local files only, never downloaded)")
    from transformers import AutoTokenizer  # heavy; only when a tokenizer is needed

    try:
        if p.suffix == ".gguf":
            try:
                return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=local_files_only)
            except ImportError:
                # transformers 5.23 resolves the config of most GGUF architectures through a loader that
                # requires torch (not a pa-jax dependency); the tokenizer itself is built from the GGUF
                # metadata without it. With torch present both give the same tokenizer (tested).
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name,
                                                               local_files_only=local_files_only)
        return AutoTokenizer.from_pretrained(str(p), local_files_only=local_files_only)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{p}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def _special(tok: Any) -> dict:
    return {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")} | {
        "all_special_tokens": sorted(getattr(tok, "all_special_tokens", []) or [])}


def check_tokenizers(policy_tok: Any, reference_tok: Any, *, names: tuple[str, str] = ("policy", "reference")) -> None:
    """Refuse a pair whose tokenizers differ in vocabulary (token -> id) or special tokens: the log-ratio
    log pi(a|s) - log pi_ref(a|s) compares the probabilities of the same ids, so both must mean the same."""
    va, vb = policy_tok.get_vocab(), reference_tok.get_vocab()
    if va != vb:
        only_a = sorted(set(va.items()) - set(vb.items()), key=lambda x: x[1])[:3]
        only_b = sorted(set(vb.items()) - set(va.items()), key=lambda x: x[1])[:3]
        raise ValueError(
            f"{names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} entries; e.g. "
            f"{names[0]} has {only_a}, {names[1]} has {only_b}): the log-ratio is meaningless across vocabularies"
        )
    sa, sb = _special(policy_tok), _special(reference_tok)
    if sa != sb:
        diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
        raise ValueError(f"{names[0]} and {names[1]} tokenizers have different special tokens: {diff}")
