"""The scoring plan, on its own (pure host code): property tests against brute-force loops.

For random trajectories (optionally sharing a prefix) and random options: every trajectory lands in
exactly one row of one batch; every scored position (q - 1 for each target q) lands in exactly one
position slot of that row and, for rows run in chunks, in exactly one chunk; nothing is scored twice;
the row tokens around each slot are the trajectory's own; the shared prefix is that of the group of
trajectories (equal first ``min_prefix`` tokens) it saves most on, stops before the first hidden state
needed, and is the longest such; batches never mix rows with and without it.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pa_jax.data.render import Rendered, Truncation
from pa_jax.scoring.plan import ScoringOptions, batch_arrays, make_plan, shared_prefix_length


def _rendered(seed: int, n: int, prefix: int, max_len: int, p_target: float, strangers: int = 0) -> list[Rendered]:
    """n trajectories starting with one common prefix, except ``strangers`` of them (at random places),
    which start with a prefix of their own (as trajectories truncated to their last tokens do)."""
    rng = np.random.default_rng(seed)
    common = rng.integers(3, 50, prefix)
    odd = set(rng.choice(n, min(strangers, n), replace=False).tolist())
    out = []
    for i in range(n):
        tail = rng.integers(3, 50, int(rng.integers(1, max_len + 1)))
        ids = np.concatenate([rng.integers(3, 50, prefix) if i in odd else common, tail]).astype(np.int32)
        steps = np.where(rng.random(len(ids)) < p_target, rng.integers(0, 4, len(ids)), -1).astype(np.int32)
        steps[: prefix // 2] = -1  # a system prompt is never an action
        trunc = Truncation(len(ids), len(ids), 0, 0, 0)
        out.append(Rendered(f"t{i}", ids, steps, int(steps.max()) + 1 if (steps >= 0).any() else 0, trunc))
    return out


def _targets(r: Rendered) -> list[int]:
    """Scored targets by a plain loop: token q >= 1 with step id >= 0."""
    return [q for q in range(1, len(r.input_ids)) if r.step_ids[q] >= 0]


def _prefix_oracle(rendered: list[Rendered], min_prefix: int) -> int:
    """The longest S with: all trajectories agree on tokens [0, S); S <= q - 1 for every target q;
    S <= shortest length - 1; 0 when below ``min_prefix`` or fewer than two trajectories."""
    if len(rendered) < 2:
        return 0
    shortest = min(len(r.input_ids) for r in rendered)
    s = 0
    while (s < shortest - 1 and all(r.input_ids[s] == rendered[0].input_ids[s] for r in rendered)
           and all(s + 1 <= q - 1 for r in rendered for q in _targets(r))):
        s += 1
    return s if s >= min_prefix else 0


def _group_oracle(rendered: list[Rendered], min_prefix: int) -> tuple[int, list[int]]:
    """The prefix group by brute force: among the sets of (two or more) trajectories longer than
    ``min_prefix`` with equal first ``min_prefix`` tokens, the one whose prefix saves the most tokens,
    (members - 1) * S, the first such set (by its lowest index) on ties."""
    best = (0, 0, [])
    for i in range(len(rendered)):
        if len(rendered[i].input_ids) <= min_prefix:
            continue
        group = [j for j in range(len(rendered)) if len(rendered[j].input_ids) > min_prefix
                 and list(rendered[j].input_ids[:min_prefix]) == list(rendered[i].input_ids[:min_prefix])]
        if group[0] != i or len(group) < 2:
            continue
        s = _prefix_oracle([rendered[j] for j in group], min_prefix)
        if s and (len(group) - 1) * s > best[0]:
            best = ((len(group) - 1) * s, s, group)
    return best[1], best[2]


plan_cases = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 14),
    prefix=st.sampled_from([0, 0, 5, 40, 90]),
    strangers=st.sampled_from([0, 0, 1, 3]),
    max_len=st.integers(1, 300),
    p_target=st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    chunk=st.sampled_from([16, 32, 64, 128]),
    pack=st.booleans(),
    pack_length=st.sampled_from([16, 64, 256, 1024]),
    share_prefix=st.booleans(),
    min_prefix=st.sampled_from([0, 8, 64]),
    max_batch_tokens=st.sampled_from([1, 100, 512, 4096]),
    buckets=st.sampled_from([(64,), (32, 128, 512), (128, 256, 512, 1024)]),
    can_pack=st.booleans(),
    can_share_prefix=st.booleans(),
    dp=st.sampled_from([1, 2, 4]),
))


@settings(max_examples=150)
@given(plan_cases)
def test_plan_places_every_scored_position_exactly_once(case):
    rendered = _rendered(case["seed"], case["n"], case["prefix"], case["max_len"], case["p_target"], case["strangers"])
    opts = ScoringOptions(attention_chunk=case["chunk"], pack=case["pack"], pack_length=case["pack_length"],
                          share_prefix=case["share_prefix"], min_prefix=case["min_prefix"],
                          max_batch_tokens=case["max_batch_tokens"], bucket_lengths=case["buckets"])
    dp, c = case["dp"], case["chunk"]
    plan = make_plan(rendered, opts, can_pack=case["can_pack"], can_share_prefix=case["can_share_prefix"],
                     data_parallel=dp)
    S, members = plan.prefix_length, set(plan.prefix_members)

    # the prefix: that of the group that saves most, before every needed hidden state, the longest such
    if opts.share_prefix and case["can_share_prefix"]:
        assert (S, sorted(members)) == _group_oracle(rendered, opts.min_prefix)
    else:
        assert S == 0 and not members
    assert shared_prefix_length(rendered, opts.min_prefix) == _prefix_oracle(rendered, opts.min_prefix)
    if case["strangers"] == 0 and opts.share_prefix and case["can_share_prefix"] and S:
        assert S == _prefix_oracle(rendered, opts.min_prefix)  # all share one prefix: all are in the group
    assert (S == 0) == (not members)
    for i in members:
        np.testing.assert_array_equal(rendered[i].input_ids[:S], rendered[min(members)].input_ids[:S])
        assert all(q - 1 >= S for q in _targets(rendered[i]))

    # batches in order; every trajectory in exactly one row of one batch
    assert [b.index for b in plan.batches] == list(range(len(plan.batches)))
    placed = [i for b in plan.batches for row in b.rows for i in row]
    assert sorted(placed) == list(range(len(rendered)))
    buffers = {b.buffer for b in plan.batches if b.chunked}
    assert len(buffers) <= 1  # one KV buffer size for the whole plan
    for b in plan.batches:  # a batch's rows are all of the prefix group (chunked, prefixed) or none
        assert all((i in members) == b.prefixed for row in b.rows for i in row)
        assert b.chunked or not b.prefixed

    scored = {}  # (trajectory, target q) -> number of slots holding it
    for b in plan.batches:
        S = plan.batch_prefix(b)
        assert S == (plan.prefix_length if b.prefixed else 0)
        assert len(b.rows) <= b.num_rows and b.num_rows % dp == 0
        assert b.num_positions >= 16 and b.num_positions & (b.num_positions - 1) == 0
        for row in b.rows:
            if len(row) > 1:  # packed: only when allowed, and at most pack_length tokens
                assert opts.pack and case["can_pack"] and S == 0 and not b.chunked and not b.prefixed
                assert sum(len(rendered[i].input_ids) for i in row) <= opts.pack_length
        if b.chunked:
            assert case["can_share_prefix"] and b.length % c == 0 and b.num_rows == dp
            assert -(-S // c) * c + b.length <= b.buffer
        else:
            assert b.length in opts.bucket_lengths or b.length % opts.bucket_lengths[-1] == 0
            assert b.num_rows * b.length <= max(opts.max_batch_tokens, dp * b.length)
        ids, mask, seg, pos, tgt, where = batch_arrays(rendered, b, S, pad_id=0)
        assert sorted(where) == sorted(i for row in b.rows for i in row)
        for r, row in enumerate(b.rows):
            assert sum(len(rendered[i].input_ids) - S for i in row) <= b.length
            slots = np.zeros(b.num_positions, int)
            off = 0
            for s, i in enumerate(row):
                x = rendered[i]
                rr, sl = where[i]
                assert rr == r
                slots[sl] += 1
                qs = _targets(x)
                assert sl.stop - sl.start == len(qs)
                for n, q in zip(range(sl.start, sl.stop), qs):
                    p = int(pos[r, n])
                    assert p == off + (q - S) - 1  # row position of hidden state q - 1
                    assert ids[r, p + 1] == tgt[r, n] == x.input_ids[q]  # the next token is the target
                    assert mask[r, p] == mask[r, p + 1] == 1 and seg[r, p] == seg[r, p + 1] == s + 1
                    if b.chunked:  # exactly one chunk [j, j + c) holds the position
                        assert sum(j <= p < j + c for j in range(0, b.length, c)) == 1
                    scored[(i, q)] = scored.get((i, q), 0) + 1
                np.testing.assert_array_equal(ids[r, off:off + len(x.input_ids) - S], x.input_ids[S:])
                off += len(x.input_ids) - S
            assert slots.max(initial=0) <= 1  # no slot holds two positions
            assert not mask[r, off:].any()
        for r in range(len(b.rows), b.num_rows):  # padding rows score nothing
            assert not mask[r].any()
    # nothing scored twice, nothing left out
    assert scored == {(i, q): 1 for i, x in enumerate(rendered) for q in _targets(x)}


def test_plan_is_deterministic_and_packs_short_rows():
    rendered = _rendered(7, 12, 0, 40, 0.3)
    opts = ScoringOptions(pack_length=128, attention_chunk=128, bucket_lengths=(128, 256), min_prefix=64)
    a = make_plan(rendered, opts, can_pack=True, can_share_prefix=True)
    b = make_plan(rendered, opts, can_pack=True, can_share_prefix=True)
    assert a == b
    assert any(len(row) > 1 for bt in a.batches for row in bt.rows)
    # models that cannot pack (Gated DeltaNet) get one trajectory per row and no prefix
    c = make_plan(rendered, opts, can_pack=False, can_share_prefix=False)
    assert c.prefix_length == 0 and all(len(row) == 1 for bt in c.batches for row in bt.rows)


def test_graph_token_hashes_each_graphdef_object_once():
    """Program keys use a token per graphdef: equal graphdefs share one (and so their compiled programs),
    and an object already seen is found by its id, without hashing the module tree again."""
    from pa_jax.scoring.programs import Engine

    class Graph:  # stands for an nnx GraphDef: hashable, equal by content, costly to hash
        hashes = 0

        def __init__(self, name):
            self.name = name

        def __hash__(self):
            Graph.hashes += 1
            return hash(self.name)

        def __eq__(self, other):
            return isinstance(other, Graph) and other.name == self.name

    eng = Engine()
    a, a2, b = Graph("llama"), Graph("llama"), Graph("qwen")
    ta = eng.graph_token(a)
    assert Graph.hashes == 1
    assert all(eng.graph_token(a) == ta for _ in range(100)) and Graph.hashes == 1
    assert eng.graph_token(a2) == ta and eng.graph_token(b) != ta
    assert Graph.hashes == 3
