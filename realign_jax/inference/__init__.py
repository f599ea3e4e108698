"""Inference: every decoder of the project runs through this package.

  method.py          the interface of a decoding method (DecodeMethod, Runner, Batch,
                     Context), the per-token base (SingleRunner) and reward helpers
  methods_dera.py    DeRa: a lambda sweep mixing a reference and aligned model(s)
  methods_cd.py      TokenwiseCD and BlockwiseCD (controlled decoding with a value model)
  methods_tq.py      TransferQ (direct, indirect) and ARGS (reward-guided decoding)
  methods_policy.py  PolicySampling: a policy's own samples (params in hand), with the
                     exact KL to a reference and a reward when given, or a DeRa sweep;
                     the studies and the synthetic-preference builder sample with it
  components.py      run directory -> dera.Component (policies, value models), rewards
  prompts.py         prompt loading (a task's split or a JSONL file) and encoding
  loop.py            THE batch loop (`decode_batches`) with its host split, the mesh it
                     runs on and the rows' single atomic write
  run.py             a method decoded from run directories end to end (`run`): what the
                     decode binary and the frontier study call
  preferences.py     synthetic preference pairs: two samples per prompt, labelled by a
                     gold reward (the builder binary and the TL;DR study)
  configurables.py   the methods' gin names (`decode.method = @TokenwiseCD()`)

One floor above evaluation (blockwise CD's KL bound reads its best-of-n theory)
and below the binaries: nothing here imports a binary.
"""
