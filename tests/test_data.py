"""Loaders against the real files in ../shared/data and small synthetic bad files."""
import json
import pathlib

import pytest

from pa_jax.data import DataError, load, load_best_of_n


def test_tau_bench_v1_airline(shared_data):
    path = shared_data / "tau_bench_v1" / "gpt-4o-airline.json"
    raw = json.loads(path.read_text())
    ds = load(path)
    assert len(ds) == 200 and not ds.skipped and ds.files == [str(path)]
    groups = ds.groups()
    assert len(groups) == 50 and all(len(v) == 4 for v in groups.values())
    assert [t.trial for t in groups["0"]] == [0, 1, 2, 3]
    assert sum(t.success for t in ds.trajectories) == sum(x["reward"] == 1.0 for x in raw)
    for t, x in zip(ds.trajectories, raw):
        assert t.task_id == str(x["task_id"]) and t.reward == x["reward"]
        assert [m.role for m in t.messages] == [m["role"] for m in x["traj"]]
        assert list(t.action_mask) == [m["role"] == "assistant" for m in x["traj"]]
    # tool-call arguments (a JSON string in v1) are parsed to a dict
    m = next(m for m in ds.trajectories[0].messages if m.tool_calls)
    rm = next(m for m in raw[0]["traj"] if m.get("tool_calls"))
    assert m.tool_calls[0].name == rm["tool_calls"][0]["function"]["name"]
    assert m.tool_calls[0].arguments == json.loads(rm["tool_calls"][0]["function"]["arguments"])
    assert m.content == ""


def test_tau2_simulations(shared_data):
    path = shared_data / "tau2" / "tau2_bench_official" / "telecom_gpt-4o_sim_2025-08-10.json"
    raw = json.loads(path.read_text())["simulations"]
    ds = load(path)
    assert len(ds) == 20
    for t, s in zip(ds.trajectories, raw):
        assert t.id == s["id"] and t.task_id == s["task_id"] and t.reward == s["reward_info"]["reward"]
        calls = [c for m in s["messages"] for c in (m.get("tool_calls") or [])]
        got = [c for m in t.messages for c in m.tool_calls]
        assert [(c.name, c.arguments) for c in got] == [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("split,count", [("Hand-Crafted", 58), ("Algorithm-Generated", 126)])
def test_who_and_when_splits(shared_data, split, count):
    d = shared_data / "who_and_when" / split
    ds = load(d)
    assert len(ds) + len(ds.skipped) == count
    assert len(ds) == count  # every real item is scorable
    for t in ds.trajectories:
        raw = json.loads(pathlib.Path(t.source).read_text())
        assert t.mistake_step == int(raw["mistake_step"]) and t.mistake_agent == raw["mistake_agent"]
        h = raw["history"]
        for i, (m, r) in enumerate(zip(t.messages, h)):
            expect_action = bool((r["content"] or "").strip()) and not (
                split == "Hand-Crafted" and i == 0 and r["role"].lower() == "human")
            assert t.action_mask[i] == expect_action
            if split == "Algorithm-Generated":
                assert m.agent == r["name"]
            else:
                assert m.agent == r["role"].split(" (")[0]
        # the blamed agent acts at the blamed step in the vast majority of items (checked in aggregate below)
    agree = sum(t.messages[t.mistake_step].agent == t.mistake_agent for t in ds.trajectories)
    assert agree / len(ds) > 0.8


def test_who_and_when_parent_dir(shared_data):
    ds = load(shared_data / "who_and_when")
    assert len(ds) == 184
    assert sum(t.id.startswith("Hand-Crafted/") for t in ds.trajectories) == 58
    assert ds.trajectories[0].id == "Hand-Crafted/1"  # numeric file order
    assert ds.trajectories[1].id == "Hand-Crafted/2"


def _sim(i, task, reward=1.0, messages=None):
    return {
        "id": f"sim{i}", "task_id": task, "reward_info": {"reward": reward},
        "messages": messages if messages is not None else [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": i}}]},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "done"},
        ],
    }


def test_best_of_n_directory(tmp_path):
    for trial in range(3):
        d = tmp_path / f"trial_{trial}"
        d.mkdir()
        (d / "airline.json").write_text(json.dumps({"simulations": [_sim(trial, "t1", trial % 2), _sim(trial, "t2")]}))
    ds = load(tmp_path)
    assert len(ds) == 6
    g = ds.groups()
    assert list(g) == ["t1", "t2"] and [t.trial for t in g["t1"]] == [0, 1, 2]
    assert [t.reward for t in g["t1"]] == [0.0, 1.0, 0.0]
    assert len({t.id for t in ds.trajectories}) == 6
    assert len(load_best_of_n(tmp_path, domain="airline")) == 6
    with pytest.raises(DataError, match="retail.json"):
        load_best_of_n(tmp_path, domain="retail")


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_bad_inputs_raise_naming_file_and_item(tmp_path):
    p = _write(tmp_path, "broken.json", '{"simulations": [')
    with pytest.raises(DataError, match="broken.json.*malformed JSON"):
        load(p)
    sim = _sim(0, "t")
    del sim["messages"]
    p = _write(tmp_path, "nomsg.json", {"simulations": [_sim(1, "t"), sim]})
    with pytest.raises(DataError, match=r"nomsg.json simulation 1: missing field 'messages'"):
        load(p)
    p = _write(tmp_path, "role.json", {"simulations": [_sim(0, "t", messages=[{"role": "robot", "content": "x"}])]})
    with pytest.raises(DataError, match=r"role.json simulation 0 message 0: unknown role 'robot'"):
        load(p)
    p = _write(tmp_path, "v1.json", [{"task_id": 1, "reward": "yes", "traj": []}])
    with pytest.raises(DataError, match="v1.json item 0: reward must be a number"):
        load(p)
    p = _write(tmp_path, "ww.json", {"history": [{"role": "human", "content": "q"}], "mistake_step": "two"})
    with pytest.raises(DataError, match="ww.json: mistake_step must hold an integer"):
        load(p)
    p = _write(tmp_path, "what.json", {"foo": 1})
    with pytest.raises(DataError, match="what.json: unrecognized trajectory format"):
        load(p)
    p = _write(tmp_path, "empty.json", {"simulations": []})
    with pytest.raises(DataError, match="empty"):
        load(p)
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "missing.json")


def test_unscorable_items_are_listed_not_dropped(tmp_path):
    sims = [
        _sim(0, "a"),
        _sim(1, "b", messages=[]),
        _sim(2, "c", messages=[{"role": "user", "content": "only the user speaks"}]),
        _sim(3, "d", reward=None),
    ]
    ds = load(_write(tmp_path, "mixed.json", {"simulations": sims}))
    assert [t.id for t in ds.trajectories] == ["sim0", "sim3"]
    reasons = {s.item: s.reason for s in ds.skipped}
    assert reasons == {"simulation 1": "empty trajectory (no messages)", "simulation 2": "no scored action message"}
    labeled = ds.require("reward")
    assert [t.id for t in labeled.trajectories] == ["sim0"]
    assert len(labeled.skipped) == 3 and labeled.skipped[-1].reason == "missing label 'reward'"
    ww = _write(tmp_path, "7.json", {"history": [{"role": "human", "content": "q"}, {"role": "A", "content": "x"}],
                                     "mistake_step": "5", "mistake_agent": "A"})
    ds = load(ww)
    assert len(ds) == 0 and "outside history of 2" in ds.skipped[0].reason


def test_repeated_ids_keep_their_text_and_labels_are_checked(tmp_path):
    """A repeated (task, trial) no longer renames every id of the file: only the repeat gets a suffix (the
    repeat itself is refused by the CLI's preflight, tests/test_bad_inputs.py); non-finite rewards, non-integer
    trials and malformed tool calls are refused naming file and item."""
    item = lambda task, trial: {"task_id": task, "trial": trial, "reward": 1.0,  # noqa: E731
                                "traj": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ds = load(_write(tmp_path, "v1.json", [item(1, 0), item(1, 0), item(2, 0)]))
    assert [t.id for t in ds.trajectories] == ["1/trial0", "1/trial0#2", "2/trial0"]
    ds = load(_write(tmp_path, "t2.json", {"simulations": [_sim(0, "a"), _sim(0, "b"), _sim(1, "c")]}))
    assert [t.id for t in ds.trajectories] == ["sim0", "sim0#2", "sim1"]
    bad = _write(tmp_path, "nan.json", json.dumps({"simulations": [_sim(0, "a")]}).replace('"reward": 1.0', '"reward": NaN'))
    with pytest.raises(DataError, match=r"nan.json simulation 0: reward must be a finite number"):
        load(bad)
    with pytest.raises(DataError, match=r"v1.json item 0: trial must be an integer, got 'x'"):
        load(_write(tmp_path, "v1.json", [item(1, "x")]))
    assert load(_write(tmp_path, "v1.json", [item(1, "3")])).trajectories[0].trial == 3
    sim = _sim(0, "a")
    sim["messages"][1]["tool_calls"] = [{"name": None, "arguments": {}}]
    with pytest.raises(DataError, match=r"simulation 0 message 1 tool_call 0: tool call 'name' must be a non-empty"):
        load(_write(tmp_path, "tc.json", {"simulations": [sim]}))


def test_load_tokenizer_never_uses_the_network(tmp_path, monkeypatch):
    """``load_tokenizer`` reads local files only (HF_HUB_OFFLINE behaviour): a hub-style name that is not a
    local path is a ValueError naming it, a saved tokenizer loads, and no network connection is even tried."""
    import socket

    from helpers import tiny_tokenizer

    from pa_jax.data.tokenizers import load_tokenizer

    saved = tiny_tokenizer()
    saved.save_pretrained(tmp_path / "tok")
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("test: network use refused")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="pa-jax-test/no-such-tokenizer: cannot load a tokenizer .*local files only"):
        load_tokenizer("pa-jax-test/no-such-tokenizer")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.get_vocab() == saved.get_vocab() and tok.encode("hello world") == saved.encode("hello world")
    assert tried == []
