"""Cross-entropy training of one model: teacher training, and the students' CE baseline."""

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import Method, Role


class CrossEntropy(Method):
  name = 'ce'
  primary_role = 'model'

  @classmethod
  def make_roles(cls, config):
    return (Role('model', config.model),)

  def loss(self, outputs, labels, step):
    del step
    ce = cross_entropy(outputs['model'].logits, labels)
    return {'model': ce}, {'loss/ce': ce}
