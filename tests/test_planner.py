"""Unit tests for the layer planner (pure: numbers in, a plan or a PlanError out)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from cluster.planner import Assignment, LayerCost, NodeCapacity, Plan, PlanError, format_bytes, plan_layers
from inference.config import ModelConfig

GiB = 1 << 30


def llama7b() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        max_position=4096,
        tie_word_embeddings=False,
    )


def smollm2() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        max_position=8192,
        tie_word_embeddings=True,
    )


def capacity(n: NodeCapacity, cost: LayerCost, reserve: int = 0) -> int:
    return max(0, (n.free_bytes - cost.activation_bytes - reserve) // cost.per_layer)


def check_invariants(plan: Plan, cost: LayerCost, nodes: list[NodeCapacity], reserve: int = 0) -> None:
    at = 0
    by_id = {n.node_id: n for n in nodes}
    for a in plan.assignments:
        assert a.start == at and a.end > a.start
        at = a.end
        assert a.bytes_needed <= a.free_bytes == by_id[a.node_id].free_bytes
        assert a.bytes_needed == a.num_layers * cost.per_layer + cost.activation_bytes + reserve
    assert at == plan.num_layers
    assert len({a.node_id for a in plan.assignments}) == len(plan.assignments)


# --- cost model ---------------------------------------------------------------------------


def test_layer_cost_counts_weights_kv_and_activations():
    cfg = llama7b()
    cost = LayerCost.for_model(cfg, dtype_bytes=2, num_blocks=512, block_size=16, max_batch_tokens=512)
    params = 4096 * 3 * 4096 + 4096 * 4096 + 4096 * 2 * 11008 + 11008 * 4096 + 2 * 4096
    assert cost.weight_bytes == params * 2  # ~386 MiB a layer, 32 layers ~12.1 GiB: a 7B model
    assert cost.kv_bytes == 512 * 16 * 2 * 32 * 128 * 2
    assert cost.activation_bytes == 512 * 2 * (2 * 4096 + max(4 * 4096, 3 * 11008))
    assert cost.per_layer == cost.weight_bytes + cost.kv_bytes


def test_qkv_bias_adds_bias_bytes():
    base = smollm2()
    biased = ModelConfig(**{f: getattr(base, f) for f in base.__slots__} | {"qkv_bias": True})
    a = LayerCost.for_model(base, 4, 64, 16, 256)
    b = LayerCost.for_model(biased, 4, 64, 16, 256)
    assert b.weight_bytes - a.weight_bytes == (9 + 2 * 3) * 64 * 4


def test_bad_cost_inputs_are_refused():
    with pytest.raises(PlanError, match="num_blocks"):
        LayerCost.for_model(smollm2(), 4, 0, 16, 256)
    with pytest.raises(PlanError):
        LayerCost(0, 0, 5)
    with pytest.raises(PlanError, match="free_bytes"):
        NodeCapacity("w1", -1)
    with pytest.raises(PlanError, match="w1"):
        NodeCapacity("w1", GiB, layers=(5, 5))
    with pytest.raises(PlanError, match="w1"):
        NodeCapacity("w1", GiB, layers=True)
    assert NodeCapacity("w1", GiB, layers=[2, 4]).layers == (2, 4)  # JSON lists become ranges


# --- automatic split ----------------------------------------------------------------------


def test_mixed_8_16_64_gb_nodes_split_a_7b_model():
    cfg = llama7b()
    cost = LayerCost.for_model(cfg, 2, num_blocks=512, block_size=16, max_batch_tokens=512)
    assert cfg.num_layers * cost.per_layer > 8 * GiB  # does not fit the smallest node alone
    nodes = [NodeCapacity("small", 8 * GiB), NodeCapacity("mid", 16 * GiB), NodeCapacity("big", 64 * GiB)]
    plan = plan_layers(cfg.num_layers, cost, nodes, reserve_bytes=GiB // 2)
    check_invariants(plan, cost, nodes, GiB // 2)
    sizes = {a.node_id: a.num_layers for a in plan.assignments}
    assert [a.node_id for a in plan.assignments] == ["small", "mid", "big"]
    assert sizes["small"] < sizes["mid"] < sizes["big"]


def test_default_model_on_two_equal_nodes_is_15_15():
    cfg = smollm2()
    cost = LayerCost.for_model(cfg, 4, num_blocks=256, block_size=16, max_batch_tokens=2048)
    nodes = [NodeCapacity("w1", 2 * GiB), NodeCapacity("w2", 2 * GiB)]
    plan = plan_layers(cfg.num_layers, cost, nodes)
    assert [(a.node_id, a.start, a.end) for a in plan.assignments] == [("w1", 0, 15), ("w2", 15, 30)]
    r = plan.layer_range("w2")
    assert (r.start, r.end, r.num_layers, r.embed, r.head) == (15, 30, 30, False, False)
    assert plan.layer_range("w3") is None


def test_nodes_with_no_room_are_left_out():
    cost = LayerCost(100, 0, 0)
    nodes = [NodeCapacity("tiny", 50), NodeCapacity("a", 1000), NodeCapacity("b", 1000)]
    plan = plan_layers(4, cost, nodes)
    assert [a.node_id for a in plan.assignments] == ["a", "b"]


def test_no_nodes_and_bad_args_are_refused():
    cost = LayerCost(100, 0, 0)
    with pytest.raises(PlanError, match="no nodes"):
        plan_layers(4, cost, [])
    with pytest.raises(PlanError, match="unique"):
        plan_layers(4, cost, [NodeCapacity("a", 1000), NodeCapacity("a", 1000)])
    with pytest.raises(PlanError, match="reserve"):
        plan_layers(4, cost, [NodeCapacity("a", 1000)], reserve_bytes=-1)


def test_too_little_memory_names_what_is_missing():
    cost = LayerCost(weight_bytes=GiB // 4, kv_bytes=0, activation_bytes=0)  # 30 layers = 7.5 GiB
    nodes = [NodeCapacity("a", GiB), NodeCapacity("b", 2 * GiB)]
    with pytest.raises(PlanError) as e:
        plan_layers(30, cost, nodes)
    assert "cannot place 30 layers: need 4.50 GiB more" in str(e.value)
    assert "3.00 GiB free for 7.50 GiB of layers" in str(e.value)
    assert e.value.missing_bytes == 4 * GiB + GiB // 2


def test_fragmented_memory_names_a_node_to_grow():
    cost = LayerCost(100, 0, 0)
    nodes = [NodeCapacity("a", 150), NodeCapacity("b", 160)]  # 310 bytes but room for 2 layers
    with pytest.raises(PlanError) as e:
        plan_layers(3, cost, nodes)
    assert e.value.node_id == "b" and e.value.missing_bytes == 40
    assert "node b needs" in str(e.value)


def test_random_node_sets_keep_invariants_and_refuse_exactly_when_short():
    rng = random.Random(1234)
    plans = refusals = 0
    for _ in range(400):
        n_layers = rng.randint(1, 80)
        cost = LayerCost(rng.randint(1, 1000), rng.choice([0, rng.randint(1, 500)]), rng.randint(0, 2000))
        reserve = rng.choice([0, rng.randint(0, 1500)])
        total = n_layers * cost.per_layer
        nodes = [
            NodeCapacity(f"n{i}", rng.randint(0, int(total * rng.uniform(0.1, 1.2))) + reserve)
            for i in range(rng.randint(1, 6))
        ]
        caps = [capacity(n, cost, reserve) for n in nodes]
        if sum(caps) < n_layers:
            with pytest.raises(PlanError) as e:
                plan_layers(n_layers, cost, nodes, reserve)
            assert e.value.missing_bytes > 0
            refusals += 1
            continue
        plan = plan_layers(n_layers, cost, nodes, reserve)
        check_invariants(plan, cost, nodes, reserve)
        order = [n.node_id for n in nodes]
        got = {a.node_id: a.num_layers for a in plan.assignments}
        ranks = [order.index(a.node_id) for a in plan.assignments]
        assert ranks == sorted(ranks)  # pipeline order is node order
        for n, cap in zip(nodes, caps):  # proportional: within one layer of the ideal share
            assert got.get(n.node_id, 0) <= cap
            assert abs(got.get(n.node_id, 0) - n_layers * cap / sum(caps)) < 1
        plans += 1
    assert plans > 50 and refusals > 50  # both branches really exercised


# --- overrides ----------------------------------------------------------------------------

COST = LayerCost(weight_bytes=GiB // 10, kv_bytes=0, activation_bytes=0)


def spans(plan: Plan) -> list[tuple[str, int, int]]:
    return [(a.node_id, a.start, a.end) for a in plan.assignments]


def test_count_override_is_placed_in_node_order_among_automatic_nodes():
    nodes = [NodeCapacity("a", 2 * GiB), NodeCapacity("b", GiB, layers=4), NodeCapacity("c", 2 * GiB)]
    plan = plan_layers(32, COST, nodes)
    assert spans(plan) == [("a", 0, 14), ("b", 14, 18), ("c", 18, 32)]
    check_invariants(plan, COST, nodes)


def test_range_override_fixes_its_layers_and_others_fill_the_gaps():
    nodes = [NodeCapacity("a", 2 * GiB), NodeCapacity("b", 2 * GiB, layers=(10, 20)), NodeCapacity("c", 2 * GiB)]
    assert spans(plan_layers(32, COST, nodes)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 32)]
    # A range at the front puts its node first in the pipeline, whatever the join order.
    nodes = [NodeCapacity("a", 4 * GiB), NodeCapacity("b", GiB, layers=(0, 8))]
    assert spans(plan_layers(32, COST, nodes)) == [("b", 0, 8), ("a", 8, 32)]


def test_all_ranges_covering_everything():
    nodes = [NodeCapacity("a", GiB, layers=(0, 5)), NodeCapacity("b", GiB, layers=(5, 10))]
    assert spans(plan_layers(10, COST, nodes)) == [("a", 0, 5), ("b", 5, 10)]


def test_overlapping_and_out_of_range_overrides_are_refused():
    overlap = [NodeCapacity("a", 4 * GiB, layers=(0, 10)), NodeCapacity("b", 4 * GiB, layers=(5, 15))]
    with pytest.raises(PlanError, match=r"nodes a and b: .*overlap"):
        plan_layers(32, COST, overlap)
    with pytest.raises(PlanError, match=r"node a: override range \[20, 40\) is outside .*\[0, 32\)"):
        plan_layers(32, COST, [NodeCapacity("a", 8 * GiB, layers=(20, 40))])


def test_override_that_does_not_fit_names_node_and_missing_memory():
    nodes = [NodeCapacity("w1", 8 * GiB), NodeCapacity("w2", GiB, layers=20)]
    with pytest.raises(PlanError) as e:
        plan_layers(32, COST, nodes)
    assert str(e.value) == "node w2: override 20 layers needs 2.00 GiB, has 1.00 GiB free (missing 1.00 GiB)"
    assert e.value.node_id == "w2" and e.value.missing_bytes == 20 * COST.per_layer - GiB
    with pytest.raises(PlanError, match=r"node w2: override 20 layers .*missing 1.00 GiB"):
        plan_layers(32, COST, [NodeCapacity("w1", 8 * GiB), NodeCapacity("w2", GiB, layers=(0, 20))])


def test_overrides_that_leave_layers_unplaced_or_claim_too_many_are_refused():
    with pytest.raises(PlanError, match="12 of 32 layers have no node"):
        plan_layers(32, COST, [NodeCapacity("a", 4 * GiB, layers=(0, 10)), NodeCapacity("b", 4 * GiB, layers=10)])
    with pytest.raises(PlanError, match="claim 40 layers"):
        plan_layers(32, COST, [NodeCapacity("a", 8 * GiB, layers=20), NodeCapacity("b", 8 * GiB, layers=20)])
    # A count that cannot sit contiguously in either gap around a range.
    with pytest.raises(PlanError, match="contiguously"):
        plan_layers(
            10,
            COST,
            [NodeCapacity("a", GiB, layers=(3, 6)), NodeCapacity("b", GiB, layers=4), NodeCapacity("c", GiB, layers=3)],
        )
    # One automatic node cannot cover the runs on both sides of a range, though it has the memory.
    with pytest.raises(PlanError, match=r"\[0, 3\), \[6, 10\).*one run per node \(b fits 40\)"):
        plan_layers(10, COST, [NodeCapacity("a", GiB, layers=(3, 6)), NodeCapacity("b", 4 * GiB)])


def _brute_force_feasible(n_layers: int, cost: LayerCost, nodes: list[NodeCapacity]) -> bool:
    """Reference: try every size for every non-range node, laid out in node order around ranges."""

    def size(n: NodeCapacity) -> int:
        return n.layers[1] - n.layers[0] if isinstance(n.layers, tuple) else n.layers or 0

    if any(size(n) and size(n) * cost.per_layer + cost.activation_bytes > n.free_bytes for n in nodes):
        return False  # an override that does not fit its own node
    ranges = sorted(n.layers for n in nodes if isinstance(n.layers, tuple))
    choices = [
        [n.layers] if isinstance(n.layers, int) else range(capacity(n, cost) + 1)
        for n in nodes
        if not isinstance(n.layers, tuple)
    ]
    ends = dict(ranges)

    def skip(p: int) -> int:
        while p in ends:
            p = ends[p]
        return p

    for sizes in itertools.product(*choices):
        p, ok = skip(0), True
        for k in sizes:
            if k:
                if p + k > n_layers or any(s < p + k and p < e for s, e in ranges):
                    ok = False
                    break
                p = skip(p + k)
        if ok and p == n_layers:
            return True
    return False


def test_random_overrides_match_a_brute_force_reference():
    rng = random.Random(99)
    cost = LayerCost(10, 0, 5)
    plans = 0
    for _ in range(400):
        n_layers = rng.randint(1, 8)
        nodes, used = [], set()
        for i in range(rng.randint(1, 4)):
            kind, lay = rng.random(), None
            if kind < 0.25:
                s = rng.randint(0, n_layers - 1)
                e = rng.randint(s + 1, n_layers)
                if used & set(range(s, e)):
                    continue
                used |= set(range(s, e))
                lay = (s, e)
            elif kind < 0.45:
                lay = rng.randint(0, 3)
            nodes.append(NodeCapacity(f"n{i}", rng.randint(0, 10 * n_layers + 5), lay))
        if not nodes:
            continue
        feasible = _brute_force_feasible(n_layers, cost, nodes)
        try:
            plan = plan_layers(n_layers, cost, nodes)
        except PlanError:
            assert not feasible, (n_layers, nodes)
            continue
        assert feasible, (n_layers, nodes, plan)
        plans += 1
        check_invariants(plan, cost, nodes)
        got = {a.node_id: (a.start, a.end) for a in plan.assignments}
        for n in nodes:
            if isinstance(n.layers, tuple):
                assert got[n.node_id] == n.layers
            elif n.layers:
                assert got[n.node_id][1] - got[n.node_id][0] == n.layers
        non_range = [n.node_id for n in nodes if not isinstance(n.layers, tuple) and n.node_id in got]
        assert sorted(non_range, key=lambda i: got[i][0]) == non_range  # relative order kept
    assert plans > 50


# --- the plan as data ---------------------------------------------------------------------


def test_plan_to_json_round_trips():
    nodes = [NodeCapacity("a", 2 * GiB), NodeCapacity("b", 3 * GiB)]
    plan = plan_layers(32, COST, nodes)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["num_layers"] == 32
    assert data["assignments"][0] == {
        "node_id": "a",
        "start": 0,
        "end": plan.assignments[0].end,
        "layers": plan.assignments[0].num_layers,
        "bytes_needed": plan.assignments[0].bytes_needed,
        "free_bytes": 2 * GiB,
    }
    assert Plan.from_json(data) == plan


def test_plan_refuses_gaps_and_overcommitted_nodes():
    with pytest.raises(PlanError, match="contiguous"):
        Plan(10, (Assignment("a", 0, 4, 1, 1), Assignment("b", 5, 10, 1, 1)))
    with pytest.raises(PlanError, match="covers"):
        Plan(10, (Assignment("a", 0, 4, 1, 1),))
    with pytest.raises(PlanError, match="node a"):
        Assignment("a", 0, 4, bytes_needed=2, free_bytes=1)


def test_format_bytes_never_hides_a_shortfall():
    assert format_bytes(4 * GiB + GiB // 10) == "4.10 GiB"
    assert format_bytes(12 * GiB) == "12.0 GiB"
    assert format_bytes(5 << 20) == "5.00 MiB"
