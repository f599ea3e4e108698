"""Runs that go wrong: NaN updates, broken checkpoints, a full disk, mistyped settings.

Every case ends in one line: an `error: ...` naming the step, path or value
(exit 2), or, for a resume past a broken checkpoint, one `warning: ...` line
naming the step it skipped and why. Nothing non-finite is ever saved or used.

In-process runs use the trainer directly (tiny T5, one device); the binaries'
exit codes and one-line errors run through their main(argv) in this process, but
for the full disk in the train binary, which runs as a subprocess.
"""

import dataclasses
import errno
import itertools
import json
import logging
import os
import re
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from realign_jax.plumbing import config_check
from realign_jax.plumbing import startup
from realign_jax import decode as decode_bin
from realign_jax import evaluate as evaluate_bin
from realign_jax import train as train_bin
from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import components as inference_components
from realign_jax.inference.methods_dera import DeRa
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.training.sft import SFT
from tests.helpers import (REPO_ROOT, TINY_BUILTIN, TRAIN_RUN_DEVICES, BinaryRun,
                           assert_one_line_error, binary_env, run_main, train_run_args)
from tests.test_training import _checkpoint_steps, _max_abs_diff, _metrics, _sft, _train

CFG = TINY_BUILTIN["t5"]
SAMPLING = sampler.SamplingConfig(max_new_tokens=4)
PROMPTS = ["Return the number of items in a container.",
           "Compute the arithmetic mean along the specified axis."]


# ---- helpers ------------------------------------------------------------------
def _abstract(config=CFG):
  abstract, _ = LanguageModel(config).abstract_init()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


def _run_dir(path, *, steps=(1,), nan=False, config=CFG):
  """A run directory with model.json and params-only checkpoints (no training)."""
  params = LanguageModel(config).init(jax.random.PRNGKey(0))[0]
  if nan:
    params = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
  run_dir.write_model_json(str(path), config)
  ck = ckpt_lib.Checkpointer(str(path), keep=10, async_save=False)
  for step in steps:
    ck.save(step, {"step": np.int32(step), "params": params})
  ck.close()
  return str(path)


def _step_dir(model_dir, step) -> str:
  return os.path.join(str(model_dir), ckpt_lib.CHECKPOINT_SUBDIR, str(step))


def _break(model_dir, step, kind) -> str:
  """Breaks checkpoint `step` of a run directory the way `kind` says; returns what to expect."""
  step_dir = _step_dir(model_dir, step)
  if kind == "truncated_array":
    # the largest array data file (orbax keeps them in `d/` directories), cut to 1000 bytes
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "default"))
             if os.path.basename(r) == "d" for n in ns]
    target = max(files, key=os.path.getsize)
    os.truncate(target, 1000)
    return "cannot be read (corrupt or truncated)"
  if kind == "empty_metadata":
    open(os.path.join(step_dir, "default", "_METADATA"), "w").close()
    return "_METADATA is empty"
  if kind == "empty_dir":
    shutil.rmtree(step_dir, ignore_errors=True)
    os.makedirs(step_dir)
    return "is an empty directory"
  raise ValueError(kind)


def _decode(ref, out, **kw):
  prompts = os.path.join(os.path.dirname(str(out)), "prompts.jsonl")
  with open(prompts, "w") as f:
    f.write("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  args = dict(ref_checkpoint=ref, method=DeRa(lambdas=[1.0]), output_file=str(out),
              prompt_file=prompts, input_length=32, batch_size=2, sampling=SAMPLING,
              progress=False)
  args.update(kw)
  return decode_bin.decode(**args)


# ---- 8. a NaN update is never saved -------------------------------------------------
@jax.custom_vjp
def _nan_grad_if(x, flag):
  """The identity, whose gradient is NaN where `flag` > 0: a finite loss, NaN gradients."""
  del flag
  return x


def _nan_grad_fwd(x, flag):
  return x, flag


def _nan_grad_bwd(flag, g):
  return jnp.where(flag > 0, jnp.nan, 1.0) * g, jnp.zeros_like(flag)


_nan_grad_if.defvjp(_nan_grad_fwd, _nan_grad_bwd)


@dataclasses.dataclass
class _NanGradSFT(SFT):
  """SFT whose gradients are NaN from the batch of (0-based) step `nan_from` on; the loss is not."""

  nan_from: int = 0

  def batches(self, start_step):
    for step, batch in zip(itertools.count(start_step), super().batches(start_step)):
      flag = 1.0 if step >= self.nan_from else 0.0
      yield dict(batch, nan_grad=np.full((self.batch_size,), flag, np.float32))

  def loss(self, params, batch, rng, aux=None, frozen=None):
    loss, metrics = super().loss(params, batch, rng, aux=aux, frozen=frozen)
    return _nan_grad_if(loss, jnp.max(batch["nan_grad"])), metrics


def test_nan_gradient_stops_before_saving_naming_the_last_finite_checkpoint(tmp_path):
  # Steps 1 and 2 are good; the update of step 3 makes the params NaN while its
  # loss (of the params before the update) is finite. TRAIN_STEPS = 3: the
  # run used to end there, exit 0, with a NaN checkpoint 3.
  alg = _sft("t5", _NanGradSFT, nan_from=2)
  with pytest.raises(UserError, match=r"gradient norm became nan in the update of step 3\b"
                                      r".*last good checkpoint: 2\)"):
    _train(tmp_path, alg, 3, mesh="one", checkpoint_every=1)
  assert _checkpoint_steps(tmp_path) == [1, 2]
  assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
  for step in (1, 2):
    assert _finite(ckpt_lib.load_params(str(tmp_path), _abstract(TINY_BUILTIN["t5"]), step=step))


def test_decode_and_load_refuse_nonfinite_params(tmp_path):
  run = _run_dir(tmp_path / "nan", nan=True)
  where = re.escape(_step_dir(run, 1))
  with pytest.raises(UserError, match=rf"checkpoint step 1 at {where} holds non-finite parameters"):
    ckpt_lib.load_params(run, _abstract())
  out = tmp_path / "out.jsonl"
  with pytest.raises(UserError, match=rf"checkpoint step 1 at {where} holds non-finite"):
    _decode(run, out)
  assert not out.exists()


# ---- 9. broken checkpoints ------------------------------------------------------------
BREAKS = ["truncated_array", "empty_metadata", "empty_dir"]


@pytest.mark.parametrize("kind", BREAKS)
def test_decode_names_the_broken_step(tmp_path, kind):
  run = _run_dir(tmp_path / "run", steps=(1, 2))
  expect = _break(run, 2, kind)
  out = tmp_path / "out.jsonl"
  with pytest.raises(UserError) as info:
    _decode(run, out)
  msg = str(info.value)
  assert f"checkpoint step 2 at {_step_dir(run, 2)} " in msg and expect in msg, msg
  assert "\n" not in msg
  assert not out.exists()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """4 steps, a checkpoint after each (kept), and the final params."""
  model_dir = tmp_path_factory.mktemp("base")
  alg = _sft("t5")
  _train(model_dir, alg, 4, mesh="one", checkpoint_every=1, keep_checkpoints=10)
  return {"dir": str(model_dir),
          "params": jax.tree_util.tree_map(np.asarray, alg.final_state["params"])}


def _nan_state(model_dir, step):
  """Rewrites checkpoint `step`'s params as NaN (what a run before the fix could save)."""
  item = os.path.join(_step_dir(model_dir, step), "default")
  with ocp.StandardCheckpointer() as ck:
    tree = ck.restore(item)
  tree["params"] = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), tree["params"])
  shutil.rmtree(item)
  with ocp.StandardCheckpointer() as ck:
    ck.save(item, tree)
  return "holds non-finite values (['params']"


@pytest.mark.parametrize("kind", BREAKS + ["nonfinite"])
def test_resume_falls_back_to_the_newest_intact_step(base_run, tmp_path, capsys, kind):
  model_dir = tmp_path / "run"
  shutil.copytree(base_run["dir"], model_dir)
  expect = _nan_state(model_dir, 4) if kind == "nonfinite" else _break(model_dir, 4, kind)
  result = _train(model_dir, _sft("t5"), 4, mesh="one", checkpoint_every=1, keep_checkpoints=10)
  assert result["step"] == 4
  warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
  assert len(warnings) == 1, warnings
  moved = os.path.join(str(model_dir), ckpt_lib.BROKEN_SUBDIR, "4")
  assert f"skipped checkpoint step 4 at {_step_dir(model_dir, 4)} " in warnings[0]
  assert expect in warnings[0] and moved in warnings[0] and "resuming from step 3" in warnings[0]
  assert os.path.isdir(moved)
  # step 4 was trained again from step 3: the same params as the run that was never broken
  assert _checkpoint_steps(model_dir) == [1, 2, 3, 4]
  assert [r["step"] for r in _metrics(model_dir)] == [1, 2, 3, 4]
  loaded = ckpt_lib.load_params(str(model_dir), _abstract(TINY_BUILTIN["t5"]))
  assert _max_abs_diff(ckpt_lib.as_numpy(loaded), base_run["params"]) < 1e-6


def test_resume_past_a_stray_empty_step_directory(base_run, tmp_path, capsys):
  model_dir = tmp_path / "run"
  shutil.copytree(base_run["dir"], model_dir)
  os.makedirs(_step_dir(model_dir, 7))
  assert _train(model_dir, _sft("t5"), 5, mesh="one", checkpoint_every=1,
                keep_checkpoints=10)["step"] == 5
  err = capsys.readouterr().err
  assert re.search(r"warning: skipped checkpoint step 7 at \S+ is an empty directory.*"
                   r"resuming from step 4", err), err
  assert _checkpoint_steps(model_dir) == [1, 2, 3, 4, 5]


# ---- 12. a full disk while saving --------------------------------------------------------
def _fill_disk_at(monkeypatch, step):
  """Orbax's commit (the rename of the written step) of `step` fails with ENOSPC."""
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.on_commit_callback

  async def full(tmp_dir, **kwargs):
    if os.path.basename(str(tmp_dir.get_final())) == str(step):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir.get()))
    return await original(tmp_dir, **kwargs)
  monkeypatch.setattr(atomicity, "on_commit_callback", full)


@pytest.mark.parametrize("async_checkpoint", [True, False])
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, async_checkpoint):
  _fill_disk_at(monkeypatch, 4)
  with pytest.raises(UserError) as info:
    _train(tmp_path, _sft("t5"), 6, mesh="one", checkpoint_every=2,
           async_checkpoint=async_checkpoint)
  msg = str(info.value)
  assert f"could not write checkpoint step 4 to {_step_dir(tmp_path, 4)}: " in msg, msg
  assert "No space left on device" in msg and "latest: step 2" in msg, msg
  # the previous checkpoint is intact; nothing of step 4 is left behind
  assert os.listdir(os.path.join(str(tmp_path), ckpt_lib.CHECKPOINT_SUBDIR)) == ["2"]
  assert _finite(ckpt_lib.load_params(str(tmp_path), _abstract(TINY_BUILTIN["t5"]), step=2))


# ---- 12. settings of the wrong type, unusable paths: before any compute ------------------
@pytest.mark.parametrize("kw,needles", [
    ({"batch_size": "8"}, ["decode.batch_size", "'8'"]),
    ({"num_samples": 1.5}, ["decode.num_samples", "1.5"]),
    ({"output_file": "DIR"}, ["is a directory", "DIR"]),
])
def test_decode_refuses_bad_settings_before_loading(tmp_path, monkeypatch, kw, needles):
  def no_compute(*args, **kwargs):
    raise AssertionError("a checkpoint was loaded before the settings were checked")
  monkeypatch.setattr(inference_components, "load_component", no_compute)
  (tmp_path / "outdir").mkdir()
  kw = {k: str(tmp_path / "outdir") if v == "DIR" else v for k, v in kw.items()}
  needles = [str(tmp_path / "outdir") if n == "DIR" else n for n in needles]
  run = _run_dir(tmp_path / "ref")
  with pytest.raises(UserError) as info:
    _decode(run, tmp_path / "out.jsonl", **kw)
  for needle in needles:
    assert needle in str(info.value), str(info.value)


def test_evaluate_refuses_a_directory_as_output_before_reading(tmp_path, monkeypatch):
  from realign_jax.evaluation import records

  def no_compute(*args, **kwargs):
    raise AssertionError("decode files were read before the output file was checked")
  monkeypatch.setattr(records, "read_decode_file", no_compute)
  with pytest.raises(UserError, match=rf"OUTPUT_FILE {re.escape(str(tmp_path))} is a directory"):
    evaluate_bin.evaluate(decode_files=[str(tmp_path / "d.jsonl")], output_file=str(tmp_path))
  with pytest.raises(UserError, match=r"evaluate.seed must be an integer, got '0'"):
    evaluate_bin.evaluate(decode_files=[str(tmp_path / "d.jsonl")],
                          output_file=str(tmp_path / "e.json"), seed="0")


def test_config_check_names_setting_and_value():
  sft = SFT(model=LanguageModel(TINY_BUILTIN["t5"]), batch_size="8")
  with pytest.raises(UserError, match=r"SFT.batch_size must be an integer, got '8'"):
    config_check.check_config(sft)
  bad_model = SFT(model=LanguageModel(replace(TINY_BUILTIN["t5"], d_model=32.0)))
  with pytest.raises(UserError, match=r"T5Config.d_model must be an integer, got 32.0"):
    config_check.check_config(bad_model)
  with pytest.raises(UserError, match=r"SFT.init_checkpoint must be a string or None, got 3"):
    config_check.check_config(SFT(model=LanguageModel(TINY_BUILTIN["t5"]), init_checkpoint=3))
  # what gin gives for well-typed settings passes: ints for floats, None for Optional
  config_check.check_config(SFT(model=LanguageModel(TINY_BUILTIN["t5"]), max_eval_examples=None))
  config_check.check_value("x", 3, float)
  with pytest.raises(UserError, match="True or False"):
    config_check.check_value("x", 1, bool)


# ---- the binaries: exit 2 and one line ----------------------------------------------------
# NOTE: in this process, through each binary's main(argv) (tests.helpers.run_main), but
# for the one error that arises while training runs, with checkpoint threads at work:
# there only a process of its own shows that nothing else reaches stderr.
def _train_args(model_dir, *extra) -> list:
  return train_run_args(model_dir)[2:] + list(extra)  # NOTE: without `-m realign_jax.train`


def _decode_args(root, ref, out) -> list:
  return ["--gin_file=configs/decode/dera_builtin_tiny.gin", "--gin.ALIGNED_CHECKPOINT=None",
          f"--gin.decode.prompt_file='{root / 'prompts.jsonl'}'", "--gin.decode.batch_size=2",
          "--gin.decode.progress=False", f"--gin.REF_CHECKPOINT='{ref}'",
          f"--gin.OUTPUT_FILE='{out}'"]


def _cases(root):
  """name -> (binary's main, argv, strings the error line must name, model dir or None)."""
  (root / "a_file").write_text("not a directory\n")
  os.makedirs(_step_dir(root / "stray", 7))
  ref = _run_dir(root / "ref")
  broken = _run_dir(root / "broken", steps=(1, 2))
  _break(broken, 2, "truncated_array")
  (root / "outdir").mkdir()
  (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  (root / "d.jsonl").write_text("")
  train = train_bin.main
  return {
      "train_steps_str": (train, _train_args(root / "a", "--gin.TRAIN_STEPS='ten'"),
                          ["must be an integer", "'ten'"], root / "a"),
      "batch_size_str": (train, _train_args(root / "b", "--gin.SFT.batch_size='8'"),
                         ["SFT.batch_size", "'8'"], root / "b"),
      "model_dir_is_file": (train, _train_args(root / "a_file"),
                            [str(root / "a_file"), "not a directory"], None),
      "only_a_stray_empty_step": (train, _train_args(root / "stray"),
                                  [_step_dir(root / "stray", 7), "is an empty directory",
                                   "no intact checkpoint"], None),
      "decode_broken_step": (decode_bin.main, _decode_args(root, broken, root / "broken.jsonl"),
                             [f"checkpoint step 2 at {_step_dir(broken, 2)} cannot be read"], None),
      "decode_output_is_dir": (decode_bin.main, _decode_args(root, ref, root / "outdir"),
                               [f"OUTPUT_FILE {root / 'outdir'} is a directory"], None),
      "evaluate_output_is_dir": (
          evaluate_bin.main, ["--gin_file=configs/evaluate/default.gin",
                              f"--gin.DECODE_FILES=['{root / 'd.jsonl'}']",
                              f"--gin.OUTPUT_FILE='{root / 'outdir'}'"],
          [f"OUTPUT_FILE {root / 'outdir'} is a directory"], None),
  }


CASES = ["train_steps_str", "batch_size_str", "model_dir_is_file", "only_a_stray_empty_step",
         "decode_broken_step", "decode_output_is_dir", "evaluate_output_is_dir"]


@pytest.mark.parametrize("name", CASES)
def test_binary_prints_one_line_error_and_exits_2(tmp_path, capsys, caplog, name):
  main, argv, needles, model_dir = _cases(tmp_path)[name]
  capsys.readouterr()
  code = run_main(main, argv)
  out, err = capsys.readouterr()
  assert_one_line_error(code, out, err, needles)
  # NOTE: what the binary run as a process would print besides its line: a warning
  # logged on the way that start-up's filter lets through (tests/test_startup.py)
  noise = startup._DropNoise()  # pylint: disable=protected-access
  assert [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and noise.filter(r)] == []
  if model_dir is not None:  # refused before anything was written
    assert not os.path.exists(model_dir)


_ENOSPC_WRAPPER = textwrap.dedent('''\
    """The train binary with checkpoint step FAIL_STEP's commit failing with ENOSPC."""
    import errno, os, runpy, sys
    from orbax.checkpoint._src.path import atomicity
    _original = atomicity.on_commit_callback

    async def _full(tmp_dir, **kwargs):
      if os.path.basename(str(tmp_dir.get_final())) == os.environ["FAIL_STEP"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_dir.get()))
      return await _original(tmp_dir, **kwargs)

    atomicity.on_commit_callback = _full
    sys.argv = ["realign_jax.train"] + sys.argv[1:]
    runpy.run_module("realign_jax.train", run_name="__main__", alter_sys=True)
''')


def test_full_disk_in_the_binary_is_one_line_and_exits_2(tmp_path):
  # NOTE: the shared train run's settings (tests.helpers.train_run_args): its programs are
  # in the run's compilation cache; checkpoints every 2 steps, the commit of step 4 fails.
  (tmp_path / "enospc_train.py").write_text(_ENOSPC_WRAPPER)
  model_dir = tmp_path / "full"
  args = _train_args(model_dir, "--gin.TrainerConfig.checkpoint_every=2",
                     "--gin.TrainerConfig.eval_every=0", "--gin.TrainerConfig.progress=False")
  run = BinaryRun([str(tmp_path / "enospc_train.py")] + args,
                  env=binary_env(TRAIN_RUN_DEVICES, extra={"FAIL_STEP": "4"}), cwd=REPO_ROOT,
                  log_prefix=str(tmp_path / "full")).wait()
  assert_one_line_error(run.returncode, run.stdout, run.stderr, [
      f"could not write checkpoint step 4 to {_step_dir(model_dir, 4)}",
      "No space left on device", "latest: step 2"])
  assert sorted(os.listdir(os.path.join(str(model_dir), ckpt_lib.CHECKPOINT_SUBDIR))) == ["2"]
