r"""The TL;DR-style study (DeRa paper, section 5.3 and appendix D.3: Figures 3, 6, 7), toy scale.

  python -m realign_jax.experiments.tldr_style \
      --gin_file=configs/experiments/tldr_style_tiny.gin --gin.MODEL_DIR="'D'"

Its stages: `pipeline.py`; its gold reward: `gold.py`; its settings:
`config.py`; a rerun with the same MODEL_DIR resumes.
"""

from realign_jax.plumbing import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from realign_jax.plumbing import gin_utils
from realign_jax.experiments import report as rep
from realign_jax.experiments.tldr_style.pipeline import tldr_style


def main(argv: list) -> int:
  res = gin_utils.call(gin_utils.configure_binary(argv, "tldr_style", tldr_style))
  print(f"Pearson(DeRa, retrained) of the PG win rates against SFT = {rep.fmt(res['pearson'])}; "
        f"report: {res['report']}")
  print("plots: " + ", ".join(res["figure_paths"].values()))
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
