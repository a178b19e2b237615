"""Building blocks shared by the model zoo.

Every convolution is padded explicitly the way PyTorch pads it (`padding=k // 2` on both
sides unless told otherwise), never with 'SAME': for a 3x3 stride-2 convolution on an even
input 'SAME' pads (0, 1) where PyTorch pads (1, 1), which shifts every output pixel and would
break weights converted from PyTorch. Convolutions are initialised like the PyTorch zoo,
kaiming normal over fan-out; dense layers keep Flax's default.

The two residual blocks here (`BasicBlock`, `Bottleneck`) are the post-activation ResNet blocks
used by RepDistiller's CIFAR `resnet.py`, its `resnetv2.py` and torchvision's ImageNet ResNet;
their submodule names mirror those files: `conv1`, `bn1`, `conv2`, `bn2`(, `conv3`, `bn3`) and
`{shortcut_name}_0` / `{shortcut_name}_1` for the projection shortcut's conv and batch norm
(`downsample` in `resnet.py` and torchvision, `shortcut` in `resnetv2.py`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import conv
from ffkd_jax.models import norm

Dtype = Any

# PyTorch's nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'), equal to the
# normal(0, sqrt(2 / (k * k * out_channels))) used by the older CIFAR files.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv2d(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
  """A square convolution padded like PyTorch's `nn.Conv2d(..., padding=padding)`.

  `padding` defaults to `kernel_size // 2`; `groups` is PyTorch's `groups` (Flax's
  `feature_group_count`), so `groups == in_channels` is a depthwise convolution.
  """
  if padding is None:
    padding = kernel_size // 2
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups,
      use_bias=use_bias,
      kernel_init=kaiming_normal_fan_out,
      dtype=dtype,
      conv_general_dilated=conv.conv_general_dilated,  # XLA's, or a faster CPU weight gradient
      name=name,
  )


def batch_norm(
    train: bool, axis_name: str | None, dtype: Dtype = jnp.float32, name: str | None = None
) -> norm.BatchNorm:
  """PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

  With `axis_name` set, batch statistics in training are averaged over that mapped axis, so
  that inside the data-parallel step they are the statistics of the global batch. `norm.BatchNorm`
  is Flax's `nn.BatchNorm` with its training gradient written out (ffkd_jax/models/norm.py).
  """
  return norm.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=axis_name,
      dtype=dtype,
      name=name,
  )


def dense(features: int, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """(n, h, w, c) -> (n, c). Every zoo model's final pool covers the whole map."""
  return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """ShuffleNet's channel shuffle on NHWC, the same permutation as PyTorch on NCHW.

  Channel `g * (c // groups) + j` moves to `j * groups + g`.
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, groups, c // groups)
  x = jnp.swapaxes(x, 3, 4)
  return x.reshape(n, h, w, c)


def check_first_stage(first_stage: int, num_stages: int) -> None:
  """Raises unless a partial forward's `first_stage` is one of the model's stages 1..K."""
  if not 1 <= first_stage <= num_stages:
    raise ValueError(f'first_stage={first_stage!r} is not a stage of this model (1..{num_stages})')


def classifier_logits(x: jnp.ndarray) -> jnp.ndarray:
  """Logits leave every model as float32 whatever the compute dtype, for the losses."""
  return x.astype(jnp.float32)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions and a residual; returns `(relu(out), out)`, the second the preact."""

  planes: int
  stride: int = 1
  shortcut_name: str = 'downsample'
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    out_channels = self.planes * self.expansion
    out = conv2d(self.planes, 3, stride=self.stride, dtype=self.dtype, name='conv1')(x)
    out = batch_norm(train, self.axis_name, self.dtype, 'bn1')(out)
    out = nn.relu(out)
    out = conv2d(self.planes, 3, dtype=self.dtype, name='conv2')(out)
    out = batch_norm(train, self.axis_name, self.dtype, 'bn2')(out)
    residual = _shortcut(self, x, out_channels, train)
    preact = out + residual
    return conv.materialize(nn.relu(preact)), preact


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4; returns `(relu(out), out)`."""

  planes: int
  stride: int = 1
  shortcut_name: str = 'downsample'
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    out_channels = self.planes * self.expansion
    out = conv2d(self.planes, 1, dtype=self.dtype, name='conv1')(x)
    out = batch_norm(train, self.axis_name, self.dtype, 'bn1')(out)
    out = nn.relu(out)
    out = conv2d(self.planes, 3, stride=self.stride, dtype=self.dtype, name='conv2')(out)
    out = batch_norm(train, self.axis_name, self.dtype, 'bn2')(out)
    out = nn.relu(out)
    out = conv2d(out_channels, 1, dtype=self.dtype, name='conv3')(out)
    out = batch_norm(train, self.axis_name, self.dtype, 'bn3')(out)
    residual = _shortcut(self, x, out_channels, train)
    preact = out + residual
    return conv.materialize(nn.relu(preact)), preact


def _shortcut(block: nn.Module, x: jnp.ndarray, out_channels: int, train: bool) -> jnp.ndarray:
  """Identity, or a strided 1x1 conv + batch norm where the shape changes (as PyTorch)."""
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  residual = conv2d(
      out_channels, 1, stride=block.stride, dtype=block.dtype, name=f'{block.shortcut_name}_0'
  )(x)
  return batch_norm(train, block.axis_name, block.dtype, f'{block.shortcut_name}_1')(residual)


def resnet_block(kind: str) -> type[nn.Module]:
  """'basic' -> BasicBlock, 'bottleneck' -> Bottleneck."""
  blocks = {'basic': BasicBlock, 'bottleneck': Bottleneck}
  if kind not in blocks:
    raise ValueError(f"unknown residual block {kind!r}; valid: {', '.join(blocks)}")
  return blocks[kind]
