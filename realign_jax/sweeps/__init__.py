"""Ablation sweeps over gin bindings and seeds (the `realign_jax.sweep` binary).

  plan.py        the sweep file's settings, expanded into runs with directory names
  runner.py      one run: a binary subprocess with retries, its status file
  executors.py   local subprocesses (a thread pool) and SLURM job arrays (submitit)
  aggregate.py   final metrics of every run, mean and standard error across seeds, a plot
"""
