"""CIFAR VGGs of the KD zoo, all with batch norm: vgg8, vgg11, vgg13, vgg16, vgg19.

Mirrors RepDistiller's `models/vgg.py` `VGG(cfg, batch_norm=True)` (its `vgg8_bn` ...
`vgg19_bn`, which its model dict registers as vgg8 ... vgg19): five blocks of 3x3 conv (with
bias) + batch norm + ReLU, the last ReLU of each block applied outside it; 2x2 max pools after
blocks 0-2 (and after block 3 only for 64x64 input, as there), a global average pool and a
single `classifier` layer. Names follow the PyTorch Sequential indices (conv at 3j, batch
norm at 3j + 1, ReLU at 3j + 2):

  block{s}_{3j} (conv), block{s}_{3j+1} (batch norm), classifier

Features for a 32x32 input (stage{i} is block{i}, before its max pool; block0 is the stem):

  stem: (n, 32, 32, 64)       relu(block0), RepDistiller's f0
  stage1: (n, 16, 16, 128)    relu(block1), f1
  stage2: (n, 8, 8, 256)      relu(block2), f2
  stage3: (n, 4, 4, 512)      relu(block3), f3
  stage4: (n, 4, 4, 512)      relu(block4), f4
  stem_preact, stage{i}_preact  the same before that ReLU (the block's last batch norm)
  embedding: (n, 512)         global average of stage4, fed to `classifier`

Block0 is the stem, as RepDistiller and mdistiller count it: their feature methods distil
`feat[1:-1]` (f1..f4 here; RepDistiller train_student.py, mdistiller distillers/AT.py), so VGG's
four stages pair with another network's stages and never its first block.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ffkd_jax.models import layers


class VGG(nn.Module):
  cfg: Sequence[Sequence[int]]  # output channels of each conv, per block
  num_classes: int
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool):
    input_height = x.shape[1]
    features = {}
    for block, channels in enumerate(self.cfg):
      for j, out_channels in enumerate(channels):
        if j > 0:
          x = nn.relu(x)
        x = layers.conv2d(
            out_channels, 3, use_bias=True, dtype=self.dtype, name=f'block{block}_{3 * j}'
        )(x)
        bn_name = f'block{block}_{3 * j + 1}'
        x = layers.batch_norm(train, self.axis_name, self.dtype, bn_name)(x)
      name = f'stage{block}' if block else 'stem'
      features[f'{name}_preact'] = x
      x = nn.relu(x)
      features[name] = x
      if block < 3 or (block == 3 and input_height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))

    embedding = layers.global_avg_pool(x)  # (n, 512)
    features['embedding'] = embedding
    logits = layers.dense(self.num_classes, self.dtype, 'classifier')(embedding)
    return layers.classifier_logits(logits), features


# RepDistiller's cfg 'S', 'A', 'B', 'D', 'E'.
CONFIGS = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    'vgg19': (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def build(name: str, num_classes: int, axis_name: str | None, dtype) -> VGG:
  return VGG(CONFIGS[name], num_classes, axis_name=axis_name, dtype=dtype)
