"""CIFAR ResNets of the KD zoo: resnet8 ... resnet110, resnet8x4, resnet32x4.

Mirrors RepDistiller's `models/resnet.py` (`ResNet(depth, num_filters, 'basicblock')`):
a 3x3 stem, three stages of `(depth - 2) / 6` basic blocks at strides 1, 2, 2, a global
average pool and `fc`. Submodule names follow its PyTorch state dict with each
`name.index` written `name_index`:

  conv1, bn1, layer{s}_{b}/{conv1, bn1, conv2, bn2, downsample_0, downsample_1}, fc

Features for a 32x32 input (`w` = `num_filters`, (16, 16, 32, 64) or x4 (32, 64, 128, 256)):

  stage1: (n, 32, 32, w[1])   output of layer1 (after its last block's ReLU)
  stage2: (n, 16, 16, w[2])   output of layer2
  stage3: (n, 8, 8, w[3])     output of layer3
  stage{i}_preact             the same before the last block's ReLU (RepDistiller's preact)
  embedding: (n, w[3])        global average of stage3, fed to `fc`

`first_stage` > 1 makes the module a partial forward: it takes stage{first_stage - 1}'s output
map instead of images and runs stages first_stage..3, the pool and `fc` (features of those
stages only). Its submodules are the full model's, by the same names, so the full model's
variables of those stages and `fc` are its variables (`ffkd_jax.models.create_tail`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers


class CifarResNet(nn.Module):
  depth: int
  num_filters: Sequence[int]  # (stem, stage1, stage2, stage3) channels
  num_classes: int
  block: str = 'basic'
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32
  first_stage: int = 1  # > 1: a partial forward from stage{first_stage - 1}'s output

  num_stages = 3

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    block_cls = layers.resnet_block(self.block)
    per_block = 6 if self.block == 'basic' else 9
    if (self.depth - 2) % per_block:
      raise ValueError(f'depth {self.depth} is not {per_block}n+2 for {self.block} blocks')
    blocks_per_stage = (self.depth - 2) // per_block
    layers.check_first_stage(self.first_stage, self.num_stages)

    if self.first_stage == 1:
      x = layers.conv2d(self.num_filters[0], 3, dtype=self.dtype, name='conv1')(x)
      x = layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(x)
      x = nn.relu(x)  # (n, 32, 32, w0)

    features = {}
    for stage, (planes, stride) in enumerate(zip(self.num_filters[1:], (1, 2, 2)), start=1):
      if stage < self.first_stage:
        continue
      for b in range(blocks_per_stage):
        x, preact = block_cls(
            planes,
            stride=stride if b == 0 else 1,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name=f'layer{stage}_{b}',
        )(x, train=train)
      features[f'stage{stage}'] = x
      features[f'stage{stage}_preact'] = preact

    embedding = layers.global_avg_pool(x)  # (n, w3)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'fc')(embedding)
    return layers.classifier_logits(logits), features


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

# name -> (depth, num_filters), as RepDistiller's resnet8() ... resnet32x4().
CONFIGS = {
    'resnet8': (8, _SMALL),
    'resnet14': (14, _SMALL),
    'resnet20': (20, _SMALL),
    'resnet32': (32, _SMALL),
    'resnet44': (44, _SMALL),
    'resnet56': (56, _SMALL),
    'resnet110': (110, _SMALL),
    'resnet8x4': (8, _X4),
    'resnet32x4': (32, _X4),
}


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> CifarResNet:
  depth, num_filters = CONFIGS[name]
  return CifarResNet(depth, num_filters, num_classes, axis_name=axis_name, dtype=dtype)
