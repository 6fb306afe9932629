"""The models of the end-to-end benchmark, each buildable with either batch norm.

``resnet`` is a CIFAR ResNet (3 stages of basic blocks with 16/32/64 channels,
batch normalization after every convolution, 32x32x3 input); ``mnist`` is the
MNIST example's ``CNN`` itself (``examples/mnist/train.py``), which chooses its
layer through ``batch_norm_cls``. :data:`IMPLEMENTATIONS` names the batch-norm
configurations compared.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

NUM_CLASSES = 10


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection, BN after every conv.

    Attributes:
      features: output channels.
      strides: stride of the first convolution (2 halves the resolution).
      norm: batch-norm constructor, called with ``use_running_average`` only.
    """

    features: int
    strides: int
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""
        norm = functools.partial(self.norm, use_running_average=not train)
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), s, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if x.shape != y.shape:  # projection shortcut, also normalized
            x = nn.Conv(self.features, (1, 1), s, use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """A CIFAR ResNet with ``6 * blocks + 2`` layers (20 with 3 blocks).

    Attributes:
      norm: the batch-norm class (or a ``functools.partial`` of it); it is
        given ``use_running_average``, ``momentum`` and ``epsilon``.
      blocks: basic blocks per stage.
      widths: channels of the three stages.
      momentum: decay of the running statistics.
      epsilon: added to the variance.
      num_classes: number of outputs.
    """

    norm: Callable[..., nn.Module]
    blocks: int = 3
    widths: tuple[int, ...] = (16, 32, 64)
    momentum: float = 0.9
    epsilon: float = 1e-5
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)`` for NHWC images."""
        norm = functools.partial(
            self.norm, momentum=self.momentum, epsilon=self.epsilon
        )
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
        x = nn.relu(norm(use_running_average=not train)(x))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, strides, norm)(x, train=train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A batch-norm configuration: its class for the ResNet, its example flags.

    Attributes:
      name: shown in the tables.
      norm: the class (or partial) given to :class:`CifarResNet`.
      example: ``batch_norm`` and ``bn_warmup`` for the MNIST example's CNN.
      note: what is built.
    """

    name: str
    norm: Callable[[], Callable[..., nn.Module]]
    example: dict[str, Any]
    note: str


def _flax_norm() -> Callable[..., nn.Module]:
    return nn.BatchNorm


def _jaxbn_norm(warmup: bool) -> Callable[[], Callable[..., nn.Module]]:
    def build() -> Callable[..., nn.Module]:
        import jaxbn.linen

        if warmup:
            return jaxbn.linen.BatchNorm
        return functools.partial(jaxbn.linen.BatchNorm, warmup=False)

    return build


REFERENCE = "flax.linen"
IMPLEMENTATIONS: dict[str, Implementation] = {
    i.name: i
    for i in (
        Implementation(
            REFERENCE,
            _flax_norm,
            {"batch_norm": "flax"},
            "flax.linen.BatchNorm with its defaults (use_fast_variance=True)",
        ),
        Implementation(
            "jaxbn.linen",
            _jaxbn_norm(True),
            {"batch_norm": "jaxbn", "bn_warmup": True},
            "jaxbn.linen.BatchNorm with its defaults (warm-up on)",
        ),
        Implementation(
            "jaxbn.linen-nowarmup",
            _jaxbn_norm(False),
            {"batch_norm": "jaxbn", "bn_warmup": False},
            "jaxbn.linen.BatchNorm(warmup=False): updates exactly like Flax",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Model:
    """A model of the benchmark.

    Attributes:
      name: ``resnet`` or ``mnist``.
      build: ``build(impl, quick)`` returns the flax module.
      image_shape: ``(height, width, channels)`` of one input.
      quick_image_shape: the same for ``--quick``.
      note: what is built.
    """

    name: str
    build: Callable[[Implementation, bool], nn.Module]
    image_shape: tuple[int, int, int]
    quick_image_shape: tuple[int, int, int]
    note: str


def _resnet(impl: Implementation, quick: bool) -> nn.Module:
    return CifarResNet(norm=impl.norm(), blocks=1 if quick else 3)


def _mnist(impl: Implementation, quick: bool) -> nn.Module:
    from examples.mnist.train import CNN

    if quick:
        return CNN(features=(4, 8), hidden=16, **impl.example)
    return CNN(**impl.example)


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            "resnet",
            _resnet,
            (32, 32, 3),
            (16, 16, 3),
            "CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, "
            "projection shortcuts; BN after each of its 21 convolutions), "
            "momentum 0.9, epsilon 1e-5; --quick: ResNet-8 on 16x16x3",
        ),
        Model(
            "mnist",
            _mnist,
            (28, 28, 1),
            (28, 28, 1),
            "examples/mnist CNN (conv32-BN-pool, conv64-BN-pool, dense128-BN, "
            "dense10), its defaults: momentum 0.99, epsilon 1e-5; --quick: "
            "features (4, 8), hidden 16",
        ),
    )
}
