"""CIFAR ShuffleNetV2 of the KD zoo (`shufflenetv2`, RepDistiller's `ShuffleV2`).

Mirrors RepDistiller's `models/ShuffleNetv2.py` with net size 1: a 1x1 stem to 24 channels,
three stages each of one stride-2 `DownBlock` and (3, 7, 3) split/shuffle basic blocks at
(116, 232, 464) channels, a 1x1 conv to 1024, global average pool and `linear`. Names (a
stage's `DownBlock` is index 0 of its Sequential, the basic blocks follow):

  conv1, bn1,
  layer{s}_0/{conv1, bn1, conv2, bn2, conv3, bn3, conv4, bn4, conv5, bn5},
  layer{s}_{b>=1}/{conv1, bn1, conv2, bn2, conv3, bn3},
  conv2, bn2, linear

Features for a 32x32 input, RepDistiller's f1..f3:

  stage1: (n, 16, 16, 116)    output of layer1 (after the last block's ReLU and shuffle)
  stage2: (n, 8, 8, 232)
  stage3: (n, 4, 4, 464)
  stage{i}_preact             the same before the last block's ReLU. RepDistiller returns
                this tensor before the channel shuffle; here it is shuffled
                like the output, so relu(stage{i}_preact) == stage{i}
                channel for channel (the untouched half is already >= 0).
  embedding: (n, 1024)        global average after conv2/bn2/ReLU, fed to `linear`
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers


class ShuffleV2BasicBlock(nn.Module):
  """Split the channels in half, transform the second half, concatenate, shuffle."""

  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    half = x.shape[-1] // 2
    kept, transformed = x[..., :half], x[..., half:]
    out = layers.conv2d(half, 1, dtype=self.dtype, name='conv1')(transformed)
    out = nn.relu(layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(out))
    out = layers.conv2d(half, 3, groups=half, dtype=self.dtype, name='conv2')(out)
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'bn2')(out)
    out = layers.conv2d(half, 1, dtype=self.dtype, name='conv3')(out)
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'bn3')(out)
    preact = layers.channel_shuffle(jnp.concatenate([kept, out], axis=-1), 2)
    out = layers.channel_shuffle(jnp.concatenate([kept, nn.relu(out)], axis=-1), 2)
    return out, preact


class ShuffleV2DownBlock(nn.Module):
  """Two stride-2 branches on the whole input, concatenated and shuffled."""

  out_channels: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    in_channels = x.shape[-1]
    mid = self.out_channels // 2

    def bn(name):
      return layers.batch_norm(train, self.axis_name, self.dtype, name)

    # left: depthwise 3x3 stride 2, then 1x1
    left = layers.conv2d(
        in_channels, 3, stride=2, groups=in_channels, dtype=self.dtype, name='conv1'
    )(x)
    left = bn('bn1')(left)
    left = layers.conv2d(mid, 1, dtype=self.dtype, name='conv2')(left)
    left = nn.relu(bn('bn2')(left))
    # right: 1x1, depthwise 3x3 stride 2, 1x1
    right = layers.conv2d(mid, 1, dtype=self.dtype, name='conv3')(x)
    right = nn.relu(bn('bn3')(right))
    right = layers.conv2d(mid, 3, stride=2, groups=mid, dtype=self.dtype, name='conv4')(right)
    right = bn('bn4')(right)
    right = layers.conv2d(mid, 1, dtype=self.dtype, name='conv5')(right)
    right = nn.relu(bn('bn5')(right))
    return layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  num_classes: int
  out_channels: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    x = layers.conv2d(24, 1, dtype=self.dtype, name='conv1')(x)
    x = layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(x)
    x = nn.relu(x)  # (n, 32, 32, 24)

    features = {}
    stages = zip(self.out_channels, self.num_blocks)
    for stage, (channels, blocks) in enumerate(stages, start=1):
      x = ShuffleV2DownBlock(
          channels, axis_name=self.axis_name, dtype=self.dtype, name=f'layer{stage}_0'
      )(x, train=train)
      preact = x
      for b in range(1, blocks + 1):
        x, preact = ShuffleV2BasicBlock(
            axis_name=self.axis_name, dtype=self.dtype, name=f'layer{stage}_{b}'
        )(x, train=train)
      features[f'stage{stage}'] = x
      features[f'stage{stage}_preact'] = preact

    x = layers.conv2d(self.out_channels[3], 1, dtype=self.dtype, name='conv2')(x)
    x = nn.relu(layers.batch_norm(train, self.axis_name, self.dtype, 'bn2')(x))
    embedding = layers.global_avg_pool(x)  # (n, 1024)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'linear')(embedding)
    return layers.classifier_logits(logits), features


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> ShuffleNetV2:
  del name
  return ShuffleNetV2(num_classes, axis_name=axis_name, dtype=dtype)
