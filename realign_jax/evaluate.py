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
"""

from realign_jax import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from realign_jax import gin_utils
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.errors import UserError
from realign_jax.evaluation import judges as judges_lib
from realign_jax.evaluation import kl as kl_lib
from realign_jax.evaluation import records, stats, text_metrics
from realign_jax.evaluation import win_rate as win_rate_lib


def load_references(*, reference_file: Optional[str] = None, reference_task: Optional[str] = None,
                    reference_split: str = "validation", data_dir: Optional[str] = None) -> dict:
  """{prompt: reference} from a JSONL file ({prompt, reference}) or a task's {inputs, targets}."""
  refs = {}
  if reference_file:
    if not os.path.isfile(reference_file):
      raise UserError(f"reference file {reference_file} not found")
    from realign_jax.data import jsonl
    for i, row in jsonl.iter_json_lines(reference_file):
      if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
              and isinstance(row.get("reference"), str)):
        raise UserError(f"{reference_file} row {i}: needs string fields 'prompt' and "
                        f"'reference'")
      refs.setdefault(row["prompt"], row["reference"])
  elif reference_task:
    from realign_jax.data import pipeline
    for e in pipeline.text_examples(reference_task, reference_split, data_dir=data_dir):
      refs.setdefault(e["inputs"], e["targets"])
  return refs


def _group_metrics(rows, path, *, reward_judge, references, orders) -> dict:
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
  if reward_judge is not None:
    scores = reward_judge.scores(prompts, responses, _row_ids(rows))
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
      raise UserError(f"{path} row {rows[bad[0]]['_line']}: reward {reward_judge.name} is "
                      f"{scores[bad[0]]}")
    out["reward"], out["reward_se"] = stats.mean_and_stderr(scores)
  out["diversity"] = text_metrics.diversity(responses, orders)
  if references:
    missing = [r for r in rows if r["prompt"] not in references]
    if missing:
      raise UserError(f"{path} row {missing[0]['_line']}: no reference for its prompt "
                      f"({len(missing)} of {len(rows)} rows lack one)")
    out["rouge"] = text_metrics.rouge_scores(responses, [references[p] for p in prompts])
  return out


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
  # NOTE: gin passes values on as written (seed='0'): types first.
  from realign_jax import config_check
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
    lambdas = records.check_lambda_grid(lambdas, "evaluate.lambdas")
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

  # ---- metrics ----------------------------------------------------------------
  summary = {"decode_files": list(decode_files), "files": {}, "win_rates": [],
             "reward": None if reward_judge is None else reward_judge.name,
             "judge": None if judge is None else judge.describe(), "compare_file": compare_file}
  for path, groups in files.items():
    summary["files"][path] = [
        _group_metrics(g, path, reward_judge=reward_judge, references=references,
                       orders=orders) for g in groups.values()]
  if compare_file:
    for (path, lam, other_lam), matched in pairs.items():
      res = win_rate_lib.win_rate(judge, [a["prompt"] for a, _ in matched],
                                  [a["response"] for a, _ in matched],
                                  [b["response"] for _, b in matched], seed=seed,
                                  ids_1=_row_ids([a for a, _ in matched]),
                                  ids_2=_row_ids([b for _, b in matched]))
      if res["num_failed"]:
        logging.warning("judge %s gave no verdict on %d of %d pairs (%s vs %s, lam %s): %s",
                        judge.describe().get("name"), res["num_failed"], res["num_pairs"], path,
                        compare_file, lam, res["failures"])
      summary["win_rates"].append({"file": path, "lam": lam, "against": compare_file,
                                   "against_lam": other_lam, **res})
  if _is_primary():  # NOTE: on several hosts each computes the same summary; one writes it
    ckpt_lib.atomic_write_text(output_file,
                               json.dumps(stats.clean_for_json(summary), indent=2) + "\n")
  summary["output_file"] = output_file
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
  _print_summary(summary)
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
