"""The decode binary: run directories in, one complete JSONL out, or one-line errors.

Run directories are made directly (model.json plus an orbax checkpoint written
through the one checkpoint path), so no training is needed.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from realign_jax import decode as decode_bin
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference.methods_dera import DeRa
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from tests.helpers import TINY_BUILTIN, subprocess_xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = replace(TINY_BUILTIN["t5"], dropout_rate=0.0)
SAMPLING = sampler.SamplingConfig(max_new_tokens=6)


def _run_dir(path, config, seed):
  lm = LanguageModel(config)
  params = lm.init(jax.random.PRNGKey(seed))[0]
  run_dir.write_model_json(str(path), config)
  ck = ckpt_lib.Checkpointer(str(path), keep=1, async_save=False)
  ck.save(1, {"step": np.int32(1), "params": params})
  ck.close()
  return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("decode_bin")
  prompts = root / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in [
      "Return the number of items in a container.",
      "Open a file and return a stream. Raise OSError upon failure.",
      "Compute the arithmetic mean along the specified axis."]) + "\n")
  return {"ref": _run_dir(root / "ref", CFG, 0), "aligned": _run_dir(root / "aligned", CFG, 1),
          "other_vocab": _run_dir(root / "other", replace(CFG, vocab_size=4096), 2),
          "prompts": str(prompts), "root": root}


DERA_FIELDS = ("lambdas", "aligned_checkpoint", "mixing")


def _decode(dirs, out, **kw):
  """The decode binary's function with DeRa; DeRa's settings among `kw` go to the method."""
  args = dict(ref_checkpoint=dirs["ref"], aligned_checkpoint=dirs["aligned"],
              output_file=str(out), lambdas=[0.0, 0.5, 1.0], prompt_file=dirs["prompts"],
              input_length=32, batch_size=2, sampling=SAMPLING, progress=False)
  args.update(kw)
  method = DeRa(**{k: args.pop(k) for k in DERA_FIELDS if k in args})
  return decode_bin.decode(method=method, **args)


def test_writes_every_row_with_logprobs_and_kl(dirs, tmp_path):
  out = tmp_path / "out.jsonl"
  summary = _decode(dirs, out, num_samples=2)
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert summary["rows"] == len(rows) == 3 * 2 * 3
  assert [r["lam"] for r in rows[:3]] == [0.0, 0.5, 1.0]
  for r in rows:
    n = r["length"]
    assert len(r["tokens"]) == len(r["logprobs"]) == len(r["ref_logprobs"]) == n
    assert len(r["aligned_logprobs"]) == n
    assert r["kl"] >= -1e-6
    np.testing.assert_allclose(r["log_ratio"], sum(r["logprobs"]) - sum(r["ref_logprobs"]),
                               atol=1e-4)
    if r["lam"] == 0.0:  # sampling the reference itself
      assert abs(r["kl"]) < 1e-5 and abs(r["log_ratio"]) < 1e-5
      np.testing.assert_allclose(r["logprobs"], r["ref_logprobs"], atol=1e-5)
    if r["lam"] == 1.0:  # sampling the aligned model
      np.testing.assert_allclose(r["logprobs"], r["aligned_logprobs"], atol=1e-5)
  # the sweep is one call, but each row's stream depends only on its seed:
  # a separate run at one lambda reproduces that lambda's rows token for token
  out1 = tmp_path / "one.jsonl"
  _decode(dirs, out1, num_samples=2, lambdas=[0.5])
  single = [json.loads(x) for x in out1.read_text().splitlines()]
  assert [r["tokens"] for r in single] == [r["tokens"] for r in rows if r["lam"] == 0.5]


def test_weight_mixing_rows(dirs, tmp_path):
  out = tmp_path / "w.jsonl"
  _decode(dirs, out, mixing="weights", lambdas=[0.0, 1.0])
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(rows) == 6 and {r["mixing"] for r in rows} == {"weights"}
  for r in rows:
    want = r["ref_logprobs"] if r["lam"] == 0.0 else r["aligned_logprobs"]
    np.testing.assert_allclose(r["logprobs"], want, atol=1e-5)


@pytest.mark.parametrize("kw,match", [
    ({"lambdas": [0.5, float("nan")]}, "finite"),
    ({"lambdas": [0.5, 0.5]}, "duplicates"),
    ({"aligned_checkpoint": "OTHER"}, "vocabulary sizes: 2048 .* vs 4096"),
    ({"prompt_file": "EMPTY"}, "holds no prompts"),
    ({"prompt_file": "BADROW"}, "row 2: missing or empty 'prompt'"),
    ({"num_samples": 0}, "num_samples"),
    ({"ref_checkpoint": "MISSING"}, "model.json not found"),
])
def test_bad_input_is_refused_before_writing(dirs, tmp_path, kw, match):
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
  subst = {"OTHER": dirs["other_vocab"], "EMPTY": str(tmp_path / "empty.jsonl"),
           "BADROW": str(tmp_path / "bad.jsonl"), "MISSING": str(tmp_path / "nope")}
  kw = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
  out = tmp_path / "out.jsonl"
  with pytest.raises(UserError, match=match):
    _decode(dirs, out, **kw)
  assert not out.exists()
  assert not [f for f in os.listdir(tmp_path) if f.startswith("out.jsonl")]


def test_top_p_out_of_range_is_one_line_error_and_nonzero_exit(dirs, tmp_path):
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "realign_jax.decode",
         "--gin_file=configs/decode/dera_builtin_tiny.gin",
         f"--gin.REF_CHECKPOINT='{dirs['ref']}'", f"--gin.ALIGNED_CHECKPOINT='{dirs['aligned']}'",
         f"--gin.OUTPUT_FILE='{out}'", "--gin.SamplingConfig.top_p=1.5"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=subprocess_xla_flags())
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
  assert len(lines) == 1 and "top_p must be in (0, 1]" in lines[0], proc.stderr[-2000:]
  assert not out.exists()
