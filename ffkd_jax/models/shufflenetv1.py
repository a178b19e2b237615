"""CIFAR ShuffleNetV1 of the KD zoo (`shufflenetv1`, RepDistiller's `ShuffleV1`).

Mirrors RepDistiller's `models/ShuffleNetv1.py` with groups = 3: a 1x1 stem to 24 channels,
three stages of (4, 8, 4) bottlenecks ending at (240, 480, 960) channels, each stage's first
block at stride 2 with a 3x3 average-pool shortcut concatenated to its output (PyTorch's
`AvgPool2d(3, 2, padding=1)`, zero padding counted), global average pool and `linear`.
The first block's 1x1 conv is ungrouped (its input has 24 channels), as there. Names:

  conv1, bn1, layer{s}_{b}/{conv1, bn1, conv2, bn2, conv3, bn3}, linear

Features for a 32x32 input, RepDistiller's f1..f3:

  stage1: (n, 16, 16, 240)    output of layer1 after its last ReLU
  stage2: (n, 8, 8, 480)
  stage3: (n, 4, 4, 960)
  stage{i}_preact             the same before that ReLU
  embedding: (n, 960)         global average of stage3, fed to `linear`
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers


class ShuffleV1Bottleneck(nn.Module):
  out_planes: int  # channels this block adds (a stride-2 block concatenates its input)
  stride: int
  groups: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    in_planes = x.shape[-1]
    mid_planes = self.out_planes // 4
    first_groups = 1 if in_planes == 24 else self.groups
    out = layers.conv2d(mid_planes, 1, groups=first_groups, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(out))
    out = layers.channel_shuffle(out, first_groups)
    out = layers.conv2d(
        mid_planes, 3, stride=self.stride, groups=mid_planes, dtype=self.dtype, name='conv2'
    )(out)
    out = nn.relu(layers.batch_norm(train, self.axis_name, self.dtype, 'bn2')(out))
    out = layers.conv2d(self.out_planes, 1, groups=self.groups, dtype=self.dtype, name='conv3')(out)
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'bn3')(out)
    if self.stride == 2:
      residual = nn.avg_pool(
          x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True
      )
      preact = jnp.concatenate([out, residual], axis=-1)
    else:
      preact = out + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  num_classes: int
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    x = layers.conv2d(24, 1, dtype=self.dtype, name='conv1')(x)
    x = layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(x)
    x = nn.relu(x)  # (n, 32, 32, 24)

    features = {}
    for stage, (planes, blocks) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
      for b in range(blocks):
        added = planes - x.shape[-1] if b == 0 else planes
        x, preact = ShuffleV1Bottleneck(
            added,
            2 if b == 0 else 1,
            self.groups,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name=f'layer{stage}_{b}',
        )(x, train=train)
      features[f'stage{stage}'] = x
      features[f'stage{stage}_preact'] = preact

    embedding = layers.global_avg_pool(x)  # (n, 960)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'linear')(embedding)
    return layers.classifier_logits(logits), features


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> ShuffleNetV1:
  del name
  return ShuffleNetV1(num_classes, axis_name=axis_name, dtype=dtype)
