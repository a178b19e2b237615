"""Cross-entropy training of one model: teacher training, and the students' CE baseline."""

from ffkd_jax.losses.classification import cross_entropy
from ffkd_jax.methods.base import Method, Role


class CrossEntropy(Method):
  name = 'ce'
  primary_role = 'model'

  def __init__(self, config):
    self.model = config.model

  def roles(self):
    return (Role('model', self.model),)

  def loss(self, outputs, labels, step):
    del step
    ce = cross_entropy(outputs['model'].logits, labels)
    return {'model': ce}, {'loss/ce': ce}
