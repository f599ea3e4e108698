r"""The reward-vs-KL frontier of every alignment method of the project, on one task.

  python -m realign_jax.experiments.frontier \
      --gin_file=configs/experiments/frontier_tiny.gin --gin.MODEL_DIR="'D'"

Its stages and the KL of each entry: `pipeline.py`; its settings: `config.py`;
a rerun with the same MODEL_DIR resumes.
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from realign_jax.plumbing import gin_utils
from realign_jax.experiments.frontier.pipeline import frontier


def main(argv: list) -> int:
  res = gin_utils.call(gin_utils.configure_binary(argv, "frontier", frontier))
  print(f"{len(res['entries'])} entries; frontier: "
        + "; ".join(f"{m} {s or ''}".strip() for m, s in res["pareto"]))
  print(f"report: {res['report']}; plot: {res['figure_paths']['frontier']}")
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
