"""Optimizers and learning-rate schedules built from `config.optimizer`."""

import ml_collections
import optax


def learning_rate_schedule(
    opt_config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    total_steps: int,
    scale: float = 1.0,
) -> optax.Schedule:
  """'steps' (x decay_factor at each of decay_epochs), 'cosine' or 'constant', with linear warm-up."""
  base = opt_config.learning_rate * scale
  warmup_steps = int(round(opt_config.warmup_epochs * steps_per_epoch))
  if opt_config.schedule == 'steps':
    boundaries = {
        int(e * steps_per_epoch) - warmup_steps: opt_config.decay_factor
        for e in opt_config.decay_epochs
    }
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif opt_config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, max(1, total_steps - warmup_steps))
  elif opt_config.schedule == 'constant':
    main = optax.constant_schedule(base)
  else:
    raise ValueError(
        f"config.optimizer.schedule='{opt_config.schedule}' is not one of "
        "'steps', 'cosine', 'constant'."
    )
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(base / max(1, warmup_steps), base, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(
    opt_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay (PyTorch style, decay added to the gradient), or AdamW."""
  if opt_config.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay),
        optax.sgd(schedule, momentum=opt_config.momentum or None, nesterov=opt_config.nesterov),
    )
  if opt_config.name == 'adamw':
    return optax.adamw(schedule, weight_decay=opt_config.weight_decay)
  raise ValueError(f"config.optimizer.name='{opt_config.name}' is not one of 'sgd', 'adamw'.")
