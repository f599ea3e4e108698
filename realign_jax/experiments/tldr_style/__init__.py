"""The TL;DR-style study (DeRa paper, Figures 3, 6, 7); see experiments/__init__.py.

Besides config, pipeline, results and report: gold.py (the gold reward, ROUGE-L
F against the reference summary) and pairs.py (the preference pairs).
"""

from realign_jax.experiments import entry_point

__getattr__ = entry_point(__name__, "tldr_style")
