r"""Folding a batch norm into the preceding Dense or Conv for inference.

In evaluation a batch norm after a linear layer is an affine map per output
feature, so it can be merged into the layer's kernel and bias:

.. math::

   a = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
   W' = W a, \qquad b' = (b - \mu)\, a + \beta .
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._hyperparams import check_axis_spec, check_epsilon
from ._inputs import normalize_axes
from ._record import linen_norms
from ._trees import is_nnx_module, replace_layers


def identity_var(epsilon: float) -> np.float32:
    """The float32 variance v with ``v + epsilon == 1`` exactly (in float32)."""
    eps = np.float32(epsilon)
    v = np.float32(1) - eps
    for _ in range(8):  # a few ulps at most
        total = np.float32(v + eps)
        if total == 1:
            return v
        v = np.nextafter(v, np.float32(-np.inf if total > 1 else np.inf))
    return v


def fold_kernel(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: Mapping[str, Any] | None,
    batch_stats: Mapping[str, Any],
    *,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
) -> tuple[jax.Array, jax.Array]:
    """A kernel and bias that compute a linear layer followed by a batch norm.

    Works for any layer that is linear in its kernel per output feature:
    Dense, and Conv, grouped or depthwise (Flax kernels hold the output
    features on their last axis, whatever the grouping).

    Args:
      kernel: the layer's kernel.
      bias: its bias, or None if it has none (a bias is then created).
      params: the batch norm's ``{"scale", "bias"}`` (either may be absent).
      batch_stats: its ``{"mean", "var"}`` (``count`` is ignored).
      epsilon: the batch norm's epsilon.
      axis: the kernel axis (or axes) holding the output features.

    Returns:
      ``(kernel, bias)`` in the dtypes of the inputs (the bias in the
      kernel's dtype if it was created), such that the layer with them equals
      the pair in evaluation mode.

    Raises:
      ValueError: if the statistics do not have one entry per output feature,
        or epsilon is not positive and finite (the layer's rule).
      TypeError: if epsilon is not a float.
      ValueError: for linen without ``epsilon`` nor ``module`` and ``x`` (or
        with both), for nnx with ``epsilon``, or a pair whose batch norm the
        module does not call.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbn
      >>> kernel = jnp.array([[1.0, 2.0]])  # Dense 1 -> 2
      >>> stats = {"mean": jnp.array([1.0, 0.0]), "var": jnp.array([4.0, 1.0])}
      >>> k, b = jaxbn.fold_kernel(kernel, None, None, stats, epsilon=1e-8)
      >>> jnp.round(k, 4), jnp.round(b, 4)
      (Array([[0.5, 2. ]], dtype=float32), Array([-0.5,  0. ], dtype=float32))
    """
    epsilon = check_epsilon(epsilon)
    kernel = jnp.asarray(kernel)
    axes = normalize_axes(check_axis_spec(axis), kernel.ndim, batch_elsewhere=True)
    features = tuple(kernel.shape[a] for a in axes)
    mean = jnp.asarray(batch_stats["mean"])
    if mean.size != math.prod(features):
        raise ValueError(
            f"the batch norm has {mean.size} features (mean of shape "
            f"{tuple(mean.shape)}) but the kernel of shape {tuple(kernel.shape)} "
            f"has {features} output features along axis {axis!r}; check that "
            "the pair is a layer and the batch norm right after it."
        )
    ctype = jnp.promote_types(kernel.dtype, jnp.float32)
    params = params or {}

    def feature(a: Any, default: float) -> jax.Array:
        if a is None:
            return jnp.full(features, default, ctype)
        return jnp.asarray(a, ctype).reshape(features)

    a = feature(params.get("scale"), 1.0) * jax.lax.rsqrt(
        feature(batch_stats["var"], 1.0) + jnp.asarray(epsilon, ctype)
    )
    b = feature(bias, 0.0)
    new_bias = (b - feature(mean, 0.0)) * a + feature(params.get("bias"), 0.0)
    kept = tuple(d if i in axes else 1 for i, d in enumerate(kernel.shape))
    new_kernel = (kernel.astype(ctype) * a.reshape(kept)).astype(kernel.dtype)
    if bias is None:
        return new_kernel, new_bias.astype(kernel.dtype)
    bias = jnp.asarray(bias)
    return new_kernel, new_bias.reshape(bias.shape).astype(bias.dtype)


def _path(name: Any) -> tuple[Any, ...]:
    return tuple(name.split("/")) if isinstance(name, str) else tuple(name)


def _get(tree: Mapping[str, Any], path: tuple, what: str) -> Mapping[str, Any]:
    node: Any = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            here = sorted(node) if isinstance(node, Mapping) else []
            raise ValueError(
                f"{what} {'/'.join(map(str, path))!r} not found: no {key!r} at "
                f"{'/'.join(map(str, path[:i])) or 'the top'}, which holds {here}."
            )
        node = node[key]
    return node


def _fold_tree(
    variables: Mapping[str, Any],
    pairs: Any,
    epsilon: Callable[[tuple], float],
    remove: bool,
) -> dict[str, Any]:
    for c in ("params", "batch_stats"):
        if c not in variables:
            raise ValueError(
                f"variables has collections {sorted(variables)} but no {c!r}; pass "
                "the model's whole variable dict."
            )
    params, stats = variables["params"], variables["batch_stats"]
    new_params: dict[tuple, Any] = {}
    new_stats: dict[tuple, Any] = {}
    for layer_name, bn_name in pairs:
        layer_path, bn_path = _path(layer_name), _path(bn_name)
        layer = _get(params, layer_path, "layer")
        if "kernel" not in layer:
            raise ValueError(f"layer {layer_name!r} has no kernel: {sorted(layer)}.")
        bn_stats = _get(stats, bn_path, "batch norm statistics")
        try:
            bn_params = _get(params, bn_path, "batch norm")
        except ValueError:
            bn_params = {}  # use_scale=False and use_bias=False
        has_bias = layer.get("bias") is not None
        eps = epsilon(bn_path)
        kernel, bias = fold_kernel(
            layer["kernel"], layer.get("bias"), bn_params, bn_stats, epsilon=eps
        )
        new_layer = {**layer, "kernel": kernel}
        if has_bias or remove:
            new_layer["bias"] = bias
            offset = None
        else:
            offset = bias  # the layer has no bias: the batch norm adds it
        new_params[layer_path] = new_layer
        if remove:
            new_params[bn_path] = new_stats[bn_path] = None
            continue
        mean = jnp.asarray(bn_stats["mean"])
        zero = jnp.zeros(mean.shape, mean.dtype)
        one = jnp.full(mean.shape, identity_var(eps), mean.dtype)
        ident = {**bn_stats, "mean": zero, "var": one}
        ident_params = {
            k: (jnp.ones_like if k == "scale" else jnp.zeros_like)(v)
            for k, v in bn_params.items()
        }
        if offset is not None and "bias" in bn_params:  # y = z + offset
            old = bn_params["bias"]
            ident_params["bias"] = offset.reshape(old.shape).astype(old.dtype)
        elif offset is not None:  # no bias to carry it: (z - (-offset)) * 1
            ident["mean"] = (-offset).reshape(mean.shape).astype(mean.dtype)
        new_stats[bn_path] = ident
        if bn_params:
            new_params[bn_path] = ident_params
    out = dict(variables)
    out["params"] = _drop_none(replace_layers(params, new_params))
    out["batch_stats"] = _drop_none(replace_layers(stats, new_stats))
    return out


def _drop_none(tree: Any) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    return {k: _drop_none(v) for k, v in tree.items() if v is not None}


def _fold_nnx(model: Any, pairs: Any) -> None:
    from flax import nnx

    def find(item: Any) -> Any:
        if not isinstance(item, str | tuple):
            return item
        node = model
        for key in _path(item):
            node = node[int(key)] if str(key).isdigit() else getattr(node, key)
        return node

    for layer_item, bn_item in pairs:
        layer, bn = find(layer_item), find(bn_item)
        if not isinstance(getattr(layer, "kernel", None), nnx.Param):
            raise ValueError(f"{layer_item!r} is not a layer with a kernel Param.")
        if not isinstance(getattr(bn, "var", None), nnx.BatchStat):
            raise ValueError(f"{bn_item!r} is not a batch norm (no var BatchStat).")
        bn_params = {
            k: getattr(bn, k)[...]
            for k in ("scale", "bias")
            if getattr(bn, k, None) is not None
        }
        bias = None if layer.bias is None else layer.bias[...]
        kernel, new_bias = fold_kernel(
            layer.kernel[...],
            bias,
            bn_params,
            {"mean": bn.mean[...], "var": bn.var[...]},
            epsilon=bn.epsilon,
        )
        layer.kernel[...] = kernel
        if layer.bias is None:
            layer.bias = nnx.Param(new_bias)
            layer.use_bias = True
        else:
            layer.bias[...] = new_bias
        bn.mean[...] = jnp.zeros_like(bn.mean[...])
        bn.var[...] = jnp.full(bn.var.shape, identity_var(bn.epsilon), bn.var.dtype)
        if bn.scale is not None:
            bn.scale[...] = jnp.ones_like(bn.scale[...])
        if bn.bias is not None:
            bn.bias[...] = jnp.zeros_like(bn.bias[...])


def fold(
    model: Any,
    pairs: Sequence[tuple[Any, Any]],
    *,
    epsilon: float | None = None,
    module: Any = None,
    x: Any = None,
    module_kwargs: Mapping[str, Any] | None = None,
    remove: bool = False,
) -> Any:
    """Folds each batch norm into the Dense or Conv before it, for inference.

    The folded model's output in evaluation mode equals the original's up to
    float32 rounding. Folding works on the running statistics: do it after
    training (and after :func:`jaxbn.recalibrate`), for evaluation only.

    Args:
      model: a linen variable dict (``{"params", "batch_stats", ...}``), or an
        nnx model, changed in place.
      pairs: ``(layer, batch_norm)`` pairs: linen module names or paths
        (``"Conv_0"``, ``"Block_0/Conv_0"`` or tuples); for nnx, the modules
        themselves or their attribute paths (``"block/conv"``, ``"layers/0"``).
      epsilon: linen: the batch norms' epsilon, if ``module`` is not given;
        nnx layers carry theirs (pass none). There is no default: a wrong
        epsilon gives wrong outputs silently.
      module: linen: the model (a ``flax.linen.Module``), with ``x``, to read
        each batch norm's own epsilon (``jaxbn.linen.BatchNorm`` and
        ``flax.linen.BatchNorm``) instead of passing ``epsilon``.
      x: an example input of ``module`` (or a ``jax.ShapeDtypeStruct``); the
        model is traced once with ``jax.eval_shape``, its batch norms
        skipped.
      module_kwargs: keyword arguments of that call, e.g. ``{"train":
        False}``.
      remove: linen only. False (default) returns variables for the same
        model definition: the layer's kernel (and bias, if it has one) absorb
        the batch norm, which becomes the identity (scale 1, mean 0, var such
        that ``var + epsilon == 1``), except that it adds the folded bias when
        the layer has none. True returns variables for a model without the
        batch norms and with ``use_bias=True`` on their layers: the batch
        norms' variables are dropped and every layer gets a bias.

    Returns:
      New variables (linen), or None (nnx: kernels and biases are updated, a
      bias is created where there was none, and each batch norm becomes the
      identity; delete it from the model to save its cost).

    Raises:
      ValueError: if a name is not found, a layer has no kernel, the features
        do not match, or epsilon is not positive and finite (the layer's rule).
      TypeError: if epsilon is not a float.
      ValueError: for linen without ``epsilon`` nor ``module`` and ``x`` (or
        with both), for nnx with ``epsilon``, or a pair whose batch norm the
        module does not call.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxbn, jaxbn.linen
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.Dense(3, use_bias=False, name="dense")(x)
      ...         return jaxbn.linen.BatchNorm(True, name="bn")(x)
      >>> x = jnp.array([[1.0, 2.0]])
      >>> variables = Net().init(jax.random.key(0), x)
      >>> stats = {"mean": jnp.array([1.0, 2, 3]), "var": jnp.array([4.0, 1, 9])}
      >>> variables["batch_stats"]["bn"].update(stats)
      >>> folded = jaxbn.fold(variables, [("dense", "bn")], module=Net(), x=x)
      >>> bool(jnp.allclose(Net().apply(folded, x), Net().apply(variables, x)))
      True
    """
    if is_nnx_module(model):
        if epsilon is not None or module is not None:
            raise ValueError(
                "fold reads each nnx batch norm's own epsilon; drop epsilon= and "
                "module=."
            )
        _fold_nnx(model, pairs)
        return None
    if not isinstance(model, Mapping):
        raise TypeError(
            f"fold takes a linen variable dict or an nnx model, got "
            f"{type(model).__name__}."
        )
    epsilons = _epsilons(model, epsilon, module, x, dict(module_kwargs or {}))
    return _fold_tree(model, pairs, epsilons, bool(remove))


def _epsilons(
    variables: Any,
    epsilon: float | None,
    module: Any,
    x: Any,
    module_kwargs: dict[str, Any],
) -> Callable[[tuple], float]:
    """Each batch norm's epsilon by path: the one given, or the module's own.

    The module's own are read by calling ``module`` on ``x`` with
    ``module_kwargs``.
    """
    if (epsilon is None) == (module is None or x is None):
        raise ValueError(
            "fold needs the batch norms' epsilon for linen variables: pass "
            "epsilon= (e.g. 1e-5, Flax's and jaxbn's default) or module= and x= "
            "(the model and an example input) to read each layer's own; "
            f"got epsilon={epsilon!r}, module={type(module).__name__}, "
            f"x={type(x).__name__}."
        )
    if epsilon is not None:
        eps = check_epsilon(epsilon)
        return lambda path: eps
    norms = linen_norms(module, variables, x, module_kwargs)

    def of(path: tuple) -> float:
        name = "/".join(map(str, path))
        if name not in norms:
            raise ValueError(
                f"batch norm {name!r} is not called by the module on x (it calls "
                f"{sorted(norms)}); check the pair, or pass epsilon=."
            )
        return check_epsilon(norms[name].epsilon)

    return of
