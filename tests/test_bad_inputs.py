"""Catalogue of bad inputs and faults (issue 18): one case per kind, each run through the CLI in-process.

Every case asserts the exit status (2 for a refusal: one line on stderr, no traceback) and that the message
names the offending option, file, item, field or tensor -- or, for inputs that are accepted with a note,
the documented behaviour (the note, and what the results file records). Most cases are refused by
pa_jax.commands.preflight before any model is loaded; the few that score use the shipped toy pair
(32-position context, 22-word vocabulary) on a few tiny trajectories, so the catalogue stays fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import struct
import time
from typing import Callable

import numpy as np
import pytest

from pa_jax.cli import main

TOY = pathlib.Path(__file__).resolve().parents[1] / "pa_jax" / "assets" / "toy_pair"
POLICY, REFERENCE = str(TOY / "policy"), str(TOY / "reference")
WORDS = "cross to stone 3 . walk ahead jump two stones back moved slipped landed fell 0 1 2".split()


# ---------------------------------------------------------------------------------------------- inputs
def sim(i, task="t0", reward=1.0, trial=None, **kw):
    """A tau2 simulation in the toy pair's words (so tokens are real ids, not <unk>)."""
    rng = np.random.default_rng(i)
    say = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    s = {"id": f"s{i}", "task_id": task, "reward_info": {"reward": reward}, "messages": [
        {"role": "user", "content": say(20)},
        {"role": "assistant", "content": say(5)},
        {"role": "tool", "content": say(6)},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "walk", "arguments": {"to": say(1)}}]},
    ]}
    if trial is not None:
        s["trial"] = trial
    s.update(kw)
    return s


def v1_item(task, trial, reward=1.0):
    """A tau-bench v1 item (OpenAI chat with a tool call whose arguments are a JSON string)."""
    return {"task_id": task, "trial": trial, "reward": reward, "traj": [
        {"role": "user", "content": "walk to stone 3"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "walk", "arguments": json.dumps({"to": 3})}}]},
        {"role": "tool", "content": "moved 1"},
        {"role": "assistant", "content": "landed"},
    ]}


def write(path: pathlib.Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def sims_file(tmp, sims, name="sims.json") -> str:
    return write(tmp / name, {"simulations": sims})


def good_sims(tmp) -> str:
    return sims_file(tmp, [sim(i, f"t{i // 2}", float(i % 2)) for i in range(4)])


def bon_dir(tmp, trials=2, tasks=2, skip=()) -> str:
    for t in range(trials):
        sims = [sim(10 * t + k, f"task{k}", float((t + k) % 2)) for k in range(tasks) if (t, k) not in skip]
        sims_file(tmp / "bon" / f"trial_{t}", sims, "airline.json")
    return str(tmp / "bon")


def who_when(tmp, mistake_step="1", name="1.json") -> str:
    hist = [{"role": "user", "name": "A", "content": "cross to stone 3"},
            {"role": "assistant", "name": "B", "content": "walk ahead"},
            {"role": "assistant", "name": "C", "content": "jump two stones"}]
    return write(tmp / "ww" / "Algorithm-Generated" / name,
                 {"history": hist, "mistake_step": mistake_step, "mistake_agent": "B", "question_ID": "q1"})


def model_copy(tmp, src=POLICY, name="m", config=None, drop=(), tensors=None) -> str:
    """A copy of a toy checkpoint with config.json fields changed, files dropped or tensors replaced."""
    d = tmp / name
    shutil.copytree(src, d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    for f in drop:
        (d / f).unlink()
    if tensors:
        from safetensors.numpy import load_file, save_file

        arrays = load_file(str(d / "model.safetensors"))
        for k, fn in tensors.items():
            arrays[k] = fn(arrays[k])
        save_file(arrays, str(d / "model.safetensors"))
    return str(d)


def truncated(path: pathlib.Path, keep: float) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


def tiny_gguf(tmp) -> str:
    """A llama-architecture GGUF file (metadata and two tensors), truncated in its last tensor."""
    import gguf

    path = tmp / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((22, 8), np.float32))
    w.add_tensor("output.weight", np.ones((22, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    truncated(path, 0.8)
    return str(path)


# ---------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    name: str
    argv: Callable[[pathlib.Path], list[str]]  # tmp_path -> CLI arguments
    rc: int
    pattern: str  # regex the message (stderr for a refusal, stderr+stdout otherwise) must match
    check: Callable[[pathlib.Path, dict | None], None] | None = None  # more checks on tmp_path and the results


FAST = ["--no-progress", "--bootstrap", "20", "--folds", "2", "--step-agg", "mean"]


def uq(data, *extra, policy=POLICY, reference=REFERENCE, out=None):
    argv = ["uq", "--policy", policy, "--data", data, *FAST, *extra]
    if reference is not None:
        argv += ["--reference", reference]
    if out is not None:
        argv += ["--out", str(out)]
    return argv


def bon(data, *extra, out=None):
    argv = ["bon", "--policy", POLICY, "--reference", REFERENCE, "--data", data, "--no-progress", "--step-agg", "mean",
            *extra]
    return argv + (["--out", str(out)] if out else [])


def results(tmp):
    return json.loads((tmp / "r.json").read_text())


def strict(tmp):
    """The results file parses with NaN / Infinity tokens forbidden."""
    def bad(c):
        raise AssertionError(f"non-strict JSON token {c}")
    return json.loads((tmp / "r.json").read_text(), parse_constant=bad)


def _check_default_context(tmp, res):
    pf = res["checks"]
    assert pf["max_length"] == 32 and pf["context_window"]["policy"]["positions"] == 32
    assert res["n_truncated"] >= 1 and all(t["kept_tokens"] == 32 for t in res["truncated"])


def _check_all_equal(tmp, res):
    res = strict(tmp)
    m = res["metrics"]["progress_advantage/mean/mean"]
    assert m["auroc"] is None and m["spearman"] is None and "every one of the 4" in m["undefined"]["auroc"]


def _check_dups_kept(tmp, res):
    assert res["checks"]["duplicates"][0]["task_id"] == "task0" and res["n_scored"] == 5


def _check_uneven(tmp, res):
    g = res["checks"]["groups"]
    assert g["expected_n"] == 2 and g["smaller_groups"] == {"task1": 1}
    assert res["metrics"]["progress_advantage/mean/mean"]["n_per_task"] == [1, 2]


def _check_topk(tmp, res):
    assert res["checks"]["top_k"] == 22 and res["config"]["top_k"] == 22


def _check_same_content(tmp, res):
    assert res["models"]["reference_is_policy"] and res["timing"]["models_run"] == 1
    assert res["checks"]["reference_is_policy"].startswith("same content")


def _check_no_scorable(tmp, res):
    res = strict(tmp)
    assert res["n_scored"] == 0 and [s["reason"] for s in res["skipped"]] == ["empty trajectory (no messages)"] * 2


def _check_temp_removed(tmp, res):
    assert not (tmp / "r.json.old123.tmp").exists() and (tmp / "r.json.new456.tmp").exists()


def _stale_temps(tmp):
    old = tmp / "r.json.old123.tmp"
    old.write_text("partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (tmp / "r.json.new456.tmp").write_text("a concurrent writer's")  # fresh: left alone


def _check_manifest(tmp, res):
    import hashlib

    body = (tmp / "r.jsonl").read_bytes()
    assert res["jsonl_sha256"] == hashlib.sha256(body).hexdigest() and res["jsonl_lines"] == len(body.splitlines())
    for line in body.splitlines():
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))


def _surrogate(tmp, where):
    s = sim(0)
    if where == "content":
        s["messages"][0]["content"] = "walk \ud800 ahead"
    else:
        s["messages"][3]["tool_calls"][0]["name"] = "walk\udfff"
    return sims_file(tmp, [s, sim(1, reward=0.0)])


def _tool(tmp, **call):
    s = sim(0)
    s["messages"][3]["tool_calls"] = [{"name": "walk", "arguments": {}} | call]
    return sims_file(tmp, [s])


def _v1(tmp, items):
    return write(tmp / "v1.json", items)


def _dup_sims(tmp):
    return sims_file(tmp, [sim(0, "t0", 1.0), sim(0, "t0", 1.0), sim(1, "t1", 0.0)])


def _bon_dup(tmp):
    d = bon_dir(tmp)
    f = tmp / "bon" / "trial_0" / "airline.json"
    sims = json.loads(f.read_text())["simulations"]
    f.write_text(json.dumps({"simulations": sims + [sims[0]]}))
    return d


def _bon_empty_trial(tmp):
    d = bon_dir(tmp)
    (tmp / "bon" / "trial_2").mkdir()
    return d


def _ro_out():
    # a destination nobody can write, even root (procfs refuses file creation)
    return "/proc/pa_jax_results.json"


def _nan_reward_bon(tmp):
    d = bon_dir(tmp)
    f = tmp / "bon" / "trial_1" / "airline.json"
    f.write_text(f.read_text().replace('"reward": 1.0', '"reward": -Infinity', 1))
    return d


CASES = [
    # 1. context window
    Case("ctx_explicit_beyond_window", lambda t: uq(good_sims(t), "--max-length", "1024"), 2,
         r"--max-length 1024 exceeds the context window of --policy .*policy \(32 positions, max_position_embeddings\)"),
    Case("ctx_default_is_window", lambda t: uq(good_sims(t), out=t / "r.json"), 0, r"truncated to --max-length",
         _check_default_context),
    Case("ctx_allow_beyond", lambda t: uq(good_sims(t), "--max-length", "40", "--allow-beyond-context",
                                          out=t / "r.json"), 0, r"beyond the 32-position context window",
         lambda t, r: r["checks"]["max_length_source"].startswith("explicit, beyond")),
    Case("ctx_reference_smaller", lambda t: uq(good_sims(t), "--max-length", "32",
                                               reference=model_copy(t, REFERENCE, "ref16", {"max_position_embeddings": 16})),
         2, r"exceeds the context window of --reference .*ref16 \(16 positions"),
    Case("ctx_rope_scaling_extends", lambda t: uq(good_sims(t), "--max-length", "200", reference=None, policy=model_copy(
        t, config={"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}})),
         2, r"\(128 positions, rope_scaling yarn"),
    Case("ctx_max_length_1", lambda t: uq(good_sims(t), "--max-length", "1"), 2, r"--max-length must be >= 2, got 1"),
    # 2. labels
    Case("label_nan_reward_tau2", lambda t: uq(write(t / "nan.json", json.dumps(
        {"simulations": [sim(0)]}).replace('"reward": 1.0', '"reward": NaN'))), 2,
         r"nan\.json simulation 0: reward must be a finite number, got nan"),
    Case("label_inf_reward_v1", lambda t: uq(write(t / "v1.json", json.dumps([v1_item(1, 0)]).replace(
        '"reward": 1.0', '"reward": Infinity'))), 2, r"v1\.json item 0: reward must be a finite number, got inf"),
    Case("label_neg_inf_reward_bon", lambda t: bon(_nan_reward_bon(t)), 2,
         r"trial_1/airline\.json simulation 0: reward must be a finite number, got -inf"),
    Case("label_reward_string", lambda t: uq(sims_file(t, [sim(0, reward="yes")])), 2,
         r"sims\.json simulation 0: reward must be a number, got 'yes'"),
    Case("label_success_threshold_nan", lambda t: bon(bon_dir(t), "--success-threshold", "nan"), 2,
         r"--success-threshold must be a finite number, got nan"),
    Case("label_success_threshold_inf", lambda t: bon(bon_dir(t), "--success-threshold", "inf"), 2,
         r"--success-threshold must be a finite number, got inf"),
    Case("label_all_equal", lambda t: uq(sims_file(t, [sim(i, f"t{i}", 1.0) for i in range(4)]), out=t / "r.json"), 0,
         r"metrics undefined .*every one of the 4 trajectories is a success", _check_all_equal),
    Case("label_mistake_step_word", lambda t: ["fa", "--policy", POLICY, "--data", who_when(t, "two")], 2,
         r"1\.json: mistake_step must hold an integer, got 'two'"),
    Case("label_mistake_step_outside", lambda t: ["fa", "--policy", POLICY, "--data", who_when(t, "7"),
                                                  "--out", str(t / "r.json")], 2,
         r"no scorable trajectory \(1 skipped: mistake_step 7 outside history of 3\); every skipped item is listed in"),
    # 3. duplicates
    Case("dup_v1_task_trial", lambda t: uq(_v1(t, [v1_item(1, 0), v1_item(1, 0, 0.0), v1_item(2, 0)])), 2,
         r"1 duplicated rollout\(s\).*task '1' trial 0: .*v1\.json \[item 0\] and .*v1\.json \[item 1\].*--allow-duplicates"),
    Case("dup_tau2_exact_copy", lambda t: uq(_dup_sims(t)), 2,
         r"duplicated rollout\(s\).*task 't0' trial None: .*sims\.json \[simulation 0\] and .*\[simulation 1\]"),
    Case("dup_bon_copy_in_trial", lambda t: bon(_bon_dup(t)), 2,
         r"task 'task0' trial 0: .*trial_0/airline\.json \[simulation 0\] and .*trial_0/airline\.json \[simulation 2\]"),
    Case("dup_allowed_and_listed", lambda t: bon(_bon_dup(t), "--allow-duplicates", out=t / "r.json"), 0,
         r"1 duplicated rollout\(s\) kept as separate rollouts", _check_dups_kept),
    Case("dup_empty_trial_dir", lambda t: bon(_bon_empty_trial(t)), 2,
         r"trial_2: best-of-N trial directory holds no \*\.json file"),
    Case("groups_uneven", lambda t: bon(bon_dir(t, skip={(1, 1)}), out=t / "r.json"), 0,
         r"1 of 2 tasks have fewer than 2 rollouts", _check_uneven),
    Case("groups_best_of_one", lambda t: bon(bon_dir(t, trials=1), out=t / "r.json"), 0,
         r"every task has a single rollout: best-of-N is best-of-1"),
    # 4. no network
    Case("net_policy_hub_name", lambda t: uq(good_sims(t), policy="gpt2", reference=None), 2,
         r"--policy gpt2: no such file or directory \(pa-jax reads local checkpoints only"),
    Case("net_reference_hub_name", lambda t: uq(good_sims(t), reference="HuggingFaceTB/SmolLM2-135M"), 2,
         r"--reference HuggingFaceTB/SmolLM2-135M: no such file or directory"),
    Case("net_data_missing", lambda t: uq(str(t / "nope.json")), 2, r"--data .*nope\.json: no such file or directory"),
    Case("net_policy_not_gguf_file", lambda t: uq(good_sims(t), policy=str(TOY / "toy_pair.json")), 2,
         r"--policy .*toy_pair\.json: a file but not a \.gguf file"),
    Case("net_policy_no_config", lambda t: uq(good_sims(t), policy=model_copy(t, drop=["config.json"])), 2,
         r"--policy .*/m: no config\.json in the directory"),
    # 5. before the first forward
    Case("out_is_directory", lambda t: uq(good_sims(t), out=t), 2, r"--out .*: is a directory"),
    Case("out_under_a_file", lambda t: uq(good_sims(t), out=pathlib.Path(good_sims(t)) / "r.json"), 2,
         r"--out .*sims\.json/r\.json: .*sims\.json is a file, not a directory"),
    Case("out_read_only", lambda t: uq(good_sims(t), out=_ro_out()), 2, r"--out /proc/pa_jax_results\.json: cannot write in /proc"),
    Case("jsonl_is_directory", lambda t: ["score", "--policy", POLICY, "--data", good_sims(t), "--jsonl", str(t)], 2,
         r"--jsonl .*: is a directory"),
    Case("jsonl_same_as_out", lambda t: ["score", "--policy", POLICY, "--data", good_sims(t), "--jsonl",
                                         str(t / "r.json"), "--out", str(t / "r.json")], 2, r"--out and --jsonl name the same file"),
    Case("cache_is_file", lambda t: uq(good_sims(t), "--cache", good_sims(t)), 2, r"--cache .*sims\.json: is a file"),
    Case("cache_read_only", lambda t: uq(good_sims(t), "--cache", "/proc/pa_jax_cache"), 2,
         r"--cache /proc/pa_jax_cache: cannot create the directory"),
    Case("beta_nan", lambda t: uq(good_sims(t), "--beta", "nan"), 2, r"--beta must be a finite number, got nan"),
    Case("beta_inf", lambda t: uq(good_sims(t), "--beta", "inf"), 2, r"--beta must be a finite number, got inf"),
    Case("beta_zero", lambda t: uq(good_sims(t), "--beta", "0"), 2, r"--beta must be > 0, got 0"),
    Case("beta_negative", lambda t: uq(good_sims(t), "--beta", "-1"), 2, r"--beta must be > 0, got -1"),
    Case("vocab_smaller_than_tokenizer", lambda t: uq(good_sims(t), reference=None,
                                                      policy=model_copy(t, config={"vocab_size": 10})), 2,
         r"--policy .*/m: the model's vocabulary has 10 rows but the tokenizer produces ids up to 21"),
    Case("nan_weights", lambda t: uq(good_sims(t), reference=None, policy=model_copy(t, tensors={
        "model.layers.1.mlp.down_proj.weight": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a)})),
         2, r"m/model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' holds 1 non-finite value"),
    Case("inf_weights_reference", lambda t: uq(good_sims(t), reference=model_copy(t, REFERENCE, "r", tensors={
        "lm_head.weight": lambda a: a * np.float32(np.inf)})), 2,
         r"r/model\.safetensors: tensor 'lm_head\.weight' holds \d+ non-finite"),
    # 6. errors a user can act on
    Case("surrogate_in_content", lambda t: uq(_surrogate(t, "content")), 2,
         r"sims\.json \[simulation 0\] message 0: not valid Unicode text \(lone surrogate '\\ud800'"),
    Case("surrogate_in_tool_name", lambda t: uq(_surrogate(t, "name")), 2,
         r"sims\.json \[simulation 0\] message 3: not valid Unicode text"),
    Case("surrogate_in_task_id", lambda t: uq(sims_file(t, [sim(0, task="t\ud800")])), 2,
         r"sims\.json \[simulation 0\]: task_id is not valid Unicode text \(lone surrogate '\\ud800'"),
    Case("gguf_truncated", lambda t: uq(good_sims(t), reference=None, policy=tiny_gguf(t)), 2,
         r"tiny\.gguf: not a readable GGUF file \(tensor 'output\.weight' ends at byte \d+ but the file has \d+ bytes"),
    Case("safetensors_truncated", lambda t: (truncated(pathlib.Path(model_copy(t)) / "model.safetensors", 0.5),
                                             uq(good_sims(t), reference=None, policy=str(t / "m")))[1], 2,
         r"m/model\.safetensors: tensor '[\w.]+' ends at byte \d+ but the file has \d+ bytes \(truncated"),
    Case("safetensors_garbage_header", lambda t: ((pathlib.Path(model_copy(t)) / "model.safetensors").write_bytes(
        struct.pack("<Q", 20) + b"{not json at all...}"), uq(good_sims(t), reference=None, policy=str(t / "m")))[1], 2,
         r"model\.safetensors: corrupt safetensors header"),
    Case("tokenizer_missing", lambda t: uq(good_sims(t), reference=None, policy=model_copy(t, drop=["tokenizer.json"])),
         2, r"--policy .*/m: no tokenizer in the directory \(expected one of tokenizer\.json"),
    Case("tokenizer_corrupt", lambda t: ((pathlib.Path(model_copy(t)) / "tokenizer.json").write_text("{oops"),
                                         uq(good_sims(t), reference=None, policy=str(t / "m")))[1], 2,
         r"--policy .*/m: cannot load its tokenizer"),
    Case("tokenizers_differ", lambda t: _tok_differ(t), 2, r"policy and reference tokenizers differ"),
    Case("trial_word_v1", lambda t: uq(_v1(t, [v1_item(1, "abc")])), 2, r"v1\.json item 0: trial must be an integer, got 'abc'"),
    Case("trial_fraction_tau2", lambda t: uq(sims_file(t, [sim(0, trial=1.5)])), 2,
         r"sims\.json simulation 0: trial must be an integer, got 1\.5"),
    Case("bins_zero", lambda t: uq(good_sims(t), "--bins", "0"), 2, r"--bins must be >= 1, got 0"),
    Case("no_scorable_trajectory", lambda t: uq(sims_file(t, [sim(0, messages=[]), sim(1, messages=[])]),
                                                out=t / "r.json"), 2,
         r"no scorable trajectory \(2 skipped: empty trajectory \(no messages\) \(x2\)\); every skipped item is listed in",
         _check_no_scorable),
    Case("no_label_at_all", lambda t: uq(sims_file(t, [sim(0, reward=None)])), 2,
         r"no scorable trajectory \(1 skipped: missing label 'reward'\)"),
    Case("malformed_json", lambda t: uq(write(t / "bad.json", '{"simulations": [')), 2, r"bad\.json: malformed JSON"),
    Case("unknown_format", lambda t: uq(write(t / "what.json", {"foo": 1})), 2, r"what\.json: unrecognized trajectory format"),
    Case("config_not_json", lambda t: ((pathlib.Path(model_copy(t)) / "config.json").write_text("{"),
                                       uq(good_sims(t), reference=None, policy=str(t / "m")))[1], 2,
         r"--policy .*/m: cannot load as a decoder-only causal LM .*config\.json: not valid JSON"),
    Case("config_not_causal_lm", lambda t: uq(good_sims(t), reference=None, policy=model_copy(
        t, config={"model_type": "bert", "architectures": ["BertModel"]})), 2, r"--policy .*/m: cannot load as a decoder-only causal LM"),
    Case("unknown_role", lambda t: uq(sims_file(t, [sim(0, messages=[{"role": "robot", "content": "x"}])])), 2,
         r"sims\.json simulation 0 message 0: unknown role 'robot'"),
    # 7. values used without a check
    Case("tool_name_null", lambda t: uq(_tool(t, name=None)), 2,
         r"sims\.json simulation 0 message 3 tool_call 0: tool call 'name' must be a non-empty string, got None"),
    Case("tool_name_number", lambda t: uq(_tool(t, name=7)), 2, r"tool_call 0: tool call 'name' must be a non-empty string, got 7"),
    Case("tool_args_list", lambda t: uq(_tool(t, arguments=[1, 2])), 2,
         r"message 3 tool_call 0: tool call 'arguments' must be an object or a JSON string, got list"),
    Case("tool_call_not_object", lambda t: uq(_tool_str(t)), 2, r"tool_call 0: expected a JSON object, got str"),
    Case("top_k_above_vocab", lambda t: uq(good_sims(t), "--top-k", "100", out=t / "r.json"), 0,
         r"--top-k 100 is larger than the 22-token vocabulary: clamped to 22", _check_topk),
    Case("top_k_zero", lambda t: uq(good_sims(t), "--top-k", "0"), 2, r"--top-k must be >= 1, got 0"),
    Case("bootstrap_zero", lambda t: uq(good_sims(t), "--bootstrap", "0"), 2, r"--bootstrap must be >= 1, got 0"),
    Case("folds_one", lambda t: uq(good_sims(t), "--folds", "1"), 2, r"--folds must be >= 2, got 1"),
    Case("k_zero", lambda t: ["fa", "--policy", POLICY, "--data", who_when(t), "--k", "1", "0"], 2, r"--k must be >= 1, got 0"),
    Case("limit_zero", lambda t: uq(good_sims(t), "--limit", "0"), 2, r"--limit must be >= 1, got 0"),
    Case("tasks_zero", lambda t: uq(good_sims(t), "--tasks", "0"), 2, r"--tasks must be >= 1, got 0"),
    Case("max_batch_tokens_zero", lambda t: uq(good_sims(t), "--max-batch-tokens", "0"), 2,
         r"--max-batch-tokens must be >= 1, got 0"),
    Case("token_agg_unknown", lambda t: uq(good_sims(t), "--token-agg", "median"), 2, r"--token-agg: .*'median'"),
    Case("dtype_unknown", lambda t: uq(good_sims(t), "--dtype", "float16"), 2, r"--dtype: invalid choice: 'float16'"),
    Case("max_length_word", lambda t: uq(good_sims(t), "--max-length", "long"), 2, r"--max-length: invalid int value: 'long'"),
    # 8. same checkpoint twice
    Case("same_checkpoint_by_content", lambda t: uq(good_sims(t), reference=model_copy(t), out=t / "r.json"), 0,
         r"--reference .*/m is the --policy checkpoint \(same content \(sha256 [0-9a-f]{16}\)\): run once",
         _check_same_content),
    # 9. leftovers and order
    Case("stale_temp_removed_on_start", lambda t: (_stale_temps(t), uq(write(t / "bad.json", "{"), out=t / "r.json"))[1], 2,
         r"removed 1 temp file\(s\) left by an interrupted earlier write", _check_temp_removed),
    Case("score_manifest_last", lambda t: ["score", "--policy", POLICY, "--data", good_sims(t), "--no-progress",
                                           "--out", str(t / "r.json")], 0, r"wrote .*r\.jsonl", _check_manifest),
]


def _cached_run(t, corrupt):
    """A first uq run filling --cache (results r0.json), then ``corrupt(key_dir)``; the argv of the rerun."""
    argv = uq(good_sims(t), "--cache", str(t / "cache"))
    assert main(argv + ["--out", str(t / "r0.json")]) == 0
    (key_dir,) = (t / "cache").iterdir()
    corrupt(key_dir)
    return argv + ["--out", str(t / "r.json")]


def _same_scores_as_first_run(t, res, repaired=True):
    first = json.loads((t / "r0.json").read_text())
    assert res["scores"] == first["scores"]
    assert bool(res["checks"].get("cache_repairs")) == repaired
    assert res["timing"]["batches_computed"] == (1 if repaired else 0)


def _npz(key_dir):
    return key_dir / "batch_00000.npz"


def _rewrite_npz(key_dir, edit):
    z = dict(np.load(_npz(key_dir)))
    edit(z)
    with open(_npz(key_dir), "wb") as f:
        np.savez(f, **z)


def _shorten(z):
    k = next(k for k in z if k.endswith("/policy_logprob"))
    z[k] = z[k][:-1]


def _edit(z):
    k = next(k for k in z if k.endswith("/reference_logprob"))
    z[k] = z[k] + np.float32(0.5)


def _old_format_index(key_dir):
    """index.json as an earlier pa-jax wrote it: {batch: file name}, no format field, no checksums."""
    idx = json.loads((key_dir / "index.json").read_text())
    idx.pop("format")
    idx["done"] = {b: e["file"] for b, e in idx["done"].items()}
    (key_dir / "index.json").write_text(json.dumps(idx))


def _stale_cache_temp(key_dir):
    old = key_dir / "batch_00000.npz.abc123.tmp"
    old.write_bytes(b"PK partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))


# the per-token cache (pa_jax.scoring.cache): checksums, shapes and dtypes per batch in index.json; a batch or
# index that does not verify is recomputed, with one line on stderr and a record in checks.cache_repairs
CASES += [
    # 6 / 7 / 9. the per-token cache: a batch that does not verify is recomputed, and the repair recorded
    Case("cache_npz_truncated", lambda t: _cached_run(t, lambda d: truncated(_npz(d), 0.5)), 0,
         r"batch_00000\.npz: .*recomputed", _same_scores_as_first_run),
    Case("cache_npz_missing", lambda t: _cached_run(t, lambda d: _npz(d).unlink()), 0,
         r"batch_00000\.npz: .*missing.*recomputed", _same_scores_as_first_run),
    Case("cache_index_corrupt", lambda t: _cached_run(t, lambda d: (d / "index.json").write_text('{"done": ')), 0,
         r"index\.json: .*starts afresh", _same_scores_as_first_run),
    Case("cache_array_shortened", lambda t: _cached_run(t, lambda d: _rewrite_npz(d, _shorten)), 0,
         r"batch_00000\.npz: .*recomputed", _same_scores_as_first_run),
    Case("cache_array_edited", lambda t: _cached_run(t, lambda d: _rewrite_npz(d, _edit)), 0,
         r"batch_00000\.npz: .*recomputed", _same_scores_as_first_run),
    Case("cache_index_not_object", lambda t: _cached_run(t, lambda d: (d / "index.json").write_text("[]")), 0,
         r"index\.json: not a cache index \(a JSON list, expected an object\); .*starts afresh", _same_scores_as_first_run),
    Case("cache_index_without_checksums", lambda t: _cached_run(t, _old_format_index), 0,
         r"index\.json: written by an earlier pa-jax without checksums.*starts afresh", _same_scores_as_first_run),
    Case("cache_stale_temp_removed", lambda t: _cached_run(t, _stale_cache_temp), 0, r"scored 4 trajectories",
         lambda t, r: (_same_scores_as_first_run(t, r, repaired=False),
                       not list((t / "cache").glob("*/*.tmp")) or pytest.fail("stale temp left"))),
]


def _tok_differ(t):
    d = pathlib.Path(model_copy(t, REFERENCE, "r"))
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["vocab"]["jumped"] = tj["model"]["vocab"].pop("jump")
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return uq(good_sims(t), reference=str(d))


def _tool_str(t):
    s = sim(0)
    s["messages"][3]["tool_calls"] = ["walk(3)"]
    return sims_file(t, [s])


def test_catalogue_is_large_and_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 64


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PA_JAX_TRACEBACK", raising=False)
    argv = case.argv(tmp_path)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses with status 2
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == case.rc, (rc, err[-2000:])
    assert "Traceback" not in err
    text = err if rc == 2 else err + out
    assert re.search(case.pattern, text), text[-2000:]
    if rc == 2 and argv[0] in ("uq", "bon", "fa", "score") and "usage:" not in err:
        assert len([x for x in err.splitlines() if x.startswith("pa-jax ")]) >= 1
    if case.check is not None:
        res = json.loads((tmp_path / "r.json").read_text()) if (tmp_path / "r.json").exists() else None
        assert case.check(tmp_path, res) is not False


def test_no_socket_is_opened(tmp_path, monkeypatch):
    """Scoring end to end on the toy pair, with every way of opening a connection made to fail."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "r.json"
    assert main(uq(good_sims(tmp_path), out=out)) == 0
    assert main(["uq", "--policy", "gpt2", "--data", good_sims(tmp_path)]) == 2  # a hub name: refused, not fetched
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert json.loads(out.read_text())["n_scored"] == 4
