"""Four-stage ResNets: ImageNet resnet18/34/50 and RepDistiller's CIFAR ResNet50.

ImageNet models (`resnet18`, `resnet34`, `resnet50`) mirror torchvision's `resnet.py` (the
file mdistiller copies for its ImageNet teachers): a 7x7 stride-2 stem with 3x3 stride-2 max
pool, four stages at strides 1, 2, 2, 2, global average pool and `fc`. Names:

  conv1, bn1, layer{s}_{b}/{conv1, bn1, conv2, bn2[, conv3, bn3], downsample_0, downsample_1}, fc

`resnet50_cifar` mirrors RepDistiller's `models/resnetv2.py` `ResNet50`: a 3x3 stride-1 stem,
no max pool, the same four bottleneck stages and `linear`; its projection shortcut is named
`shortcut_0` / `shortcut_1`:

  conv1, bn1, layer{s}_{b}/{conv1, bn1, conv2, bn2, conv3, bn3, shortcut_0, shortcut_1}, linear

Features (`e` = 1 for basic blocks, 4 for bottlenecks; spatial sizes for 224x224 ImageNet
input, and in brackets for 32x32 CIFAR input to `resnet50_cifar`):

  stage1: (n, 56, 56, 64e)    [(n, 32, 32, 256)]   output of layer1 after its last ReLU
  stage2: (n, 28, 28, 128e)   [(n, 16, 16, 512)]
  stage3: (n, 14, 14, 256e)   [(n, 8, 8, 1024)]
  stage4: (n, 7, 7, 512e)     [(n, 4, 4, 2048)]
  stage{i}_preact             the same before the last block's ReLU
  embedding: (n, 512e)        global average of stage4, fed to the classifier
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  num_classes: int
  block: str = 'basic'
  cifar_stem: bool = False  # RepDistiller resnetv2: 3x3 stem, no max pool, `shortcut`, `linear`
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    block_cls = layers.resnet_block(self.block)
    if self.cifar_stem:
      x = layers.conv2d(64, 3, dtype=self.dtype, name='conv1')(x)
    else:
      x = layers.conv2d(64, 7, stride=2, dtype=self.dtype, name='conv1')(x)
    x = layers.batch_norm(train, self.axis_name, self.dtype, 'bn1')(x)
    x = nn.relu(x)
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # (n, 56, 56, 64)

    shortcut_name = 'shortcut' if self.cifar_stem else 'downsample'
    features = {}
    stages = zip(self.stage_sizes, (64, 128, 256, 512), (1, 2, 2, 2))
    for stage, (num_blocks, planes, stride) in enumerate(stages, start=1):
      for b in range(num_blocks):
        x, preact = block_cls(
            planes,
            stride=stride if b == 0 else 1,
            shortcut_name=shortcut_name,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name=f'layer{stage}_{b}',
        )(x, train=train)
      features[f'stage{stage}'] = x
      features[f'stage{stage}_preact'] = preact

    embedding = layers.global_avg_pool(x)  # (n, 512 * expansion)
    features['embedding'] = embedding
    head = 'linear' if self.cifar_stem else 'fc'
    logits = layers.dense(self.num_classes, self.dtype, head)(embedding)
    return layers.classifier_logits(logits), features


# name -> (blocks per stage, block kind, cifar stem)
CONFIGS = {
    'resnet18': ((2, 2, 2, 2), 'basic', False),
    'resnet34': ((3, 4, 6, 3), 'basic', False),
    'resnet50': ((3, 4, 6, 3), 'bottleneck', False),
    'resnet50_cifar': ((3, 4, 6, 3), 'bottleneck', True),
}


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> ResNet:
  stage_sizes, block, cifar_stem = CONFIGS[name]
  return ResNet(
      stage_sizes,
      num_classes,
      block=block,
      cifar_stem=cifar_stem,
      axis_name=axis_name,
      dtype=dtype,
  )
