"""Test oracles and tiny-model builders shared by several test files (import: ``from helpers import ...``).

Everything here is written independently of the code under test: NumPy loops over one trajectory at a
time, the DeepConf definitions read off the paper, transformers / PyTorch models and a BPE tokenizer.
Imports of torch / transformers / tokenizers are inside the functions that need them, so a test file that
uses only the NumPy oracles does not pay for them.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

# ----------------------------------------------------------------------------------------------
# aggregation oracles: a plain reading of the method, one trajectory at a time (float64)


def np_token_agg(x: np.ndarray, how: str) -> float:
    """One step's token aggregation; an empty step is 0.0."""
    if x.size == 0:
        return 0.0
    return {"mean": x.mean, "sum": x.sum, "min": x.min, "max": x.max, "last": lambda: x[-1]}[how]()


def np_step_agg(vals: list, how: str) -> float:
    """Trajectory aggregation of step values; ``bottom10`` = mean of the ceil(n/10) smallest; none = 0.0."""
    if not vals:
        return 0.0
    v = np.asarray(vals, np.float64)
    if how == "bottom10":
        k = max(1, math.ceil(len(vals) / 10))
        return float(np.sort(v)[:k].mean())
    return float({"mean": v.mean, "sum": v.sum, "min": v.min, "max": v.max, "last": lambda: v[-1]}[how]())


def np_value_scores(v, sid, ns, token_agg, step_agg, empty):
    """``step_agg_{s < n_b} token_agg_{t: sid_t = s} v_t`` per row; empty steps 0.0 (``"zero"``) or
    left out (``"skip"``)."""
    out = []
    for b in range(len(ns)):
        steps = []
        for s in range(ns[b]):
            idx = np.nonzero(sid[b] == s)[0]
            if idx.size == 0 and empty == "skip":
                continue
            steps.append(np_token_agg(np.asarray(v[b, idx], np.float64), token_agg))
        out.append(np_step_agg(steps, step_agg))
    return np.array(out)


def np_log_softmax(hidden, unembedding):
    """Full-vocabulary log-softmax of ``hidden @ unembedding.T`` in float64."""
    logits = hidden.astype(np.float64) @ unembedding.astype(np.float64).T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def np_deepconf(conf_row, window, tail):
    """DeepConf (Fu et al. 2025) of one trajectory's scored-token confidences, in order."""
    c = list(conf_row)
    n = len(c)
    if n == 0:
        return dict(mean=0.0, tail=0.0, bottom10=0.0, lowest_group=0.0)
    w = min(window, n)
    groups = [np.mean(c[i - w : i]) for i in range(w, n + 1)]
    k = max(1, math.ceil(len(groups) / 10))
    return dict(mean=np.mean(c), tail=np.mean(c[-min(tail, n) :]), bottom10=np.mean(sorted(groups)[:k]),
                lowest_group=min(groups))


# ----------------------------------------------------------------------------------------------
# tiny transformers models and a tokenizer

CORPUS = ("[system]: You are an airline agent. Follow the policy. [user]: book a flight please "
          "[assistant]: tool_call(search, {'from': 'NYC'}) [tool]: no flights found, sorry",)

CHAT_TEMPLATE = "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"


def tiny_hf_llama(*, seed: int = 0, perturb_norms: bool = False, **config):
    """A random transformers ``LlamaForCausalLM`` (eval mode) from ``LlamaConfig(**config)``, seeded with
    ``torch.manual_seed(seed)`` just before it is built; ``perturb_norms``: norm weights ``1 + 0.1 N(0, 1)``
    (so a swapped or missing norm shows)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if perturb_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def save_tiny_llama(path, vocab_size, seed):
    """The scoring / CLI tests' tiny llama (2 layers, D = 32, GQA 4/2, untied), saved to ``path``."""
    model = tiny_hf_llama(seed=seed, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                          pad_token_id=2)
    model.save_pretrained(path)
    return model


def hf_logits(model, ids, mask, positions=None) -> np.ndarray:
    """transformers logits [B, T, V] (float32) of a padded batch; positions default to the count of the
    unmasked tokens before each one (left padding starts at 0)."""
    import torch

    if positions is None:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions), use_cache=False)
    return out.logits.float().numpy()


def tiny_tokenizer(corpus=("hello world [assistant]: tool_call(f, {'x': 1}) [user]: done",), vocab_size=320):
    """A small byte-level BPE tokenizer wrapped as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------
# the CLI tests' checkpoints, trajectory files, PyTorch oracle and runners


def save_policy_reference(d):
    """A tiny llama policy (seed 0) and reference (seed 1) sharing ``tiny_tokenizer(CORPUS)``, saved under
    ``d/policy`` and ``d/reference``; returns (tokenizer, {"policy": hf model, "reference": hf model})."""
    tok = tiny_tokenizer(CORPUS)
    models = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        models[name] = save_tiny_llama(d / name, 320, seed)
        tok.save_pretrained(d / name)
    return tok, models


def cli_checkpoints(d):
    """``save_policy_reference(d)`` plus two checkpoints the CLI must refuse as a reference: ``d/other``
    (another tokenizer) and ``d/bert`` (not a causal LM); returns (d, tokenizer, models)."""
    tok, models = save_policy_reference(d)
    other = tiny_tokenizer(("a different corpus, so a different vocabulary",))
    save_tiny_llama(d / "other", 320, 2)
    other.save_pretrained(d / "other")
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 320}))
    tok.save_pretrained(d / "bert")
    return d, tok, models


def tau_sim(i, task, reward):
    """A tau-bench simulation ``s{i}`` of task ``task`` with words of CORPUS drawn with seed ``i``: three
    assistant messages (one a tool call), the last two of different lengths for different ``i``."""
    rng = np.random.default_rng(i)
    words = CORPUS[0].split()
    say = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    return {"id": f"s{i}", "task_id": task, "reward_info": {"reward": reward}, "messages": [
        {"role": "user", "content": say(5)},
        {"role": "assistant", "content": say(4 + i % 3)},
        {"role": "user", "content": say(3)},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "search", "arguments": {"q": say(2)}}]},
        {"role": "tool", "content": say(4)},
        {"role": "assistant", "content": say(3 + i % 4)},
    ]}


def who_and_when_split(root, n, *, unlabeled=False):
    """``root/Algorithm-Generated/{1..n}.json``: Who&When items of 5 messages from CORPUS words, item i
    with mistake_step i % 5 and mistake_agent ``Agent{i % 3}``; ``unlabeled``: one more item without
    labels (``{n + 1}.json``), which fa must skip. Returns the split folder."""
    split = root / "Algorithm-Generated"
    split.mkdir()
    words = CORPUS[0].split()
    for i in range(n):
        hist = [{"role": "user" if j % 2 == 0 else "assistant", "name": f"Agent{j % 3}",
                 "content": " ".join(words[(i + j) % 5:(i + j) % 5 + 4])} for j in range(5)]
        (split / f"{i + 1}.json").write_text(json.dumps({"history": hist, "mistake_step": str(i % 5),
                                                         "mistake_agent": f"Agent{i % 3}", "question_ID": f"q{i}"}))
    if unlabeled:
        (split / f"{n + 1}.json").write_text(json.dumps({"history": [{"role": "user", "name": "A", "content": "x"}]}))
    return split


def authors_ids(sim, tok):
    """Token ids of the authors' rendering of one simulation, and the [start, end) span of each
    assistant message."""
    ids, spans = [tok.bos_token_id], []
    for j, m in enumerate(sim["messages"]):
        sep = "\n" if j else ""
        if m["role"] == "assistant":
            tc = "".join(f"\ntool_call({c['name']}, {c['arguments']})" for c in m.get("tool_calls") or [])
            text = f"{sep}[assistant]: {((m['content'] or '') + tc).strip()}"
        else:
            text = f"{sep}[{m['role']}]: {m['content']}"
        piece = tok.encode(text, add_special_tokens=False)
        if m["role"] == "assistant":
            spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, spans


def torch_token_logprobs(model, ids) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for t < len(ids) - 1, from a PyTorch forward in float64."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def oracle_pa(models, tok, path):
    """Progress advantage per trajectory, mean over steps of (mean policy - mean reference log-prob)
    over each assistant message's tokens, from PyTorch forwards of the authors' rendering."""
    out = []
    for sim in json.loads(path.read_text())["simulations"]:
        ids, spans = authors_ids(sim, tok)
        lp = {k: torch_token_logprobs(models[k], ids) for k in ("policy", "reference")}
        out.append(np.mean([lp["policy"][s - 1:e - 1].mean() - lp["reference"][s - 1:e - 1].mean() for s, e in spans]))
    return np.array(out)


def cli_ok(argv):
    """``pa-jax argv`` succeeds (exit status 0)."""
    from pa_jax.cli import main

    assert main(argv) == 0


def cli_fails(capsys, argv, pattern):
    """``pa-jax argv`` ends with exit status 2 and a message on stderr matching ``pattern``, no traceback."""
    from pa_jax.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
