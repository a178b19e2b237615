"""Optimizers and learning-rate schedules built from `config.optimizer`."""

import jax
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


def make_optimizer(opt_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The update direction at a learning rate of 1; the train step multiplies it by
  -schedule(global step), so that a role's rate at step s is its schedule at s even when the
  role starts late, and the logged rate is the one applied.

  'sgd': momentum SGD with L2 weight decay added to the gradient (PyTorch's SGD: v = mu v +
  g + wd p, p -= lr v); 'adamw': Adam with decoupled weight decay (optax.adamw's order: Adam's
  direction plus wd p, times the rate).
  """
  if opt_config.name == 'sgd':
    parts = [optax.add_decayed_weights(opt_config.weight_decay)]
    if opt_config.momentum:
      parts.append(optax.trace(decay=opt_config.momentum, nesterov=opt_config.nesterov))
    return optax.chain(*parts)
  if opt_config.name == 'adamw':
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(opt_config.weight_decay))
  raise ValueError(f"config.optimizer.name='{opt_config.name}' is not one of 'sgd', 'adamw'.")


def scaled_updates(direction, learning_rate):
  """The parameter update of a direction at `learning_rate`: -learning_rate * direction."""
  return jax.tree.map(lambda d: (-learning_rate * d).astype(d.dtype), direction)
