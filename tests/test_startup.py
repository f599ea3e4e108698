"""Every binary's start: user errors are one line and exit 2, fast ones before the heavy imports.

Each binary runs as a subprocess (`python -m ...`), as a user starts it. A
missing gin file is caught before JAX, orbax or TensorFlow is imported (an
exit hook in the child reports which of them were loaded); an unknown binding
needs the binary's configurables and is caught after the imports, still as
one line on an otherwise empty stderr.
"""

import logging
import os
import subprocess
import sys

import pytest

from realign_jax.plumbing import startup
from realign_jax.plumbing.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, a gin file of its own) for every binary.
BINARIES = [
    ("realign_jax.train", "configs/sft/builtin_tiny.gin"),
    ("realign_jax.decode", "configs/decode/dera_builtin_tiny.gin"),
    ("realign_jax.evaluate", "configs/evaluate/default.gin"),
    ("realign_jax.synthetic_preferences", "configs/data/synthetic_preferences_tiny.gin"),
    ("realign_jax.experiments.length_reward", "configs/experiments/length_reward_tiny.gin"),
    ("realign_jax.experiments.tldr_style", "configs/experiments/tldr_style_tiny.gin"),
    ("realign_jax.experiments.frontier", "configs/experiments/frontier_tiny.gin"),
]
HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow", "seqio")

# Runs a module as __main__ and, on the way out, prints which heavy modules it loaded.
_PROBE = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('LOADED', sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    "sys.argv = [{module!r}] + {args!r}\n"
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


def _env():
  env = dict(os.environ)
  # NOTE: as a user's shell would have it: no test-only logging settings.
  for k in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS"):
    env.pop(k, None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  return env


def _probe(module, args, cwd):
  code = _PROBE.format(heavy=HEAVY, module=module, args=list(args))
  return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_every_binary_config_exists():
  for _, gin_file in BINARIES:
    assert os.path.isfile(os.path.join(REPO_ROOT, gin_file)), gin_file


@pytest.mark.parametrize("case", ["missing_gin_file", "bad_override_syntax", "bad_gin_value",
                                  "stray_argument", "bad_verbosity"])
def test_argument_errors_are_one_line_before_heavy_imports(case, tmp_path):
  procs = {}
  for module, gin_file in BINARIES:
    args = {
        "missing_gin_file": ["--gin_file=configs/nope.gin", "--gin.MODEL_DIR='x'"],
        "bad_override_syntax": [f"--gin_file={gin_file}", "--gin.MODEL_DIR"],
        "bad_gin_value": [f"--gin_file={gin_file}", "--gin.MODEL_DIR='unterminated"],
        "stray_argument": [f"--gin_file={gin_file}", "--steps=3"],
        "bad_verbosity": [f"--gin_file={gin_file}", "--verbosity=loud"],
    }[case]
    procs[module] = _probe(module, args, cwd=REPO_ROOT)
  for module, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (module, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (module, err)
    assert "LOADED []" in out, (module, out)
  assert os.listdir(tmp_path) == []


def test_unknown_binding_is_one_line_after_registration(tmp_path):
  procs = {}
  for module, gin_file in BINARIES:
    args = [f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{tmp_path}/run'",
            "--gin.NoSuchConfigurable.x=3"]
    procs[module] = _probe(module, args, cwd=str(tmp_path))
  for module, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (module, err[-3000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1, (module, err[-3000:])
    assert lines[0].startswith("error: gin:") and "NoSuchConfigurable" in lines[0], lines
  assert os.listdir(tmp_path) == []  # nothing written, not even the run directory


def test_strip_verbosity():
  assert startup.strip_verbosity(["--gin_file=a", "--verbosity=1", "--gin.X=1"]) == (
      ["--gin_file=a", "--gin.X=1"], 1)
  assert startup.strip_verbosity(["-v", "0", "--gin_file=a"]) == (["--gin_file=a"], 0)
  assert startup.strip_verbosity(["--gin_file=a"]) == (["--gin_file=a"], -1)
  with pytest.raises(UserError, match="not an integer"):
    startup.strip_verbosity(["--verbosity=x"])
  with pytest.raises(UserError, match="needs a value"):
    startup.strip_verbosity(["--verbosity"])


class _Collect(logging.Handler):

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_library_notices_hidden_unless_verbose():
  logger, root = logging.getLogger("absl"), logging.getLogger()
  collect = _Collect()
  root.addHandler(collect)
  saved = (startup.verbosity(), logger.level, list(logger.filters), list(root.filters),
           root.level)
  try:
    startup.configure(-1)
    logger.warning("Given directory is read only=/x/checkpoints")
    logger.warning("a real warning")
    assert collect.lines == ["a real warning"]
    logging.getLogger().error("Path not found: %s", "gin/models/t5_tiny.gin")
    logger.warning("Waiting for previous save to complete took %f seconds. If this number is "
                   "high, consider checkpointing less frequently.", 1.8)
    assert collect.lines == ["a real warning"]
    startup.configure(0)
    logger.warning("Given directory is read only=/x/checkpoints")
    assert collect.lines[-1].startswith("Given directory is read only")
  finally:
    root.removeHandler(collect)
    startup._state["verbosity"] = saved[0]
    logger.setLevel(saved[1])
    logger.filters[:] = saved[2]
    root.filters[:] = saved[3]
    root.setLevel(saved[4])


def test_native_stderr_is_replayed_when_the_block_fails(capfd):
  startup._state["verbosity"] = -1
  with pytest.raises(RuntimeError):
    with startup.native_stderr_silenced():
      os.write(2, b"native start-up line\n")
      raise RuntimeError("import failed")
  assert "native start-up line" in capfd.readouterr().err
  with startup.native_stderr_silenced():
    os.write(2, b"hidden line\n")
  assert "hidden line" not in capfd.readouterr().err


# ---- t5x's command line: --help, --gin_bindings, --gin_search_paths ----------------
REQUIRED = {
    "realign_jax.train": ["MODEL_DIR"],
    "realign_jax.decode": ["REF_CHECKPOINT", "ALIGNED_CHECKPOINT", "OUTPUT_FILE"],
}


def test_help_lists_flags_and_required_macros_before_heavy_imports(tmp_path):
  procs = {module: _probe(module, ["--help", f"--gin_file={gin_file}"], cwd=str(tmp_path))
           for module, gin_file in BINARIES}
  for module, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (module, err)
    assert out.startswith(f"usage: python -m {module} "), out
    for flag in ("--gin_file", "--gin.NAME=VALUE", "--gin_bindings", "--gin_search_paths",
                 "--coordinator_address", "--num_processes", "--process_id"):
      assert flag in out, (module, flag)
    assert "LOADED []" in out, (module, out)
    gin_file = dict(BINARIES)[module]
    listed = out.split(f"required macros of {gin_file}:")[1].split("LOADED")[0].split()
    if module in REQUIRED:
      assert listed == REQUIRED[module], (module, listed)
  assert os.listdir(tmp_path) == []


def test_gin_search_paths_and_bindings(tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  # NOTE: found only through --gin_search_paths; its include through the checkout.
  (mine / "extra.gin").write_text(
      "include 'configs/sft/builtin_tiny.gin'\n"
      "MODEL_DIR = 'somewhere'\n"
      "MY_STEPS = %gin.REQUIRED\n"
      "TRAIN_STEPS = %MY_STEPS\n")
  proc = _probe("realign_jax.train", ["--help", f"--gin_search_paths={mine}",
                                      "--gin_file=extra.gin", "--gin_bindings", "MY_STEPS = 3"],
                cwd=str(tmp_path))
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert out.split("required macros of extra.gin:")[1].split("LOADED")[0].split() == [
      "MY_STEPS", "(given)"]
  # a binding in t5x's spelling is parsed like --gin.X=Y: a broken one is one line
  proc = _probe("realign_jax.train", [f"--gin_search_paths={mine}", "--gin_file=extra.gin",
                                      "--gin_bindings=MY_STEPS = (("], cwd=str(tmp_path))
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and err.startswith("error: gin:") and "LOADED []" in out, err
  proc = _probe("realign_jax.train", ["--gin_search_paths=/no/such/dir", "--gin_file=x.gin"],
                cwd=str(tmp_path))
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and "--gin_search_paths: /no/such/dir is not a directory" in err
  # in-process, as the binary does it: the search path and the bindings reach gin
  import gin
  from realign_jax.plumbing import gin_utils
  from realign_jax import train as train_binary
  try:
    gin_utils.configure_binary(
        ["--gin_search_paths", str(mine), "--gin_file", "extra.gin",
         "--gin_bindings=MY_STEPS = 7", "--gin.SFT.batch_size=8"], "train", train_binary.train)
    assert gin.query_parameter("%MY_STEPS") == 7
    assert gin.query_parameter("SFT.batch_size") == 8
  finally:
    gin_utils.set_search_paths([])
    gin.clear_config()


def test_verbosity_set_by_precheck_survives_configure_binary(tmp_path):
  # `python -m realign_jax.X --verbosity=0`: cli.precheck takes the flag off sys.argv and
  # sets the level; the binary's configure_binary then sees an argv without it.
  import gin
  from realign_jax.plumbing import gin_utils
  logger, root = logging.getLogger("absl"), logging.getLogger()
  saved = (startup.verbosity(), logger.level, list(logger.filters), list(root.filters),
           root.level)
  (tmp_path / "f.gin").write_text("f.x = 1\n")
  try:
    for given, expected in (([], 0), (["--verbosity=1"], 1), (["--verbosity=-1"], -1)):
      startup.configure(0)
      gin.clear_config()
      gin_utils.configure_binary([f"--gin_file={tmp_path / 'f.gin'}", *given], "f",
                                 lambda x: x)
      assert startup.verbosity() == expected, given
  finally:
    gin.clear_config()
    startup._state["verbosity"] = saved[0]
    logger.setLevel(saved[1])
    logger.filters[:] = saved[2]
    root.filters[:] = saved[3]
    root.setLevel(saved[4])
