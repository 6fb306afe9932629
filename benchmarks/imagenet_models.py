"""ResNets in the style of Flax's ImageNet example, with a choosable batch norm.

The layout follows the published architecture (He et al., 2016): a 7x7/2
convolution, batch norm, ReLU and 3x3/2 max pooling; four stages of residual
blocks (basic blocks for ResNet-18/34, bottleneck blocks for ResNet-50 and up)
whose first block halves the resolution from the second stage on, with a
normalized 1x1 projection where the shape changes; global average pooling and
a dense classifier. As in Flax's example, the last batch norm of each block
starts with a zero scale and every batch norm gets ``momentum=0.9`` and
``epsilon=1e-5``. The compile-time benchmark (:mod:`benchmarks.compile_time`)
builds these with ``flax.linen.BatchNorm`` or ``jaxbn.linen.BatchNorm``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_CLASSES = 1000


class _Block(nn.Module):
    """A residual block: its width, its stride and its batch norm.

    Attributes:
      filters: channels of its convolutions (a bottleneck's output has 4x).
      strides: stride of the block's strided convolution (and shortcut).
      norm: batch-norm constructor (``use_running_average`` already bound).
    """

    filters: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Any = None

    def conv(self, *args: Any, **kwargs: Any) -> nn.Conv:
        """``nn.Conv`` without bias, in the block's dtype if it has one."""
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        return nn.Conv(*args, use_bias=False, **kwargs)

    def shortcut(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``relu(x + y)``, x projected and normalized where the shape changes."""
        if x.shape != y.shape:
            s = (self.strides, self.strides)
            x = self.conv(y.shape[-1], (1, 1), s)(x)
            x = self.norm()(x)
        return nn.relu(x + y)


class BasicBlock(_Block):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns ``relu(shortcut(x) + bn(conv(relu(bn(conv(x))))))``."""
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), s)(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)
        return self.shortcut(x, y)


class Bottleneck(_Block):
    """1x1, 3x3 and 1x1 convolutions (4x wider output) and a shortcut (ResNet-50+)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns ``relu(shortcut(x) + bn(conv1x1(...)))``."""
        s = (self.strides, self.strides)
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.conv(self.filters, (3, 3), s)(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(4 * self.filters, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)
        return self.shortcut(x, y)


class ResNet(nn.Module):
    """An ImageNet ResNet.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      norm: the batch-norm class; given ``use_running_average``, ``momentum``
        and ``epsilon`` (and ``scale_init`` for each block's last one).
      filters: channels of the first stage (doubled at each later stage).
      num_classes: outputs.
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module]
    norm: Callable[..., nn.Module]
    filters: int = 64
    num_classes: int = NUM_CLASSES
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)`` for NHWC images."""
        typed = {} if self.dtype is None else {"dtype": self.dtype}
        norm = functools.partial(
            self.norm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            **typed,
        )
        x = nn.Conv(
            self.filters,
            (7, 7),
            (2, 2),
            padding=[(3, 3), (3, 3)],
            use_bias=False,
            **typed,
        )(x)
        x = nn.relu(norm()(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = self.block(self.filters * 2**stage, strides, norm, self.dtype)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, **typed)(x)


def resnet18(norm: Callable[..., nn.Module], dtype: Any = None) -> ResNet:
    """ResNet-18: basic blocks, stages (2, 2, 2, 2); 20 batch norms."""
    return ResNet((2, 2, 2, 2), BasicBlock, norm, dtype=dtype)


def resnet50(norm: Callable[..., nn.Module], dtype: Any = None) -> ResNet:
    """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3); 53 batch norms."""
    return ResNet((3, 4, 6, 3), Bottleneck, norm, dtype=dtype)
