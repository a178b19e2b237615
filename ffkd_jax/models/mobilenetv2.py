"""CIFAR MobileNetV2 of the KD zoo (`mobilenetv2`, RepDistiller's `mobile_half`).

Mirrors RepDistiller's `models/mobilenetv2.py` `MobileNetV2(T=6, width_mult=0.5)`: a 3x3
stride-2 stem, seven groups of inverted residual blocks (t, c, n, s) =
(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
(6, 320, 1, 1) with channels scaled by 0.5, a 1x1 conv to 1280, global average pool and a
one-layer `classifier`. Every block has the 1x1 expansion, even when t = 1. Names follow the
PyTorch ModuleList / Sequential indices:

  conv1_0, conv1_1, blocks_{g}_{b}/{conv_0, conv_1, conv_3, conv_4, conv_6, conv_7},
  conv2_0, conv2_1, classifier_0

(in a block: conv_0/conv_1 expansion conv and batch norm, conv_3/conv_4 depthwise,
conv_6/conv_7 linear projection).

Features for a 32x32 input, RepDistiller's feature list f1..f4:

  stage1: (n, 16, 16, 12)     after block group 1
  stage2: (n, 8, 8, 16)       after block group 2
  stage3: (n, 4, 4, 48)       after block group 4
  stage4: (n, 2, 2, 160)      after block group 6
  stage{i}_preact             equal to stage{i}: the blocks end in a linear bottleneck
  embedding: (n, 1280)        global average after conv2, fed to `classifier_0`
"""

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers

# c (channels before width scaling), n (blocks), s (first stride); the expansion t is 1 for
# the first group and `MobileNetV2.expansion` (RepDistiller's T) for the others.
_SETTING = (
    (16, 1, 1),
    (24, 2, 1),
    (32, 3, 2),
    (64, 4, 2),
    (96, 3, 1),
    (160, 3, 2),
    (320, 1, 1),
)
_STAGE_AFTER_GROUP = {1: 1, 2: 2, 4: 3, 6: 4}  # block group index -> stage number


class InvertedResidual(nn.Module):
  out_channels: int
  stride: int
  expand_ratio: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    in_channels = x.shape[-1]
    hidden = in_channels * self.expand_ratio
    out = layers.conv2d(hidden, 1, dtype=self.dtype, name='conv_0')(x)
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'conv_1')(out)
    out = nn.relu(out)
    out = layers.conv2d(
        hidden, 3, stride=self.stride, groups=hidden, dtype=self.dtype, name='conv_3'
    )(out)
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'conv_4')(out)
    out = nn.relu(out)
    out = layers.conv2d(self.out_channels, 1, dtype=self.dtype, name='conv_6')(out)
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'conv_7')(out)
    if self.stride == 1 and in_channels == self.out_channels:
      return x + out
    return out


class MobileNetV2(nn.Module):
  num_classes: int
  expansion: int = 6
  width_mult: float = 0.5
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    stem_channels = int(32 * self.width_mult)
    x = layers.conv2d(stem_channels, 3, stride=2, dtype=self.dtype, name='conv1_0')(x)
    x = layers.batch_norm(train, self.axis_name, self.dtype, 'conv1_1')(x)
    x = nn.relu(x)  # (n, 16, 16, 16)

    features = {}
    for group, (c, n, s) in enumerate(_SETTING):
      expand_ratio = 1 if group == 0 else self.expansion
      for b in range(n):
        x = InvertedResidual(
            int(c * self.width_mult),
            s if b == 0 else 1,
            expand_ratio,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name=f'blocks_{group}_{b}',
        )(x, train=train)
      if group in _STAGE_AFTER_GROUP:
        stage = _STAGE_AFTER_GROUP[group]
        features[f'stage{stage}'] = x
        features[f'stage{stage}_preact'] = x

    last_channels = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = layers.conv2d(last_channels, 1, dtype=self.dtype, name='conv2_0')(x)
    x = layers.batch_norm(train, self.axis_name, self.dtype, 'conv2_1')(x)
    x = nn.relu(x)
    embedding = layers.global_avg_pool(x)  # (n, 1280)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'classifier_0')(embedding)
    return layers.classifier_logits(logits), features


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> MobileNetV2:
  del name  # only mobile_half (T = 6, width 0.5) is registered
  return MobileNetV2(num_classes, axis_name=axis_name, dtype=dtype)
