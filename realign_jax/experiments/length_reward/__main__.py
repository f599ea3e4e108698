r"""The length-reward study (DeRa paper, section 5.2, Figure 2) end to end.

  python -m realign_jax.experiments.length_reward \
      --gin_file=configs/experiments/length_reward_tiny.gin --gin.MODEL_DIR="'D'"

Its stages: `pipeline.py`; its settings: `config.py`; a rerun with the same
MODEL_DIR resumes.
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from realign_jax.plumbing import gin_utils
from realign_jax.experiments import report as rep
from realign_jax.experiments.length_reward.pipeline import length_reward


def main(argv: list) -> int:
  res = gin_utils.call(gin_utils.configure_binary(argv, "length_reward", length_reward))
  print(f"Pearson(DeRa, retrained) = {rep.fmt(res['pearson'])}; report: {res['report']}")
  print("plots: " + ", ".join(res["figure_paths"].values()))
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
