"""Test-only PyTorch definitions of the RepDistiller CIFAR zoo, to check `import_torch` against.

Written for these tests after RepDistiller's `models/{resnet, resnetv2, wrn, vgg, mobilenetv2,
ShuffleNetv1, ShuffleNetv2}.py`: the same modules, attribute names (hence state-dict names),
layer order, padding and pooling. Each model's `forward(x)` (NCHW) returns
`(logits, features)` with `features` keyed as ffkd_jax's (`stage{i}`, `stage{i}_preact`,
`embedding`, NCHW), each the tensor RepDistiller's `forward(is_feat=True[, preact=True])` gives:

  - resnet*, resnet50_cifar, shufflenetv1: the last block's output and its input to the ReLU;
  - wrn_*: block{i}'s output; preact = that output through the next batch norm
    (block{i+1}.layer[0].bn1, or the final bn1), RepDistiller's convention;
  - vgg*: relu(block{i}) and block{i} (`stem`: block0; RepDistiller lists f0 only after the ReLU);
  - mobilenetv2: the output of block groups 1, 2, 4, 6; preact = the same;
  - shufflenetv2: preact is RepDistiller's, *before* the last block's channel shuffle
    (ffkd_jax shuffles it like the output; the tests shuffle this one to compare).

`build(name, num_classes)` takes ffkd_jax's registry names.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _bn(channels):
  return nn.BatchNorm2d(channels)


def _channel_shuffle(x, groups):
  n, c, h, w = x.shape
  return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ----------------------------------------------------------------- resnet.py / resnetv2.py


class ResBlock(nn.Module):
  """Post-activation basic (expansion 1) or bottleneck (expansion 4) block.

  The projection shortcut is an attribute named `shortcut_name` (`downsample` in resnet.py,
  `shortcut` in resnetv2.py): Sequential(conv 1x1, batch norm), or absent.
  """

  def __init__(self, in_planes, planes, stride, bottleneck, shortcut_name):
    super().__init__()
    self.bottleneck = bottleneck
    out_planes = planes * (4 if bottleneck else 1)
    if bottleneck:
      self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
      self.bn1 = _bn(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
      self.bn2 = _bn(planes)
      self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
      self.bn3 = _bn(out_planes)
    else:
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
      self.bn1 = _bn(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
      self.bn2 = _bn(planes)
    self.shortcut_name = shortcut_name
    projection = None
    if stride != 1 or in_planes != out_planes:
      projection = nn.Sequential(
          nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), _bn(out_planes)
      )
    setattr(self, shortcut_name, projection)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      out = F.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
    else:
      out = self.bn2(self.conv2(out))
    projection = getattr(self, self.shortcut_name)
    preact = out + (x if projection is None else projection(x))
    return F.relu(preact), preact


class ResNet(nn.Module):
  """RepDistiller's CIFAR ResNet (resnet.py: 3 stages, `downsample`, `fc`) or its resnetv2
  ResNet (4 stages from 64 channels, `shortcut`, `linear`)."""

  def __init__(self, stem, widths, blocks, bottleneck, shortcut_name, head, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
    self.bn1 = _bn(stem)
    in_planes = stem
    self.num_stages = len(widths)
    for s, (planes, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
      stage = []
      for b in range(blocks[s - 1]):
        stage.append(
            ResBlock(in_planes, planes, stride if b == 0 else 1, bottleneck, shortcut_name)
        )
        in_planes = planes * (4 if bottleneck else 1)
      setattr(self, f'layer{s}', nn.ModuleList(stage))
    self.head = head
    setattr(self, head, nn.Linear(in_planes, num_classes))

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    features = {}
    for s in range(1, self.num_stages + 1):
      for block in getattr(self, f'layer{s}'):
        x, preact = block(x)
      features[f'stage{s}'], features[f'stage{s}_preact'] = x, preact
    embedding = x.mean(dim=(2, 3))
    features['embedding'] = embedding
    return getattr(self, self.head)(embedding), features


# ----------------------------------------------------------------- wrn.py


class WideBlock(nn.Module):

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = _bn(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = _bn(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
    self.equal_in_out = in_planes == out_planes
    if not self.equal_in_out:
      self.convShortcut = nn.Conv2d(  # pylint: disable=invalid-name
          in_planes, out_planes, 1, stride=stride, bias=False
      )

  def forward(self, x):
    activated = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
    # With a projection, the shortcut sees the activated input; otherwise the raw input.
    return (x if self.equal_in_out else self.convShortcut(activated)) + out


class WideStage(nn.Module):

  def __init__(self, num_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(
        *[
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(num_layers)
        ]
    )

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth, widen_factor, num_classes):
    super().__init__()
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    self.block1 = WideStage(n, widths[0], widths[1], 1)
    self.block2 = WideStage(n, widths[1], widths[2], 2)
    self.block3 = WideStage(n, widths[2], widths[3], 2)
    self.bn1 = _bn(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    f1 = self.block1(self.conv1(x))
    f2 = self.block2(f1)
    f3 = self.block3(f2)
    final = self.bn1(f3)
    embedding = F.relu(final).mean(dim=(2, 3))
    features = {
        'stage1': f1,
        'stage2': f2,
        'stage3': f3,
        'stage1_preact': self.block2.layer[0].bn1(f1),
        'stage2_preact': self.block3.layer[0].bn1(f2),
        'stage3_preact': final,
        'embedding': embedding,
    }
    return self.fc(embedding), features


# ----------------------------------------------------------------- vgg.py (batch norm)


class VGG(nn.Module):

  def __init__(self, cfg, num_classes):
    super().__init__()
    in_channels = 3
    for i, channels in enumerate(cfg):
      modules = []
      for out_channels in channels:
        modules += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _bn(out_channels),
            nn.ReLU(),
        ]
        in_channels = out_channels
      setattr(self, f'block{i}', nn.Sequential(*modules[:-1]))  # last ReLU applied outside
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    height = x.shape[2]
    features = {}
    for i in range(5):
      x = getattr(self, f'block{i}')(x)
      name = f'stage{i}' if i else 'stem'  # block0 is the stem (RepDistiller's f0)
      features[f'{name}_preact'] = x
      x = F.relu(x)
      features[name] = x
      if i < 3 or (i == 3 and height == 64):
        x = F.max_pool2d(x, 2, 2)
    embedding = F.adaptive_avg_pool2d(x, 1).flatten(1)
    features['embedding'] = embedding
    return self.classifier(embedding), features


VGG_CFG = {
    'vgg8': [[64], [128], [256], [512], [512]],
    'vgg11': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'vgg13': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'vgg16': [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    'vgg19': [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


# ----------------------------------------------------------------- mobilenetv2.py


class InvertedResidual(nn.Module):

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = inp * expand_ratio
    self.use_res_connect = stride == 1 and inp == oup
    self.conv = nn.Sequential(
        nn.Conv2d(inp, hidden, 1, bias=False),
        _bn(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
        _bn(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, oup, 1, bias=False),
        _bn(oup),
    )

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  SETTING = [
      (1, 16, 1, 1),
      (None, 24, 2, 1),
      (None, 32, 3, 2),
      (None, 64, 4, 2),
      (None, 96, 3, 1),
      (None, 160, 3, 2),
      (None, 320, 1, 1),
  ]  # t (None: T), c, n, s

  def __init__(self, num_classes, expansion=6, width_mult=0.5):
    super().__init__()
    channels = int(32 * width_mult)
    self.conv1 = nn.Sequential(
        nn.Conv2d(3, channels, 3, 2, 1, bias=False), _bn(channels), nn.ReLU()
    )
    self.blocks = nn.ModuleList()
    for t, c, n, s in self.SETTING:
      out = int(c * width_mult)
      group = []
      for i in range(n):
        group.append(InvertedResidual(channels, out, s if i == 0 else 1, t or expansion))
        channels = out
      self.blocks.append(nn.Sequential(*group))
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = nn.Sequential(nn.Conv2d(channels, last, 1, bias=False), _bn(last), nn.ReLU())
    self.classifier = nn.Sequential(nn.Linear(last, num_classes))

  def forward(self, x):
    x = self.conv1(x)
    features = {}
    stage_after = {1: 1, 2: 2, 4: 3, 6: 4}
    for g, group in enumerate(self.blocks):
      x = group(x)
      if g in stage_after:
        features[f'stage{stage_after[g]}'] = features[f'stage{stage_after[g]}_preact'] = x
    x = self.conv2(x)
    # AvgPool2d(input_size // 16, ceil_mode=True) there: global for 32x32 input.
    embedding = F.avg_pool2d(x, x.shape[2], ceil_mode=True).flatten(1)
    features['embedding'] = embedding
    return self.classifier(embedding), features


# ----------------------------------------------------------------- ShuffleNetv1.py


class ShuffleV1Block(nn.Module):

  def __init__(self, in_planes, out_planes, stride, groups):
    super().__init__()
    self.stride = stride
    mid = out_planes // 4
    self.first_groups = 1 if in_planes == 24 else groups
    self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
    self.bn1 = _bn(mid)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
    self.bn2 = _bn(mid)
    self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
    self.bn3 = _bn(out_planes)

  def forward(self, x):
    out = _channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.stride == 2:  # AvgPool2d(3, 2, padding=1): zero padding counted
      preact = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
    else:
      preact = out + x
    return F.relu(preact), preact


class ShuffleNetV1(nn.Module):

  def __init__(self, num_classes, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = _bn(24)
    in_planes = 24
    for s, (planes, blocks) in enumerate(zip(out_planes, num_blocks), start=1):
      stage = []
      for i in range(blocks):
        added = planes - in_planes if i == 0 else planes  # the first block concatenates
        stage.append(ShuffleV1Block(in_planes, added, 2 if i == 0 else 1, groups))
        in_planes = planes
      setattr(self, f'layer{s}', nn.ModuleList(stage))
    self.linear = nn.Linear(out_planes[-1], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    features = {}
    for s in (1, 2, 3):
      for block in getattr(self, f'layer{s}'):
        x, preact = block(x)
      features[f'stage{s}'], features[f'stage{s}_preact'] = x, preact
    embedding = F.avg_pool2d(x, 4).flatten(1)
    features['embedding'] = embedding
    return self.linear(embedding), features


# ----------------------------------------------------------------- ShuffleNetv2.py


class ShuffleV2Block(nn.Module):

  def __init__(self, channels):
    super().__init__()
    half = channels // 2
    self.conv1 = nn.Conv2d(half, half, 1, bias=False)
    self.bn1 = _bn(half)
    self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
    self.bn2 = _bn(half)
    self.conv3 = nn.Conv2d(half, half, 1, bias=False)
    self.bn3 = _bn(half)

  def forward(self, x):
    half = x.shape[1] // 2
    kept, transformed = x[:, :half], x[:, half:]
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(transformed)))))
    out = self.bn3(self.conv3(out))
    preact = torch.cat([kept, out], 1)  # before the shuffle, as RepDistiller returns it
    return _channel_shuffle(torch.cat([kept, F.relu(out)], 1), 2), preact


class ShuffleV2Down(nn.Module):

  def __init__(self, in_channels, out_channels):
    super().__init__()
    mid = out_channels // 2
    self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
    self.bn1 = _bn(in_channels)
    self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn2 = _bn(mid)
    self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn3 = _bn(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
    self.bn4 = _bn(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = _bn(mid)

  def forward(self, x):
    left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
    right = F.relu(self.bn3(self.conv3(x)))
    right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
    return _channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):

  def __init__(self, num_classes, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
    self.bn1 = _bn(24)
    in_channels = 24
    for s, (channels, blocks) in enumerate(zip(out_channels, num_blocks), start=1):
      stage = [ShuffleV2Down(in_channels, channels)]
      stage += [ShuffleV2Block(channels) for _ in range(blocks)]
      setattr(self, f'layer{s}', nn.ModuleList(stage))
      in_channels = channels
    self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
    self.bn2 = _bn(out_channels[3])
    self.linear = nn.Linear(out_channels[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    features = {}
    for s in (1, 2, 3):
      down, *blocks = getattr(self, f'layer{s}')
      x = down(x)
      for block in blocks:
        x, preact = block(x)
      features[f'stage{s}'], features[f'stage{s}_preact'] = x, preact
    x = F.relu(self.bn2(self.conv2(x)))
    embedding = F.avg_pool2d(x, 4).flatten(1)
    features['embedding'] = embedding
    return self.linear(embedding), features


# ----------------------------------------------------------------- registry names

_RESNET_DEPTHS = {
    'resnet8': 8,
    'resnet14': 14,
    'resnet20': 20,
    'resnet32': 32,
    'resnet44': 44,
    'resnet56': 56,
    'resnet110': 110,
}
_WRN = {'wrn_16_1': (16, 1), 'wrn_16_2': (16, 2), 'wrn_40_1': (40, 1), 'wrn_40_2': (40, 2)}

NAMES = (
    sorted(_RESNET_DEPTHS)
    + ['resnet8x4', 'resnet32x4', 'resnet50_cifar']
    + sorted(_WRN)
    + sorted(VGG_CFG)
    + ['mobilenetv2', 'shufflenetv1', 'shufflenetv2']
)


def build(name, num_classes):
  """The PyTorch model ffkd_jax registers as `name`."""
  if name in _RESNET_DEPTHS:
    n = (_RESNET_DEPTHS[name] - 2) // 6
    return ResNet(16, (16, 32, 64), (n,) * 3, False, 'downsample', 'fc', num_classes)
  if name in ('resnet8x4', 'resnet32x4'):
    n = (int(name[len('resnet') : -len('x4')]) - 2) // 6
    return ResNet(32, (64, 128, 256), (n,) * 3, False, 'downsample', 'fc', num_classes)
  if name == 'resnet50_cifar':
    return ResNet(64, (64, 128, 256, 512), (3, 4, 6, 3), True, 'shortcut', 'linear', num_classes)
  if name in _WRN:
    return WideResNet(*_WRN[name], num_classes)
  if name in VGG_CFG:
    return VGG(VGG_CFG[name], num_classes)
  if name == 'mobilenetv2':
    return MobileNetV2(num_classes)
  if name == 'shufflenetv1':
    return ShuffleNetV1(num_classes)
  if name == 'shufflenetv2':
    return ShuffleNetV2(num_classes)
  raise ValueError(f'no PyTorch test model {name!r}; have {NAMES}')
