"""Rendering to token ids + step ids: the authors' `reference` format and the chat template."""

import numpy as np
import pytest

from pa_jax.data import Message, ToolCall, Trajectory, load, render
from helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _traj():
    msgs = (
        Message("system", "Be helpful."),
        Message("user", "Book a flight"),
        Message("assistant", "", (ToolCall("search", {"from": "NYC", "n": 2}),)),
        Message("tool", '{"flights": []}'),
        Message("assistant", "No flights.", (ToolCall("a", {}), ToolCall("b", {"k": [1]}))),
        Message("assistant", ""),
    )
    return Trajectory("t0", "task", msgs, tuple(m.role == "assistant" for m in msgs), reward=1.0, format="tau2")


def test_reference_rendering_matches_hand_written_texts(tok):
    texts = [
        "[system]: Be helpful.",
        "\n[user]: Book a flight",
        "\n[assistant]: tool_call(search, {'from': 'NYC', 'n': 2})",
        '\n[tool]: {"flights": []}',
        "\n[assistant]: No flights.\ntool_call(a, {})\ntool_call(b, {'k': [1]})",
        "\n[assistant]: [assistant action]",
    ]
    r = render(_traj(), tok)
    ids, steps = [tok.bos_token_id], [-1]
    k = 0
    for i, t in enumerate(texts):
        piece = tok.encode(t, add_special_tokens=False)
        ids += piece
        act = i in (2, 4, 5)
        steps += [k if act else -1] * len(piece)
        k += act
    np.testing.assert_array_equal(r.input_ids, ids)
    np.testing.assert_array_equal(r.step_ids, steps)
    assert r.num_steps == 3 and not r.truncation.truncated
    assert r.input_ids.dtype == np.int32 and r.step_ids.dtype == np.int32
    assert tok.decode(r.input_ids[1:]) == "".join(texts)


def test_reference_rendering_real_airline(shared_data, tok):
    ds = load(shared_data / "tau_bench_v1" / "gpt-4o-airline.json")
    t = ds.trajectories[0]
    r = render(t, tok)
    text = tok.decode(r.input_ids[1:])
    assert text.startswith("[system]: # Airline Agent Policy")
    # tau-bench v1 stores the arguments as a JSON string: printed verbatim (the authors' f"{args}")
    assert '\n[assistant]: tool_call(get_user_details, {"user_id":"mia_li_3668"})\n[tool]: ' in text
    # every assistant message is one step, in order
    assert r.num_steps == sum(m.role == "assistant" for m in t.messages)
    first = tok.decode(r.input_ids[r.step_ids == 0])
    assert first == "\n[assistant]: " + t.messages[2].content


def test_who_and_when_reference_rendering(shared_data, tok):
    t = load(shared_data / "who_and_when" / "Hand-Crafted" / "1.json").trajectories[0]
    r = render(t, tok)
    assert tok.decode(r.input_ids[1:]).startswith("[human]: " + t.messages[0].content[:20])
    # the opening human message is not a step; step 0 is message 1
    assert tok.decode(r.input_ids[r.step_ids == 0]) == f"\n[{t.messages[1].role}]: {t.messages[1].content}"


def test_truncation_keeps_tail_and_reports(tok):
    full = render(_traj(), tok)
    L = len(full) - 25
    r = render(_traj(), tok, max_length=L)
    np.testing.assert_array_equal(r.input_ids, full.input_ids[-L:])
    expect_steps = full.step_ids[-L:].copy()
    expect_steps[0] = -1  # the first kept token is never a prediction target
    np.testing.assert_array_equal(r.step_ids, expect_steps)
    assert r.num_steps == full.num_steps
    tr = r.truncation
    assert (tr.original_tokens, tr.kept_tokens, tr.dropped_tokens) == (len(full), L, 25)
    lost = partly = 0
    for k in range(full.num_steps):
        a, b = np.sum(full.step_ids == k), np.sum(r.step_ids == k)
        lost += a > 0 and b == 0
        partly += 0 < b < a
    assert (tr.steps_lost, tr.steps_partly_cut) == (lost, partly)
    r2 = render(_traj(), tok, max_length=8)
    assert len(r2) == 8 and r2.truncation.steps_lost >= 1
    with pytest.raises(ValueError, match="max_length"):
        render(_traj(), tok, max_length=1)


def test_chat_rendering_spans(tok):
    t = _traj()
    r = render(t, tok, rendering="chat")
    text = tok.apply_chat_template([{"role": m.role, "content": c} for m, c in zip(t.messages, [
        "Be helpful.", "Book a flight", "tool_call(search, {'from': 'NYC', 'n': 2})", '{"flights": []}',
        "No flights.\ntool_call(a, {})\ntool_call(b, {'k': [1]})", ""])], tokenize=False)
    np.testing.assert_array_equal(r.input_ids, tok(text, add_special_tokens=False)["input_ids"])
    assert r.num_steps == 3
    assert tok.decode(r.input_ids[r.step_ids == 0]) == "tool_call(search, {'from': 'NYC', 'n': 2})"
    assert tok.decode(r.input_ids[r.step_ids == 1]) == "No flights.\ntool_call(a, {})\ntool_call(b, {'k': [1]})"
    assert not np.any(r.step_ids == 2)  # the empty action has no token (scored as an empty step)
    # template tokens (<bos>, role names, <eos>) are never targets
    assert not np.any(np.isin(r.input_ids[r.step_ids >= 0], [tok.bos_token_id, tok.eos_token_id]))


def test_chat_rendering_needs_template(tok):
    import copy

    t2 = copy.copy(tok)
    t2.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        render(_traj(), t2, rendering="chat")
    with pytest.raises(ValueError, match="rendering must be"):
        render(_traj(), tok, rendering="html")


def test_json_string_arguments_print_verbatim(tmp_path, tok):
    """Tool-call arguments stored as a JSON string (tau-bench v1 / OpenAI layout) are printed
    character for character, as the authors' ``f"tool_call({name}, {args})"`` prints a str; dict
    arguments (tau2 layout) print as the Python dict. Expected texts written by hand."""
    import json as _json

    args_str = '{"origin":"JFK",  "n": 2, "note": "caf\\u00e9"}'  # odd spacing and an escape survive
    item = {"task_id": 3, "trial": 0, "reward": 1.0, "traj": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": args_str}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done.", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
    ]}
    p = tmp_path / "v1.json"
    p.write_text(_json.dumps([item]))
    t = load(p).trajectories[0]
    assert t.messages[1].tool_calls[0].arguments == {"origin": "JFK", "n": 2, "note": "caf\u00e9"}
    want = [
        "[user]: hi",
        '\n[assistant]: tool_call(search, {"origin":"JFK",  "n": 2, "note": "caf\\u00e9"})',
        "\n[tool]: ok",
        "\n[assistant]: Done.\ntool_call(f, not json)",
    ]
    from pa_jax.data.render import message_texts

    assert message_texts(t) == want
    r = render(t, tok)
    assert tok.decode(r.input_ids[1:]) == "".join(want)
    # tau2 layout with dict arguments: the Python dict, as before
    sim = {"simulations": [{"id": "s", "task_id": "t", "reward_info": {"reward": 1.0}, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "g", "arguments": {"a": [1, "x"]}}]}]}]}
    p2 = tmp_path / "t2.json"
    p2.write_text(_json.dumps(sim))
    assert message_texts(load(p2).trajectories[0])[1] == "\n[assistant]: tool_call(g, {'a': [1, 'x']})"
