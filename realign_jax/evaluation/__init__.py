"""realign_jax.evaluation: metrics over samples, plain numpy in and floats/dicts out.

  kl.py                exact and log-ratio KL(pi || pi_ref) with standard errors
  best_of_n_theory.py  best-of-n KL bound, estimator, exact KL and win rate
  win_rate.py          win rates with swapped pair order (DeRa paper D.3)
  judges.py            reward judges (gold, learned) and the LLM judge client
  pairwise.py          pairwise accuracy, eq. (14) of the DeRa paper
  text_metrics.py      distinct-n, rep-n, ROUGE-1/2/L
  records.py           decode JSONL files read and checked
  stats.py             means with standard errors
"""
