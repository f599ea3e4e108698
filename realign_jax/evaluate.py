r"""Evaluation binary: metrics of decode JSONL files, one JSON summary.

  python -m realign_jax.evaluate --gin_file=configs/evaluate/default.gin \
      --gin.DECODE_FILES="['runs/dera.jsonl']" --gin.OUTPUT_FILE="'runs/eval.json'"

For every decode file (written by `realign_jax.decode`) and every lambda in it:
the exact and log-ratio KL to the reference with standard errors, the mean
gold reward, response lengths, diversity (distinct-n, rep-n) and, given
references, ROUGE-1/2/L. Given COMPARE_FILE (decodes of the same prompts by
another policy), the win rate of each group against it under a judge (the
gold reward by default, or an LLM judge). The summary file appears only when
complete.

On several hosts each process scores a contiguous block of every group's rows
(rewards, ROUGE) and of every comparison's pairs (the judge); the blocks are
gathered in order, so the summary is a single process's, and process 0 alone
writes it.
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from realign_jax.plumbing import config_check
from realign_jax.plumbing import gin_utils
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.data import jsonl
from realign_jax.data import pipeline
from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import judges as judges_lib
from realign_jax.evaluation import kl as kl_lib
from realign_jax.evaluation import records, stats, text_metrics
from realign_jax.evaluation import win_rate as win_rate_lib
from realign_jax.parallel import multihost


def load_references(*, reference_file: Optional[str] = None, reference_task: Optional[str] = None,
                    reference_split: str = "validation", data_dir: Optional[str] = None) -> dict:
  """{prompt: reference} from a JSONL file ({prompt, reference}) or a task's {inputs, targets}."""
  refs = {}
  if reference_file:
    if not os.path.isfile(reference_file):
      raise UserError(f"reference file {reference_file} not found")
    for i, row in jsonl.iter_json_lines(reference_file):
      if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
              and isinstance(row.get("reference"), str)):
        raise UserError(f"{reference_file} row {i}: needs string fields 'prompt' and "
                        f"'reference'")
      refs.setdefault(row["prompt"], row["reference"])
  elif reference_task:
    for e in pipeline.text_examples(reference_task, reference_split, data_dir=data_dir):
      refs.setdefault(e["inputs"], e["targets"])
  return refs


def _group_metrics(rows, path, *, reward_name, scores, rouge_rows, orders) -> dict:
  """A group's metrics; `scores` (rewards) and `rouge_rows` come from `_score_split`."""
  responses = [r["response"] for r in rows]
  prompts = [r["prompt"] for r in rows]
  out = {"lam": rows[0]["lam"], "num_rows": len(rows), "num_prompts": len(set(prompts))}
  if all("log_ratio" in r for r in rows):
    out.update(kl_lib.kl_from_rows(rows))
  if all(isinstance(r.get("length"), int) for r in rows):
    out["mean_length_tokens"], out["mean_length_tokens_se"] = stats.mean_and_stderr(
        [r["length"] for r in rows])
  out["mean_length_words"], out["mean_length_words_se"] = stats.mean_and_stderr(
      [len(text_metrics.tokenize(t)) for t in responses])
  if scores is not None:
    scores = np.asarray(scores, np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
      raise UserError(f"{path} row {rows[bad[0]]['_line']}: reward {reward_name} is "
                      f"{scores[bad[0]]}")
    out["reward"], out["reward_se"] = stats.mean_and_stderr(scores)
  out["diversity"] = text_metrics.diversity(responses, orders)
  if rouge_rows is not None:
    out["rouge"] = text_metrics.rouge_means(rouge_rows)
  return out


def _reward_task(reward_judge, rows) -> tuple:
  """(n, score(slice) -> rewards): a group's rewards, of its sampled ids where all rows hold them."""
  ids = _row_ids(rows)  # NOTE: decided for the whole group, not per block

  def score(part):
    return reward_judge.scores([r["prompt"] for r in rows[part]],
                               [r["response"] for r in rows[part]],
                               None if ids is None else ids[part]).tolist()
  return len(rows), score


def _rouge_task(rows, references) -> tuple:
  def score(part):
    return text_metrics.rouge_rows([r["response"] for r in rows[part]],
                                   [references[r["prompt"]] for r in rows[part]])
  return len(rows), score


def _win_task(judge, matched, swap) -> tuple:
  """(n, judge(slice) -> [verdicts of the block]) for the (row, other row) pairs `matched`."""
  ids_1, ids_2 = _row_ids([a for a, _ in matched]), _row_ids([b for _, b in matched])

  def judge_block(part):
    block = matched[part]
    return [_verdicts(judge, [a["prompt"] for a, _ in block], [a["response"] for a, _ in block],
                      [b["response"] for _, b in block], swap[part],
                      None if ids_1 is None else ids_1[part],
                      None if ids_2 is None else ids_2[part])]
  return len(matched), judge_block


def _verdicts(judge, prompts, responses_1, responses_2, swap, ids_1, ids_2) -> dict:
  """{pref: [n] preferences for responses_1 (1, 0, 0.5, NaN), failures} of pairs shown as `swap`.

  `win_rate.verdicts` per block, so that pairs judged apart are summarised together.
  """
  pref, failures = win_rate_lib.verdicts(judge, prompts, responses_1, responses_2, swap,
                                         ids_1=ids_1, ids_2=ids_2)
  return {"pref": pref.tolist(), "failures": {str(k): int(v) for k, v in failures.items()}}


def _share(n: int) -> slice:
  """This process's contiguous block of n items (blocks in process order; sizes differ by 1)."""
  procs, me = multihost.process_slot()
  per, extra = divmod(n, procs)
  lo = me * per + min(me, extra)
  return slice(lo, lo + per + (me < extra))


def _score_split(tasks: dict) -> tuple:
  """({key: [per-item results]}, items scored here) of `tasks` {key: (n, fn(slice) -> list)}.

  Each process scores its block of every task's items; the blocks are gathered
  (every process gets all, in item order), so the results are a 1-process
  run's. A UserError on any process is raised on every process, as one line.
  """
  mine, raised, here = [], None, 0
  try:
    for n, fn in tasks.values():
      part = _share(n)
      here += part.stop - part.start
      mine.append(fn(part) if part.stop > part.start else [])
  except Exception as e:  # pylint: disable=broad-except
    # NOTE: passed on before raising, so that no process waits for this one's results.
    raised = e
  error = None if raised is None else (
      (str(raised).splitlines() or [""])[0] if isinstance(raised, UserError)
      else f"{type(raised).__name__}: {raised}")
  gathered = multihost.gather_objects({"error": error,
                                       "results": mine if raised is None else None})
  if raised is not None:
    raise raised
  failed = [(q, g["error"]) for q, g in enumerate(gathered) if g["error"] is not None]
  if failed:
    raise UserError(f"process {failed[0][0]} failed while scoring: {failed[0][1]}")
  return ({key: [x for g in gathered for x in g["results"][i]] for i, key in enumerate(tasks)},
          here)


def _agree(refused: Optional[UserError]) -> None:
  """Raises on every process if the checks refused the run on any one (one line each)."""
  gathered = multihost.gather_objects(None if refused is None else
                                      (str(refused).splitlines() or [""])[0])
  if refused is not None:
    raise refused
  failed = [(q, e) for q, e in enumerate(gathered) if e is not None]
  if failed:
    raise UserError(f"process {failed[0][0]} refused the run: {failed[0][1]}")


def _row_ids(rows) -> Optional[list]:
  """The rows' sampled ids (decode rows' `tokens`), or None when a row lacks them.

  NOTE: where ids are known they are the source of truth for rewards of ids
  (a length in tokens): re-encoding a response's text can give other ids.
  """
  ids = [r.get("tokens") for r in rows]
  if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in ids):
    return ids
  return None


def _comparisons(groups, other, path, compare_file):
  """(group lam, other lam) pairs: all against the single other group, or lam to same lam."""
  if len(other) == 1:
    only = next(iter(other))
    return [(lam, only) for lam in groups]
  missing = [lam for lam in groups if lam not in other]
  if missing:
    raise UserError(f"{compare_file} has lambdas {list(other)}; it has to hold a single group or "
                    f"every lambda of {path} (missing {missing})")
  return [(lam, lam) for lam in groups]


def evaluate(*, decode_files: Sequence[str], output_file: str,
             compare_file: Optional[str] = None, lambdas: Optional[Sequence[float]] = None,
             reward: Optional[Any] = None, judge: Optional[Any] = None,
             reference_file: Optional[str] = None, reference_task: Optional[str] = None,
             reference_split: str = "validation", data_dir: Optional[str] = None,
             require_kl: bool = True, diversity_orders: Sequence[int] = (1, 2, 3),
             seed: int = 0) -> dict:
  """Evaluates decode files; writes and returns the JSON summary.

  Args:
    decode_files: decode JSONL files (rows grouped by `lam`).
    output_file: the JSON summary (written atomically).
    compare_file: decodes of the same prompts by another policy (a single
      group, or the same lambdas); every group is compared against it.
    lambdas: restrict to these lambdas (distinct, finite, all present).
    reward: the gold reward (a `realign_jax.rewards` Reward or a callable
      `(prompts, responses) -> scores`); its mean is reported per group.
    judge: the win-rate judge (`RewardJudge`, `LLMJudge`); default: the gold reward.
    reference_file / reference_task: references for ROUGE ({prompt,
      reference} JSONL, or a task's targets).
    require_kl: every row must hold `kl` and `log_ratio` (off for samplers
      that do not write them: the KL is then reported only for groups whose
      rows all hold them).
    diversity_orders: the n of distinct-n and rep-n.
    seed: seeds the random pair order of the win rates.
  """
  # ---- validate everything before any compute --------------------------------
  # NOTE: on several hosts the checks below run on every process (a file may be
  # missing on one host only); all processes agree before the first collective,
  # so a refusal on one is a one-line error on all rather than a wait.
  refused = None
  try:
    # NOTE: gin passes values on as written (seed='0'): types first.
    config_check.check_args(evaluate, dict(locals()))
    if isinstance(decode_files, str):
      decode_files = [decode_files]
    if not decode_files:
      raise UserError("no decode files given (DECODE_FILES is empty)")
    if len(set(decode_files)) != len(decode_files):
      raise UserError(f"decode files listed twice: {list(decode_files)}")
    config_check.check_output_file(output_file)
    orders = [int(n) for n in diversity_orders]
    if any(n < 1 for n in orders):
      raise UserError(f"diversity orders must be >= 1, got {orders}")
    if lambdas is not None:
      lambdas = LambdaGrid.of(lambdas, "evaluate.lambdas").list()
    reward_judge = judges_lib.RewardJudge(reward) if reward is not None else None
    if compare_file and judge is None:
      if reward_judge is None:
        raise UserError("a compare_file needs a judge or a gold reward to judge the win rates")
      judge = reward_judge
    if compare_file and hasattr(judge, "check"):
      judge.check()
    files = {}
    for path in decode_files:
      rows = records.read_decode_file(path, require_kl=require_kl)
      files[path] = records.select_groups(records.group_by_lam(rows), lambdas, path)
    other = None
    if compare_file:
      other = records.group_by_lam(records.read_decode_file(compare_file, require_kl=False))
      plans = {p: _comparisons(g, other, p, compare_file) for p, g in files.items()}
      # NOTE: pair every comparison up front so mismatched prompts fail before any judging.
      pairs = {(p, a, b): records.pair_rows(files[p][a], other[b], p, compare_file)
               for p, plan in plans.items() for a, b in plan}
    references = load_references(reference_file=reference_file, reference_task=reference_task,
                                 reference_split=reference_split, data_dir=data_dir)
    if (reference_file or reference_task) and not references:
      raise UserError(f"no references found in {reference_file or reference_task}")

    # NOTE: every missing reference is refused before any scoring.
    if references:
      for path, groups in files.items():
        for g in groups.values():
          missing = [r for r in g if r["prompt"] not in references]
          if missing:
            raise UserError(f"{path} row {missing[0]['_line']}: no reference for its prompt "
                            f"({len(missing)} of {len(g)} rows lack one)")

  except UserError as e:
    refused = e
  _agree(refused)
  if reward is not None and hasattr(reward, "setup"):
    # NOTE: a learned reward is loaded onto this host's devices: each process
    # scores its own block, so no program may span the other hosts' devices.
    # NOTE: lazy: Flax (the inference loop, partitioning), only for a learned reward.
    from realign_jax.inference.loop import host_mesh
    from realign_jax.parallel import partitioning
    reward.setup(host_mesh(), partitioning.logical_axis_rules())

  # ---- scoring: rewards, ROUGE and judge verdicts, split over the processes ----
  tasks, swaps = {}, {}
  for path, groups in files.items():
    for lam, g in groups.items():
      if reward_judge is not None:
        tasks["reward", path, lam] = _reward_task(reward_judge, g)
      if references:
        tasks["rouge", path, lam] = _rouge_task(g, references)
  if compare_file:
    for key, matched in pairs.items():
      # NOTE: the pair order of `win_rate.win_rate` (seeded, over all pairs of a comparison)
      swaps[key] = np.random.default_rng(seed).random(len(matched)) < 0.5
      tasks[("win", *key)] = _win_task(judge, matched, swaps[key])
  scored, here = _score_split(tasks)

  # ---- metrics ----------------------------------------------------------------
  summary = {"decode_files": list(decode_files), "files": {}, "win_rates": [],
             "reward": None if reward_judge is None else reward_judge.name,
             "judge": None if judge is None else judge.describe(), "compare_file": compare_file}
  for path, groups in files.items():
    summary["files"][path] = [
        _group_metrics(g, path, reward_name=None if reward_judge is None else reward_judge.name,
                       scores=scored.get(("reward", path, lam)),
                       rouge_rows=scored.get(("rouge", path, lam)), orders=orders)
        for lam, g in groups.items()]
  if compare_file:
    for key in pairs:
      path, lam, other_lam = key
      parts = scored[("win", *key)]
      failures = {}
      for part in parts:
        for reason, count in part["failures"].items():
          failures[reason] = failures.get(reason, 0) + count
      res = win_rate_lib.summarize([x for part in parts for x in part["pref"]], failures)
      res["num_swapped"] = int(swaps[key].sum())
      if res["num_failed"]:
        logging.warning("judge %s gave no verdict on %d of %d pairs (%s vs %s, lam %s): %s",
                        judge.describe().get("name"), res["num_failed"], res["num_pairs"], path,
                        compare_file, lam, res["failures"])
      summary["win_rates"].append({"file": path, "lam": lam, "against": compare_file,
                                   "against_lam": other_lam, **res})
  if _is_primary():  # NOTE: every process holds the gathered summary; one writes it
    ckpt_lib.atomic_write_text(output_file,
                               json.dumps(stats.clean_for_json(summary), indent=2) + "\n")
  summary["output_file"] = output_file
  # NOTE: not in the file: this process's share of the rows and pairs scored
  summary["scored_here"] = {"items": here, "of": sum(n for n, _ in tasks.values())}
  return summary


def _is_primary() -> bool:
  import jax
  return jax.process_index() == 0


def _se(se, digits: int = 4) -> str:
  """A standard error for printing: "n/a" when undefined (None, or NaN with n < 2)."""
  return "n/a" if se is None or not np.isfinite(se) else f"{se:.{digits}f}"


def _print_summary(summary: dict) -> None:
  for path, groups in summary["files"].items():
    for g in groups:
      parts = [f"{path} lam={g['lam']}", f"n={g['num_rows']}"]
      if g.get("kl_exact") is not None:
        parts.append(f"KL={g['kl_exact']:.4f}±{_se(g['kl_exact_se'])}")
      if g.get("reward") is not None:
        parts.append(f"reward={g['reward']:.4f}")
      print("  ".join(parts))
  for w in summary["win_rates"]:
    rate = "n/a" if w["win_rate"] is None else f"{w['win_rate']:.3f}±{_se(w['win_rate_se'], 3)}"
    print(f"win rate {w['file']} lam={w['lam']} vs {w['against']} lam={w['against_lam']}: {rate} "
          f"({w['num_judged']}/{w['num_pairs']} judged, failures {w['failures'] or 0})")
  print(f"wrote {summary['output_file']}")


def main(argv: list) -> int:
  summary = gin_utils.call(gin_utils.configure_binary(argv, "evaluate", evaluate))
  gin_utils.write_operative_config_beside(summary["output_file"])  # OUTPUT_FILE.config.gin
  procs, me = multihost.process_slot()
  if procs > 1:
    print(f"process {me} of {procs} scored {summary['scored_here']['items']} of "
          f"{summary['scored_here']['of']} rows and pairs")
  _print_summary(summary)
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
