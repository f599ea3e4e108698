"""Win rate of pi_1 against pi_2 under a judge (DeRa paper, appendix D.3).

Each pair is shown to the judge in a random order (swapped with probability
1/2, so a judge's position bias cancels on average) and the verdict is swapped
back. A win counts 1, a tie 1/2; the win rate is the mean over the pairs that
got a verdict, and pairs without one are counted by reason in the result,
never dropped silently.
"""

from typing import Any, Optional, Sequence

import numpy as np

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import stats


def summarize(preference_1, failures: Optional[dict] = None) -> dict:
  """Win-rate summary from per-pair preferences for pi_1 (1 win, 0 loss, 0.5 tie, NaN none).

  Returns:
    {"win_rate", "win_rate_se", "wins", "losses", "ties", "num_pairs",
     "num_judged", "num_failed", "failures"}; win_rate is None without any verdict.
  """
  p = np.asarray(preference_1, np.float64).reshape(-1)
  judged = np.isfinite(p)
  failures = dict(failures or {})
  num_failed = int((~judged).sum())
  if num_failed != sum(failures.values()):
    # NOTE: every missing verdict must have a reason; unexplained ones are named as such.
    failures["unexplained"] = num_failed - sum(failures.values())
  v = p[judged]
  out = {"wins": int(np.sum(v == 1.0)), "losses": int(np.sum(v == 0.0)),
         "ties": int(np.sum(v == 0.5)), "num_pairs": int(p.size), "num_judged": int(v.size),
         "num_failed": num_failed, "failures": failures, "win_rate": None, "win_rate_se": None}
  if v.size:
    out["win_rate"], out["win_rate_se"] = stats.mean_and_stderr(v)
  return out


def verdicts(judge, prompts: Sequence[Any], responses_1: Sequence[Any],
             responses_2: Sequence[Any], swap: Sequence[bool], *,
             ids_1: Optional[Sequence] = None, ids_2: Optional[Sequence] = None) -> tuple:
  """([N] preferences for responses_1 (1, 0, 0.5, NaN), the judge's failure counts).

  Each pair is shown in the order `swap` gives (True: responses_2 first) and
  the verdict turned back to responses_1's side.
  """
  swap = np.asarray(swap, bool).reshape(-1)
  first = [b if s else a for a, b, s in zip(responses_1, responses_2, swap)]
  second = [a if s else b for a, b, s in zip(responses_1, responses_2, swap)]
  if ids_1 is not None and ids_2 is not None and getattr(judge, "accepts_ids", False):
    judgement = judge.compare(
        list(prompts), first, second,
        first_ids=[b if s else a for a, b, s in zip(ids_1, ids_2, swap)],
        second_ids=[a if s else b for a, b, s in zip(ids_1, ids_2, swap)])
  else:
    judgement = judge.compare(list(prompts), first, second)
  pref = np.asarray(judgement.preference, np.float64).reshape(-1)
  if pref.size != len(prompts):
    name = judge.describe().get("name") if hasattr(judge, "describe") else type(judge).__name__
    raise UserError(f"judge {name} returned {pref.size} verdicts for {len(prompts)} pairs")
  return np.where(swap, 1.0 - pref, pref), dict(judgement.failures)  # NOTE: NaN stays NaN


def win_rate(judge, prompts: Sequence[Any], responses_1: Sequence[Any],
             responses_2: Sequence[Any], *, seed: int = 0,
             swap: Optional[Sequence[bool]] = None, ids_1: Optional[Sequence] = None,
             ids_2: Optional[Sequence] = None) -> dict:
  """Win rate of responses_1 (from pi_1) over responses_2 (from pi_2), pairwise by prompt.

  Args:
    judge: an object with `compare(prompts, first, second) -> Judgement`.
    prompts, responses_1, responses_2: [N] aligned lists.
    seed: seeds the random order of each pair.
    swap: optional [N] explicit orders (True = responses_2 shown first).
    ids_1, ids_2: optional [N] sampled ids of the responses, passed on to a
      judge that reads them (`accepts_ids`: a reward judge scores the ids).

  Returns:
    `summarize`'s dict plus "num_swapped".
  """
  n = len(prompts)
  if not n == len(responses_1) == len(responses_2):
    raise ValueError(f"{n} prompts, {len(responses_1)} and {len(responses_2)} responses")
  if swap is None:
    swap = np.random.default_rng(seed).random(n) < 0.5
  swap = np.asarray(swap, bool).reshape(-1)
  pref_1, failures = verdicts(judge, prompts, responses_1, responses_2, swap, ids_1=ids_1,
                              ids_2=ids_2)
  out = summarize(pref_1, failures)
  out["num_swapped"] = int(swap.sum())
  return out

