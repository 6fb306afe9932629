"""Each expression trick in ``jaxbn._xla_cpu`` still saves a full-size pass.

A trick is compiled against the plain code it replaces, one shared value used
twice (patched into the module that uses it, with JAX's caches cleared so the
plain one is traced), and
the full-size arrays the compiled training step writes are counted in its HLO.
When an XLA upgrade makes the plain expression as cheap, the test fails: the
trick has become dead weight and should go (see ``_xla_cpu``'s docstring).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jaxbn
from jaxbn import _passes, _training

SHAPE = (256, 512)


def _full_size_writes(step: str) -> int:
    """Full-size fusion outputs of a compiled training step (kernels' writes)."""
    jax.clear_caches()  # custom_jvp and checkpoint trace once per function
    layer = jaxbn.batch_norm()
    x = jax.random.normal(jax.random.key(0), SHAPE)
    params, stats = layer.init(x)

    # The statistics are arguments, as in training: a constant running mean
    # would let XLA fold the shift away.
    def forward(params, stats, x):
        return layer.apply(params, stats, x, train=True)

    def loss(params, stats, x):
        y, _ = layer.apply(params, stats, x, train=True)
        return jnp.sum(y * x)

    fn = forward if step == "forward" else jax.grad(loss, argnums=(0, 2))
    text = jax.jit(fn).lower(params, stats, x).compile().as_text()
    assert text is not None
    # The entry computation and the loop bodies (the statistics' passes run
    # in a while loop), not the fused computations inside them.
    bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    full = re.escape("f32[" + ",".join(map(str, SHAPE)) + "]")
    writes = 0
    for block in text.split("\n\n"):
        head = block.lstrip("\n").split(" ", 2)
        if head[0] == "ENTRY" or head[0].lstrip("%") in bodies:
            writes += len(re.findall(rf"= {full}\S* fusion\(", block))
    return writes


@pytest.mark.parametrize(
    ("module", "name", "plain", "step"),
    [
        (_passes, "shifted_pair", lambda x, s: (x - s,) * 2, "forward"),
        (_passes, "shifted_pair", lambda x, s: (x - s,) * 2, "gradient"),
        (_training, "centred_pair", lambda x, s, o: ((x - s) - o,) * 2, "gradient"),
    ],
)
def test_trick_saves_a_full_size_write(monkeypatch, module, name, plain, step):
    shaped = _full_size_writes(step)
    monkeypatch.setattr(module, name, plain)
    unshaped = _full_size_writes(step)
    monkeypatch.undo()
    jax.clear_caches()
    # The forward writes only y; the gradient only dx: one write each.
    assert shaped == 1
    assert unshaped == shaped + 1, f"plain {name} no longer costs a pass"
