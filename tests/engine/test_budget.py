"""The residency plan under a memory budget, against the arithmetic written out by hand (engine/budget.py)."""

from __future__ import annotations

import pytest

from loom.engine.budget import BudgetError, plan_residency

BASE, KV, DRAFT, READ = 1000, 300, 200, 50
LAYERS = [100] * 8
FILE = [60] * 8


def plan(budget: int, **options):
    kw = dict(kv_cache_bytes=KV, draft_bytes=DRAFT, buffers=2, read_buffer_bytes=READ)
    kw.update(options)
    return plan_residency(budget, BASE, LAYERS, FILE, **kw)


def test_everything_resident_when_it_fits():
    p = plan(BASE + KV + DRAFT + 800)
    assert p.resident_layers == list(range(8)) and not p.streaming
    assert p.planned_bytes == BASE + KV + DRAFT + 800 and p.streamed_bytes_per_forward == 0


@pytest.mark.parametrize("resident", [0, 1, 3, 4])  # 5 + streaming costs more than all 8 resident
def test_leading_layers_resident_as_the_budget_allows(resident):
    fixed = BASE + KV + DRAFT + READ + 2 * 100  # two buffers of one layer, the read buffer
    p = plan(fixed + resident * 100 + 99)  # 99 bytes short of one more layer
    assert p.resident_layers == list(range(resident))
    assert p.streamed_layers == list(range(resident, 8))
    assert p.planned_bytes == fixed + resident * 100 <= p.budget_bytes
    assert p.streamed_bytes_per_forward == (8 - resident) * 60
    assert "streamed" in p.describe()


def test_a_budget_below_the_minimum_names_it():
    minimum = BASE + KV + DRAFT + READ + 2 * 100
    assert plan(minimum).streamed_layers == list(range(8))
    with pytest.raises(BudgetError, match=r"below the smallest workable set, 1\.8 kB") as e:
        plan(minimum - 1)
    assert f"--memory-budget {minimum}" in str(e.value) and "KV cache" in str(e.value)
    assert "draft model" in str(e.value)


def test_triple_buffering_costs_a_layer_more():
    assert plan(10**6, buffers=3).minimum_bytes == plan(10**6).minimum_bytes + 100


def test_a_model_of_few_layers_may_need_less_whole_than_streamed():
    p = plan_residency(1000, 500, [100, 100], [60, 60], read_buffer_bytes=300)
    assert p.minimum_bytes == 700 and not p.streaming  # streaming would need 500 + 300 + 200 + 0 = 1000
    with pytest.raises(BudgetError):
        plan_residency(699, 500, [100, 100], [60, 60], read_buffer_bytes=300)


def test_a_kv_cache_sized_from_the_budget_moves_the_minimum():
    """The KV cache is 10% of the budget: the minimum is the budget B with B = rest + 0.1 B."""
    rest = BASE + DRAFT + READ + 2 * 100
    minimum = plan(10**6, kv_cache_bytes=int(0.1 * 10**6), kv_fraction=0.1).minimum_bytes
    assert minimum == -(-rest * 10 // 9)
    p = plan(minimum, kv_cache_bytes=int(0.1 * minimum), kv_fraction=0.1)
    assert p.streamed_layers == list(range(8))
