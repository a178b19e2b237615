"""Command line: python -m ffkd_jax.main --config configs/<name>.py --workdir DIR [--config.x=y]."""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and pictures.')
config_flags.DEFINE_config_file(
    'config',
    None,
    'A config file (configs/*.py); override any ' 'field with --config.<field>=<value>.',
    lock_config=True,
)
flags.DEFINE_bool(
    'multihost',
    False,
    'Call jax.distributed.initialize() before anything else '
    '(also done when JAX_COORDINATOR_ADDRESS is set).',
)
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, plus a one-line error (no traceback) for an unknown --config field.

  ml_collections raises AttributeError for `--config.<name>` naming no field, with its own
  "Did you mean" hint; absl would show that as a traceback.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as error:
    cause = error.args[0] if error.args else error  # ml_collections wraps its KeyError
    detail = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
    name, _, hint = detail.partition('\n')
    name = name.strip('\'"')
    given = [
        arg.split('=', 1)[0]
        for arg in argv[1:]
        if arg.startswith('--config.') and arg.split('=', 1)[0].endswith('.' + name)
    ]
    flag = given[0] if given else f'--config.<...>.{name}'
    message = ' '.join(filter(None, [f'{flag}: the config has no field {name!r}.', hint.strip()]))
    sys.stderr.write(
        f'FATAL Flags parsing error: {message}\n' 'Pass --helpfull to see the config fields.\n'
    )
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ffkd_jax.models import conv  # pylint: disable=g-import-not-at-top

  if FLAGS.config.get('conv_impl') in conv.IMPLEMENTATIONS:  # before JAX starts its backends
    conv.prepare_backend(FLAGS.config.conv_impl)
  from ffkd_jax import distributed  # pylint: disable=g-import-not-at-top

  distributed.maybe_initialize(FLAGS.multihost)
  from ffkd_jax import train  # pylint: disable=g-import-not-at-top

  show_traceback = FLAGS.verbosity >= 1  # read before the line below sets it to INFO (0)
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save at INFO; keep its warnings and errors only.
  logging.get_absl_handler().python_handler.addFilter(
      lambda record: record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
  )
  from ffkd_jax import config_checks  # pylint: disable=g-import-not-at-top

  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_checks.ConfigError as error:
    if show_traceback:  # --verbosity=1 or more: the traceback too
      raise
    message = ' '.join(str(error).split())
    sys.stderr.write(f'FATAL Config error: {message}\n(--verbosity=1 shows the traceback.)\n')
    sys.exit(1)


if __name__ == '__main__':
  from ffkd_jax import host_memory  # pylint: disable=g-import-not-at-top

  host_memory.restart_with_allocator()  # once, before any work (see ffkd_jax/host_memory.py)
  app.run(main, flags_parser=parse_flags)
