"""The teacher pre-training chain: a CE run of the teacher first, when a method needs one.

A method with a pre-trained role and no `config.teacher.checkpoint` trains the teacher with CE
into WORKDIR/teacher (`config.teacher.pretrain_epochs` or `pretrain_steps`, the same data and
optimizer), then distils from it: the whole chain in one command, resumable like any run.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections
from absl import logging

from ffkd_jax import methods


class TeacherPreempted(Exception):
  """The teacher's run stopped on a signal (it saved); args[0] is the step it saved."""


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.method` reads a pre-trained role."""
  return any(role.pretrained for role in methods.method_roles(config))


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CE run that pre-trains config.teacher.model for the chain (same data and optimizer)."""
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.method = 'ce'
  teacher.model = config.teacher.model
  teacher.num_train_steps = config.teacher.pretrain_steps
  teacher.num_epochs = config.teacher.pretrain_epochs
  return teacher


def check_teacher_source(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when the method needs a teacher and none is given or asked for."""
  if not needs_teacher(config) or config.teacher.checkpoint:
    return
  if config.teacher.pretrain_steps <= 0 and config.teacher.pretrain_epochs <= 0:
    raise ValueError(
        f"config.teacher.checkpoint='' is not valid for config.method='{config.method}', which "
        'distils from a pre-trained teacher: give the workdir of a teacher run (e.g. one of '
        '`python -m ffkd_jax.main --config configs/cifar100_teacher.py:resnet32x4`), a '
        'converted PyTorch teacher (python -m ffkd_jax.import_torch), or set '
        'config.teacher.pretrain_steps > 0 to train one first.'
    )


def with_pretrained_teacher(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_and_evaluate: Callable[[ml_collections.ConfigDict, str], dict[str, Any]],
) -> ml_collections.ConfigDict:
  """`config` with a teacher checkpoint: as given, or trained first into WORKDIR/teacher.

  Raises ValueError when the method needs a teacher and none is given or asked for, and
  TeacherPreempted when the teacher's run was stopped by a signal.
  """
  if not needs_teacher(config) or config.teacher.checkpoint:
    return config
  check_teacher_source(config)
  teacher_workdir = os.path.join(workdir, 'teacher')
  logging.info('Pre-training the teacher %s into %s.', config.teacher.model, teacher_workdir)
  result = train_and_evaluate(teacher_config(config), teacher_workdir)
  if 'preempted_at' in result:
    raise TeacherPreempted(result['preempted_at'])
  config = ml_collections.ConfigDict(config.to_dict())
  config.teacher.checkpoint = teacher_workdir
  return config
