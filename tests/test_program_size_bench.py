"""``benchmarks/program_size.py``: the op counts, and a budget they must keep.

The counts are of the lowered StableHLO text, so they do not depend on the
machine or on float rounding: the budget is exact, not a timing.
"""

from __future__ import annotations

import pytest

from benchmarks import program_size


def test_count_ops_counts_stablehlo_definitions_only():
    text = "\n".join(
        [
            "%cst = stablehlo.constant dense<0.0> : tensor<f32>",
            "%0 = chlo.square %arg0 : tensor<4xf32>",
            "%1 = call @_where(%a, %b) : (tensor<i1>, tensor<f32>) -> tensor<f32>",
            "  stablehlo.return %1 : tensor<f32>",
            "// stablehlo.add in a comment",
        ]
    )
    assert program_size.count_ops(text) == 2


@pytest.fixture(scope="module")
def counts():
    return program_size.measure(["flax.linen", "jaxbn", "jaxbn.linen"])


def test_ratios_are_the_recorded_counts_divided(counts):
    ratios = program_size.ratios(counts)
    for name in ("jaxbn", "jaxbn.linen"):
        for p in program_size.PROGRAMS:
            assert ratios[name][p] == counts[name][p] / counts["flax.linen"][p]
    # Two different layers were lowered: a broken benchmark that measured one
    # program twice would give equal counts.
    assert counts["jaxbn.linen"] != counts["flax.linen"]
    assert counts["flax.linen"]["step"] > counts["flax.linen"]["forward"]


def test_one_batch_norm_stays_within_its_program_budget(counts):
    # The lighter-program issue's sizes (jax 0.10.2): step 161, forward 99,
    # eval 15 for the core (244, 179, 18 before it), with a few ops to spare
    # for lowering changes of a newer jax. A change that adds ops to every
    # batch norm fails here; raise the budget only with a reason.
    budget = {"step": 168, "forward": 104, "eval": 16}
    for p, limit in budget.items():
        assert counts["jaxbn"][p] <= limit, (p, counts["jaxbn"][p])
