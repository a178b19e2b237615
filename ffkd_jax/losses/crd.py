"""CRD: Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020.

Pure functions of the contrastive objective and its momentum memory, as HobbitLong/RepDistiller
computes them (crd/criterion.py: CRDLoss, ContrastLoss, Embed/Normalize; crd/memory.py:
ContrastMemory; dataset/cifar100.py: CIFAR100InstanceSample, mode 'exact'):

  v_S = l2(W_S f_S + b_S), v_T = l2(W_T f_T + b_T)          (Embed: linear, then x / ||x||_2)
  s_T[i, j] = exp(M_S[idx_ij] . v_T,i / tau) / Z_T           (M_S: memory of student embeddings)
  s_S[i, j] = exp(M_T[idx_ij] . v_S,i / tau) / Z_S           (M_T: memory of teacher embeddings)
  idx_i0 = the example's own index, idx_i1..K = negatives from other classes
  L(s) = -(1/b) sum_i [ log(s_i0 / (s_i0 + K/N + eps))
                        + sum_{j>=1} log((K/N) / (s_ij + K/N + eps)) ]   (ContrastLoss, eps 1e-7)
  L_CRD = L(s_S) + L(s_T)
  Z = mean(exp scores of the first batch) x N, fixed from then on (ContrastMemory's params[2:4])
  M[idx_i0] <- l2(m M[idx_i0] + (1 - m) v_i) after the scores (momentum m = 0.5)

N is the number of train examples (the memory's rows), K the negatives per example, tau 0.07.
The memories are read detached: the gradient reaches v_S through s_S and v_T through s_T only.

Departures from that code, and why:
  - Negatives are drawn uniformly from the other classes' examples *with* replacement
    (`sample_negatives`); CIFAR100InstanceSample draws them without replacement
    (`np.random.choice(cls_negative[target], k, replace=False)` while k fits). Both are
    uniform over the other classes with the same expectation of every term; drawing without
    replacement on the device would need a permutation of N per example. At K = 16384 of
    N = 49,500 negatives about 15% of the draws repeat an earlier one.
  - `contrast_scores` computes all N dot products per example and picks the sampled ones
    ('dense') where that is cheaper than gathering b x (K + 1) memory rows ('gather', the code's
    index_select + bmm); both give the same numbers up to float summation order (in full
    float32 precision on every platform).
  - The memory is updated for the examples of the full batches only: the train stream drops an
    epoch's remainder (16 CIFAR-100 examples at batch 64), which the code's last, short batch
    updates.
  - `l2_normalize` has no epsilon, as Normalize(2): an all-zero embedding gives NaN, and the
    step is then skipped (config.nonfinite_policy), never written into the memory.
These helpers are the CRD objective's pieces: the scores and the loss (scalars), and the memory
(`momentum_update`) and negatives (`class_table`, `sample_negatives`) that feed them, pure
functions all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-7  # crd/criterion.py's eps
SCORE_IMPLS = ('auto', 'dense', 'gather')


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x||_2 over the last axis (Normalize(2) of crd/criterion.py; no epsilon, as there)."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def contrast_scores(
    memory: jax.Array,
    embeddings: jax.Array,
    sample_idx: jax.Array,
    temperature: float,
    impl: str = 'auto',
) -> jax.Array:
  """exp(memory[sample_idx[i, j]] . embeddings[i] / temperature), unnormalised, (b, K + 1).

  Args:
    memory: (N, d) the other side's memory (read stop-gradient).
    embeddings: (b, d) this side's normalised embeddings.
    sample_idx: (b, K + 1) int rows of memory: column 0 the positive, the rest negatives.
    temperature: tau > 0.
    impl: 'dense' (embeddings @ memory^T, then the sampled columns: b N d multiply-adds, no
      b (K + 1) d gather), 'gather' (the sampled rows, then the dot products: the reference's
      bmm) or 'auto' (dense where N <= 16 (K + 1)).
  """
  if impl not in SCORE_IMPLS:
    raise ValueError(f'impl={impl!r} is not valid: use one of {SCORE_IMPLS}.')
  memory = jax.lax.stop_gradient(memory)
  n, k1 = memory.shape[0], sample_idx.shape[1]
  if impl == 'auto':
    impl = 'dense' if n <= 16 * k1 else 'gather'
  dtype = jnp.promote_types(embeddings.dtype, jnp.float32)
  embeddings, memory = embeddings.astype(dtype), memory.astype(dtype)
  # Full float32 dot products: the scores are divided by tau = 0.07, which would magnify the
  # error of a one-pass bfloat16 (TPU) or TF32 (GPU) matmul about 14 times.
  highest = jax.lax.Precision.HIGHEST
  if impl == 'dense':
    all_scores = jnp.matmul(embeddings, memory.T, precision=highest)  # (b, N)
    dots = jnp.take_along_axis(all_scores, sample_idx, axis=1)
  else:
    dots = jnp.einsum('bkd,bd->bk', memory[sample_idx], embeddings, precision=highest)
  return jnp.exp(dots / temperature)


def normalization_constant(scores: jax.Array, num_data: int) -> jax.Array:
  """Z = mean(scores) x N: ContrastMemory's constant, set from the first batch's scores."""
  return jnp.mean(jax.lax.stop_gradient(scores)) * num_data


def contrast_loss(probs: jax.Array, num_data: int) -> jax.Array:
  """ContrastLoss of crd/criterion.py on (b, K + 1) normalised scores (column 0 the positive):
  the NCE loss against the uniform noise 1/N, summed over the K + 1 columns, mean over b."""
  b, k1 = probs.shape
  m = k1 - 1
  noise = m / float(num_data)  # m Pn
  positive = probs[:, 0]
  negatives = probs[:, 1:]
  log_d1 = jnp.log(positive / (positive + noise + EPS))
  log_d0 = jnp.log(noise / (negatives + noise + EPS))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / b


def momentum_update(
    memory: jax.Array, index: jax.Array, embeddings: jax.Array, momentum: float
) -> jax.Array:
  """memory[index] <- l2(momentum memory[index] + (1 - momentum) embeddings), the other rows
  kept (ContrastMemory's update; `index` holds distinct rows, as a batch of one epoch does)."""
  embeddings = jax.lax.stop_gradient(embeddings).astype(memory.dtype)
  rows = memory[index] * momentum + embeddings * (1.0 - momentum)
  return memory.at[index].set(l2_normalize(rows))


def class_table(train_labels) -> dict[str, jax.Array]:
  """The train split grouped by class, for `sample_negatives`: `by_class` (N,) the example
  indices ordered by label (stable), `class_start` and `class_count` (C,) each class's run."""
  labels = jnp.asarray(train_labels, jnp.int32)
  num_classes = int(jnp.max(labels)) + 1 if labels.size else 0
  by_class = jnp.argsort(labels, stable=True).astype(jnp.int32)
  count = jnp.bincount(labels, length=num_classes).astype(jnp.int32)
  start = (jnp.cumsum(count) - count).astype(jnp.int32)
  return {'by_class': by_class, 'class_start': start, 'class_count': count}


def sample_negatives(key: jax.Array, labels: jax.Array, table, num_negatives: int) -> jax.Array:
  """(b, K) int32 train indices, each uniform over the examples of the other classes than the
  row's label, independently (with replacement): CIFAR100InstanceSample's 'exact' mode negatives.

  An integer draw u, uniform in [0, N - count[c]), skips class c's run of `by_class`: u itself
  before it, u + count[c] after it. (Integers, not a scaled float: a float32 uniform has 2^23
  levels, which would favour some of ImageNet's 1.28M examples over others.)
  """
  by_class, start, count = table['by_class'], table['class_start'], table['class_count']
  n = by_class.shape[0]
  start_c, count_c = start[labels][:, None], count[labels][:, None]  # (b, 1)
  shape = (labels.shape[0], num_negatives)
  draw = jax.random.randint(key, shape, 0, jnp.broadcast_to(n - count_c, shape), jnp.int32)
  position = jnp.where(draw < start_c, draw, draw + count_c)
  return by_class[position]
