"""Metrics to JSONL (`MODEL_DIR/metrics.jsonl`) and TensorBoard (`MODEL_DIR/tb`)."""

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _py(v: Any) -> Any:
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _truncate_after(path: str, step: int) -> None:
  """Drops lines logged after `step` (written by a run that died before saving)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line).get("step", -1) <= step:
          keep.append(line)
      except ValueError:
        continue  # a line cut short by a kill
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per (step, split); mirrors scalars to TensorBoard.

  `enabled=False` (every process but 0 of a multi-host run) writes nothing
  but returns the same rows.
  """

  def __init__(self, model_dir: str, *, resume_step: Optional[int] = None,
               tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    self.path = os.path.join(model_dir, METRICS_FILE)
    self.samples_path = os.path.join(model_dir, SAMPLES_FILE)
    for p in (self.path, self.samples_path):
      _truncate_after(p, -1 if resume_step is None else resume_step)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(model_dir, "tb"))

  def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
    row = {"step": int(step), "split": split}
    for k, v in metrics.items():
      row[k] = _py(v)
    if not self.enabled:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
    return row

  def read_rows(self, split: str) -> list:
    """The rows of `split` written so far (in file order); [] when writing is disabled."""
    if not self.enabled or not os.path.exists(self.path):
      return []
    out = []
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if row.get("split") == split:
          out.append(row)
    return out

  def write_samples(self, step: int, samples: list) -> None:
    if not self.enabled:
      return
    with open(self.samples_path, "a") as f:
      for s in samples:
        f.write(json.dumps({"step": int(step), **s}) + "\n")
    if self._tb is not None and samples:
      text = "\n\n".join(f"**prompt**: {s.get('prompt', '')}  \n**sample**: {s.get('sample', '')}"
                         for s in samples)
      self._tb.add_text("samples", text, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
