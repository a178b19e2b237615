"""Wide ResNets of the KD zoo: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Mirrors RepDistiller's `models/wrn.py` (`WideResNet(depth, widen_factor)`, no dropout): a 3x3
stem, three stages of `(depth - 4) / 6` pre-activation blocks at strides 1, 2, 2, a final
batch norm + ReLU, global average pool and `fc`. Names (`block1.layer.0.bn1` there is
`block1/layer_0/bn1` here):

  conv1, block{s}/layer_{b}/{bn1, conv1, bn2, conv2[, convShortcut]}, bn1, fc

Features for a 32x32 input (`k` = widen factor):

  stage1: (n, 32, 32, 16k)    output of block1 (a residual sum: pre-activation blocks end
  stage2: (n, 16, 16, 32k)    without a ReLU), as RepDistiller's feature list
  stage3: (n, 8, 8, 64k)
  stage{i}_preact             RepDistiller's preact feature: stage{i} through the batch norm
                that precedes the next ReLU (block{i+1}/layer_0/bn1, and the
                final bn1 for stage3), i.e. the tensor that ReLU sees. Unlike
                the other families, relu(stage{i}_preact) != stage{i} here.
  embedding: (n, 64k)         global average of relu(stage3_preact), fed to `fc`

`first_stage` > 1 makes the module a partial forward: it takes stage{first_stage - 1}'s output
map instead of images and runs blocks first_stage..3, the final `bn1`, the pool and `fc`
(features of those stages only; stage{first_stage - 1}_preact, which block{first_stage}'s first
batch norm computes, is not among them). Its submodules are the full model's, by the same
names, so the full model's variables of those blocks, `bn1` and `fc` are its variables
(`ffkd_jax.models.create_tail`).
"""

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers


class WideBasicBlock(nn.Module):
  """Pre-activation block; returns `(out, bn1(x))`, the second this block's input preact."""

  out_planes: int
  stride: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    equal_in_out = x.shape[-1] == self.out_planes
    input_preact = layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(x)
    activated = nn.relu(input_preact)
    out = layers.conv2d(self.out_planes, 3, stride=self.stride, dtype=self.dtype, name='conv1')(
        activated
    )
    out = layers.batch_norm(train, self.axis_name, self.dtype, 'bn2')(out)
    out = nn.relu(out)
    out = layers.conv2d(self.out_planes, 3, dtype=self.dtype, name='conv2')(out)
    if equal_in_out:
      residual = x
    else:  # as RepDistiller: the projection sees the activated input
      residual = layers.conv2d(
          self.out_planes, 1, stride=self.stride, dtype=self.dtype, name='convShortcut'
      )(activated)
    return residual + out, input_preact


class NetworkBlock(nn.Module):
  """One stage; returns `(out, preact of its first block's input)`."""

  num_layers: int
  out_planes: int
  stride: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    input_preact = None
    for b in range(self.num_layers):
      x, preact = WideBasicBlock(
          self.out_planes,
          self.stride if b == 0 else 1,
          axis_name=self.axis_name,
          dtype=self.dtype,
          name=f'layer_{b}',
      )(x, train=train)
      if b == 0:
        input_preact = preact
    return x, input_preact


class WideResNet(nn.Module):
  depth: int
  widen_factor: int
  num_classes: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32
  first_stage: int = 1  # > 1: a partial forward from stage{first_stage - 1}'s output

  num_stages = 3

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    if (self.depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4, got {self.depth}')
    num_layers = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    layers.check_first_stage(self.first_stage, self.num_stages)

    if self.first_stage == 1:
      x = layers.conv2d(16, 3, dtype=self.dtype, name='conv1')(x)  # (n, 32, 32, 16)
    stage_outputs = []
    previous_preact = []  # preact of each stage's input = preact of the previous stage
    for stage, (planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
      if stage < self.first_stage:
        continue
      x, input_preact = NetworkBlock(
          num_layers, planes, stride, self.axis_name, self.dtype, name=f'block{stage}'
      )(x, train=train)
      stage_outputs.append(x)
      previous_preact.append(input_preact)

    final_preact = layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(x)
    preacts = previous_preact[1:] + [final_preact]

    features = {}
    for stage, (out, preact) in enumerate(zip(stage_outputs, preacts), start=self.first_stage):
      features[f'stage{stage}'] = out
      features[f'stage{stage}_preact'] = preact
    embedding = layers.global_avg_pool(nn.relu(final_preact))  # (n, 64k)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'fc')(embedding)
    return layers.classifier_logits(logits), features


# name -> (depth, widen factor), as RepDistiller's wrn_16_1() ... wrn_40_2().
CONFIGS = {
    'wrn_16_1': (16, 1),
    'wrn_16_2': (16, 2),
    'wrn_40_1': (40, 1),
    'wrn_40_2': (40, 2),
}


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> WideResNet:
  depth, widen_factor = CONFIGS[name]
  return WideResNet(depth, widen_factor, num_classes, axis_name=axis_name, dtype=dtype)
