"""Default configuration: every field ffkd_jax reads, with its default (the config schema).

A config is data: this module imports ml_collections only (no TensorFlow, no JAX), so
`config_checks` can compare any config with it whether or not `configs/` is importable.
`configs/default.py` is this `get_config`; other configs import it and override a few fields. Any field can be changed from the
command line: `--config.batch_size=32 --config.ffkd.gamma_fdbk=0.5`.
"""

import ml_collections

from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # What is trained. 'ce' trains `model` alone with cross-entropy (teacher training and the
  # CE baseline); every other method distils `teacher` into `model` (see ffkd_jax/methods).
  config.method = 'ce'
  config.model = 'resnet8x4'
  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = 'resnet32x4'
  # A workdir of an earlier run (its best checkpoint is used, else its latest), or a checkpoint
  # step directory. Required by methods that distil from a pre-trained teacher.
  config.teacher.checkpoint = ''
  # Which role of that run to take ('' = 'model' of a CE run, else 'teacher').
  config.teacher.role = ''
  # With no checkpoint given, train the teacher first with CE for this many epochs (or steps)
  # into WORKDIR/teacher, then distil from it: the whole chain in one command. 0 = off.
  config.teacher.pretrain_epochs = 0.0
  config.teacher.pretrain_steps = -1

  config.dataset = dataset_config()

  # Global batch (all devices of all processes); must be divisible by the device count.
  config.batch_size = 64
  config.eval_batch_size = 256
  # Diagnostics (CKA per layer pair, the layer CKA matrix) at each evaluation are computed on a
  # fixed, seeded, class-mixed subset of the validation split of this many images (fewer where
  # the split is smaller; rounded down to a multiple of the device count).
  config.diagnostics_examples = 1024
  config.num_epochs = 240.0
  # > 0 overrides num_epochs with an exact number of steps.
  config.num_train_steps = -1

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' or 'adamw'
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'steps'  # 'steps', 'cosine' or 'constant'
  config.optimizer.decay_epochs = (150, 180, 210)
  config.optimizer.decay_factor = 0.1
  config.optimizer.warmup_epochs = 0.0

  # Logit standardisation (Sun et al., CVPR 2024): every logit-distillation term (the KL of kd,
  # dkd, cc, ickd, ccs, ffkd and its presets, cd's guided KD, dist, dml and iedml's mutual KL,
  # kdcl's KL to the mean of the peers' z-scored logits)
  # compares z-scored logits, (z - mean) / (1e-7 + std) over classes; CE stays on the raw
  # logits. No weight changes with it: that paper's CIFAR runs also set the temperature to 2
  # and the KD weight to 9 (ffkd_jax/methods/base.py, Method.distillation_logits).
  config.logit_standardization = False

  # Distillation recipes; only the block of the selected method is read.
  config.kd = ml_collections.ConfigDict(dict(temperature=4.0, ce_weight=0.1, kd_weight=0.9))
  # DKD (ffkd_jax/methods/dkd.py): mdistiller's CFG.DKD; its 20 warm-up epochs as a per-step
  # ramp of 20 x 782 steps (CIFAR-100 at batch 64).
  config.dkd = ml_collections.ConfigDict(
      dict(ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_steps=15640)
  )
  config.dist = ml_collections.ConfigDict(
      dict(temperature=4.0, beta=1.0, gamma=1.0, ce_weight=1.0, kd_weight=2.0)
  )
  config.rkd = ml_collections.ConfigDict(
      dict(ce_weight=1.0, distance_weight=25.0, angle_weight=50.0)
  )
  config.ffkd = ffkd_config()
  # The FFKD paper's comparison methods; defaults and their sources in ffkd_jax/methods/<name>.py.
  # layer_pairs / layer_pair: 'auto' or teacher:student feature names, e.g. 'stage3:stage3'.
  config.cc = ml_collections.ConfigDict(
      dict(ce_weight=1.0, kd_weight=0.0, temperature=4.0, cc_weight=100.0, gamma=0.4, order=2)
  )
  config.sp = ml_collections.ConfigDict(dict(ce_weight=1.0, sp_weight=3000.0, layer_pairs='auto'))
  config.ickd = ml_collections.ConfigDict(
      dict(ce_weight=1.0, kd_weight=1.0, temperature=4.0, ickd_weight=2.5, layer_pairs='auto')
  )
  config.fitnet = ml_collections.ConfigDict(
      dict(ce_weight=1.0, hint_weight=100.0, layer_pair='auto')
  )
  config.at = ml_collections.ConfigDict(
      dict(ce_weight=1.0, at_weight=1000.0, p=2.0, layer_pairs='auto')
  )
  config.iekd = iekd_config()
  config.cd = cd_config()
  # CCS (ffkd_jax/methods/ccs.py): wp502/SKD-RSL train_student.py's argument defaults (its alpha,
  # beta, gamma: the CE, KD and CCS weights; kd_T 4); every stage after the stem, deepest aligned.
  config.ccs = ml_collections.ConfigDict(
      dict(ce_weight=1.0, kd_weight=1.0, ccs_weight=1.0, temperature=4.0, layer_pairs='auto')
  )
  # CRD (ffkd_jax/methods/crd.py): RepDistiller's CIFAR-100 run (`-a 0 -b 0.8`, -r 1) and its
  # train_student.py defaults: embeddings of feat_dim, nce_k negatives per example, NCE temperature
  # nce_t, memory momentum nce_m; kd_weight 1 is its CRD+KD row. scores: how the memory scores
  # are computed ('auto', 'dense', 'gather': the same numbers, ffkd_jax/losses/crd.py).
  config.crd = ml_collections.ConfigDict(
      dict(
          ce_weight=1.0,
          kd_weight=0.0,
          crd_weight=0.8,
          temperature=4.0,
          feat_dim=128,
          nce_k=16384,
          nce_t=0.07,
          nce_m=0.5,
          scores='auto',
      )
  )
  config.reviewkd = reviewkd_config()
  # Online methods: peers trained together from scratch. `models`: comma-separated model names
  # ('' = two copies of config.model).
  # DML's update: 'synchronous' (one forward pass) or 'alternating' (one peer after the other,
  # the others read in inference mode; ffkd_jax/methods/dml.py).
  config.dml = ml_collections.ConfigDict(
      dict(models='', temperature=1.0, kl_weight=1.0, peer_updates='synchronous')
  )
  # KDCL (ffkd_jax/methods/kdcl.py): peers taught by their mean-logit ensemble (wp502/SKD-RSL).
  config.kdcl = ml_collections.ConfigDict(dict(models='', alpha=1.0, gamma=1.0, temperature=4.0))

  config.iedml = iedml_config()
  config.sokd = sokd_config()

  # Mixed precision: 'float32' or 'bfloat16' (activations; parameters stay float32).
  config.dtype = 'float32'
  # How the models' convolutions run (ffkd_jax/models/conv.py): 'auto' (XLA's; on the CPU on its
  # Eigen kernels instead of YNNPACK's, with optimization barriers in the backward pass: two XLA
  # flags), 'xla' (XLA's defaults) or 'matmul' (a tap-matmul weight gradient).
  config.conv_impl = 'auto'
  # What to do when a loss or gradient is not finite: 'skip' the update (and count it), or 'stop'.
  config.nonfinite_policy = 'skip'

  config.log_every_steps = 50
  # Evaluate this often (in steps); <= 0 means once per epoch.
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  return config


def ffkd_config() -> ml_collections.ConfigDict:
  """FFKD as wp502/SKD-RSL zoo/Our_1.py does it (ffkd_jax/methods/ffkd.py); the preset picks the
  terms. Which defaults are the code's and which the sweep's: docs/FFKD.md."""
  c = ml_collections.ConfigDict()
  # Teacher:student stage pairs; 'auto' pairs every stage after the stem, deepest aligned.
  c.layer_pairs = 'auto'
  c.temperature = 4.0  # T of the logit KL and of the channel distributions (the code's kd_T)
  c.alpha = 1.0  # CE weight of both networks
  c.beta_fwd = 1.0  # the student's logit KL
  c.gamma_fwd = 1.0  # the student's channel loss
  # The teacher's logit KL from the student (feedback); 0.1 by the sweep of docs/FFKD.md (at 1
  # the untrained student's near-uniform outputs pull the teacher down in its first steps).
  c.beta_fdbk = 0.1
  c.gamma_fdbk = 1.0  # the teacher's channel loss (feedback)
  # The code's is_100cka: CKA_k x 100 in the forward weights (on: the sweep of docs/FFKD.md).
  c.cka_x100 = True
  c.unbiased_hsic = False  # the code's CKA is the biased (plain) linear CKA
  c.feedback_start_step = 0  # the teacher trains from this global step (the code's feedback_time)
  c.teacher_lr_scale = 0.05  # the teacher's learning rate / the student's (5e-3 / 0.1)
  # The feedback phase's batch: 'independent' (a second train stream, as the code) or 'same'.
  c.feedback_batch = 'independent'
  return c


def iekd_config() -> ml_collections.ConfigDict:
  """IE-KD (ffkd_jax/methods/iekd.py): the official code's CIFAR settings."""
  c = ml_collections.ConfigDict()
  c.ce_weight = 1.0
  c.inh_weight = 1.0  # inheritance: pull the student's first channel half toward the code
  c.exp_weight = 1.0  # exploration: push the second half away from it
  # The teacher's auto-encoder trains alone for this many steps (30 CIFAR-100 epochs at batch
  # 64) before the student's whole schedule; then it stays fixed. The run is this much longer.
  c.ae_steps = 23460
  c.code_channels = -1  # <= 0: half the teacher feature's channels
  c.teacher_feature = ''  # '' = the last stage output
  c.student_feature = ''
  return c


def cd_config() -> ml_collections.ConfigDict:
  """CD (ffkd_jax/methods/cd.py): wp502/SKD-RSL train_student.py's argument defaults."""
  c = ml_collections.ConfigDict()
  c.layer_pairs = 'auto'  # 'auto': every stage after the stem, deepest aligned
  c.temperature = 4.0  # the code's kd_T
  c.ce_weight = 1.0  # the code's alpha
  c.kd_weight = 1.0  # the code's beta: guided KD (the teacher's correct examples only)
  c.cd_weight = 1.0  # the code's gamma: the channel-mean distance of every stage pair
  c.edt = False  # the code's cd_is_edt: early decay of cd_weight
  c.edt_factor = 0.9  # the code's cd_loss_factor
  # cd_weight x edt_factor^(boundaries passed); the code's CIFAR epochs 60 and 160 at 782 steps.
  c.edt_boundary_steps = (46920, 125120)
  return c


def reviewkd_config() -> ml_collections.ConfigDict:
  """ReviewKD (ffkd_jax/methods/reviewkd.py): mdistiller's CFG.REVIEWKD and its CIFAR-100
  configs/cifar100/reviewkd.yaml."""
  c = ml_collections.ConfigDict()
  c.layer_pairs = 'auto'  # 'auto': every stage after the stem, deepest aligned; then the embedding
  c.ce_weight = 1.0  # CFG.REVIEWKD.CE_WEIGHT
  c.reviewkd_weight = 5.0  # reviewkd.yaml's REVIEWKD_WEIGHT (cfg.py's default: 1.0)
  # CFG.REVIEWKD.WARMUP_EPOCHS 20 as a per-step ramp of 20 x 782 steps (CIFAR-100 at batch 64).
  c.warmup_steps = 15640
  c.student_preact = False  # CFG.REVIEWKD.STU_PREACT: the student's post-activation stage maps
  c.max_mid_channels = 512  # the ABFs' width: min(512, the student's embedding width)
  return c


def sokd_config() -> ml_collections.ConfigDict:
  """SOKD (ffkd_jax/methods/sokd.py): swlzq/Semi-Online-KD configs/sokd.yaml and trainer/sokd.py."""
  c = ml_collections.ConfigDict()
  c.temperature = 4.0  # SoftTarget(T=4)
  c.ce_weight = 1.0  # lambda_ce: the student's CE
  c.kd_weight = 1.0  # lambda_kd: the student's KL from the branch
  c.branch_ce_weight = 1.0  # auxiliary_lambda_ce: the branch's CE
  c.branch_kd_teacher_weight = 1.0  # auxiliary_lambda_kd_t: the branch's KL from the teacher
  c.branch_kd_student_weight = 1.0  # auxiliary_lambda_kd_s: the branch's KL from the student
  c.branch_lr_scale = 1.0  # the branch's learning rate / the student's (lr_auxiliary 0.1 / lr 0.1)
  # 'random': a fresh branch, as the authors' code starts it; 'teacher': a copy of the loaded
  # teacher's last stage and classifier (wp502/SKD-RSL, the variant FFKD's paper compared).
  c.branch_init = 'random'
  return c


def iedml_config() -> ml_collections.ConfigDict:
  """IE-DML (ffkd_jax/methods/iedml.py): this project's symmetric extension of IE-KD to DML."""
  c = ml_collections.ConfigDict()
  c.models = ''  # two model names, comma-separated; '' = two copies of config.model
  c.temperature = 1.0
  c.kl_weight = 1.0
  c.rec_weight = 1.0
  c.inh_weight = 1.0
  c.exp_weight = 1.0
  c.ae_steps = 23460  # inheritance and exploration start here (the auto-encoders train always)
  c.code_channels = -1  # <= 0: half the smaller peer's last-stage channels
  return c


def dataset_config() -> ml_collections.ConfigDict:
  """config.dataset; ffkd_jax/data/__init__.py describes every field."""
  return ml_collections.ConfigDict(
      dict(
          name='cifar100',
          path=config_dict.placeholder(str),
          data_dir=config_dict.placeholder(str),
          manual_dir=config_dict.placeholder(str),
          download=True,
          val_fraction=0.0,
          image_size=0,
          augment='cifar',
          mean=config_dict.placeholder(tuple),
          std=config_dict.placeholder(tuple),
          on_bad_image='error',
          cache=True,
          # The most GiB the decoded images may take for `cache` to hold (ffkd_jax/data).
          cache_budget_gib=4.0,
          shuffle_buffer=50_000,
          prefetch=2,
      )
  )
