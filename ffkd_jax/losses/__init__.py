"""Pure distillation losses, one method a file: functions of arrays, no state, no configs.

Losses that are statistics over the batch (DIST's intra-class term, RKD, CC, SP, the CKA
weights) take the global batch: the caller gathers over the data axis first.
"""
