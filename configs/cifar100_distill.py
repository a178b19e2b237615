"""CIFAR-100 distillation with any method on the standard teacher-student pairs.

The argument is `method` or `method,teacher,student` (default pair resnet32x4 -> resnet8x4):

  python -m ffkd_jax.main --config configs/cifar100_distill.py:ffkd,wrn_40_2,wrn_16_2 \
      --workdir DIR --config.teacher.checkpoint=TEACHER_WORKDIR

Standard pairs (same and cross architecture): resnet32x4->resnet8x4, wrn_40_2->wrn_16_2,
wrn_40_2->wrn_40_1, resnet56->resnet20, resnet110->resnet32, vgg13->vgg8,
vgg13->mobilenetv2, resnet32x4->shufflenetv1, resnet32x4->shufflenetv2.
The student's learning rate follows the teacher protocol (0.01 for MobileNetV2 and ShuffleNets).

Methods: see `ffkd_jax.methods.available_methods()` (ffkd and its presets, kd, dkd, dist, rkd,
cc, fitnet, at, sp, ickd, iekd, cd, ccs, reviewkd, crd, dml, kdcl, iedml, sokd). The online
methods (dml, kdcl, iedml) train the pair from scratch as peers: peer0 = the student (reported as
eval/top1), peer1 = the teacher's architecture; they need no teacher checkpoint. sokd needs a
CIFAR ResNet or WRN teacher (its branch is the teacher's last stage), not vgg13.
"""

from configs import default
from configs.cifar100_teacher import cifar100_protocol

STANDARD_PAIRS = (
    ('resnet32x4', 'resnet8x4'),
    ('wrn_40_2', 'wrn_16_2'),
    ('wrn_40_2', 'wrn_40_1'),
    ('resnet56', 'resnet20'),
    ('resnet110', 'resnet32'),
    ('vgg13', 'vgg8'),
    ('vgg13', 'mobilenetv2'),
    ('resnet32x4', 'shufflenetv1'),
    ('resnet32x4', 'shufflenetv2'),
)


def get_config(arg: str = 'ffkd'):
  parts = arg.split(',')
  if len(parts) not in (1, 3):
    raise ValueError(
        f"configs/cifar100_distill.py: argument '{arg}' must be 'method' or "
        "'method,teacher,student'."
    )
  method, teacher, student = parts if len(parts) == 3 else (parts[0], 'resnet32x4', 'resnet8x4')
  config = default.get_config()
  config.method = method
  config.model = student
  config.teacher.model = teacher
  config.dml.models = config.kdcl.models = config.iedml.models = f'{student},{teacher}'
  return cifar100_protocol(config, student)
