"""Metrics to JSONL (`MODEL_DIR/metrics.jsonl`) and TensorBoard (`MODEL_DIR/tb`).

MODEL_DIR may be an object-store URI (gs://): the files go through
`realign_jax.plumbing.paths`, the TensorBoard events through epath (`_EpathEventFile`).
"""

import io
import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from realign_jax.plumbing import paths

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _py(v: Any) -> Any:
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _truncate_after(path: str, step: int) -> None:
  """Drops lines logged after `step` (written by a run that died before saving)."""
  if not paths.exists(path):
    return
  keep = []
  with paths.open(path) as f:
    for line in f:
      try:
        if json.loads(line).get("step", -1) <= step:
          keep.append(line)
      except ValueError:
        continue  # a line cut short by a kill
  paths.atomic_write_text(path, "".join(keep))


class _EpathEventFile:
  """An event file on an object store, for tensorboardX: buffered, written whole at each flush.

  NOTE: tensorboardX's own gs:// writer needs google-cloud-storage (not a
  dependency); its S3 writer uploads the whole buffer at each flush too.
  """

  def __init__(self, path: str):
    self.path, self._buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    paths.atomic_write_bytes(self.path, self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory for a URI scheme (`register_writer_factory`)."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    paths.makedirs(path)


def _summary_writer(logdir: str):
  from tensorboardX import SummaryWriter
  if paths.is_remote(logdir):
    from tensorboardX import record_writer
    record_writer.register_writer_factory(logdir.split(":", 1)[0], _EpathEventFiles())
  return SummaryWriter(logdir)


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
    paths.makedirs(model_dir)
    self.path = os.path.join(model_dir, METRICS_FILE)
    self.samples_path = os.path.join(model_dir, SAMPLES_FILE)
    for p in (self.path, self.samples_path):
      _truncate_after(p, -1 if resume_step is None else resume_step)
    self._tb = None
    if tensorboard:
      self._tb = _summary_writer(os.path.join(model_dir, "tb"))

  def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
    row = {"step": int(step), "split": split}
    for k, v in metrics.items():
      row[k] = _py(v)
    if not self.enabled:
      return row
    paths.append_text(self.path, json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
    return row

  def read_rows(self, split: str) -> list:
    """The rows of `split` written so far (in file order); [] when writing is disabled."""
    if not self.enabled or not paths.exists(self.path):
      return []
    out = []
    with paths.open(self.path) as f:
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
    paths.append_text(self.samples_path,
                      "".join(json.dumps({"step": int(step), **s}) + "\n" for s in samples))
    if self._tb is not None and samples:
      text = "\n\n".join(f"**prompt**: {s.get('prompt', '')}  \n**sample**: {s.get('sample', '')}"
                         for s in samples)
      self._tb.add_text("samples", text, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
