r"""Serving binary: an OpenAI-compatible server where every request chooses its own lambda.

  python -m realign_jax.serve --gin_file=configs/serve/dera_builtin_tiny.gin \
      --gin.REF_CHECKPOINT="'runs/sft'" --gin.ALIGNED_CHECKPOINT="'runs/ppo'" \
      --host=127.0.0.1 --port=8000

The checkpoints are the decode binary's (`serve.ref_checkpoint`, and a
`DeRa` object's `aligned_checkpoint` or `aligned_checkpoints`: run
directories or Hugging Face directories). POST /v1/completions and
/v1/chat/completions take OpenAI's fields plus `realign: {"lambda": x}` (a
number, or one weight per aligned model; `serve.default_lambda`, else DeRa's
first lambda, when absent); each choice reports its usage and its exact KL to
the reference. GET /v1/models, /health, /metrics (Prometheus). A
continuous-batching engine (`serving/engine.py`) decodes `serve.num_slots`
rows at once; a served row equals the decode binary's row for the same seed.

--host (default 127.0.0.1: nothing listens beyond this machine) and --port
(default 8000). Put it behind an authenticating proxy to expose it, or set
REALIGN_API_KEY in its environment: every route but /health then needs
`Authorization: Bearer <key>` (the key is never logged). SIGTERM: stop
admitting, finish the requests in flight (cut at `serve.deadline_s`), exit 0.
A checkpoint that cannot be loaded, models with different vocabularies or a
port in use: one line, exit 2.
"""

import sys

from realign_jax.plumbing import cli

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def split_net_flags(argv, net=None) -> tuple:
  """(argv without --host/--port, {'host', 'port'}); a bad port is a one-line error."""
  net = dict(net or {"host": DEFAULT_HOST, "port": DEFAULT_PORT})
  rest, it = [], iter(argv)
  for a in it:
    name = next((n for n in ("host", "port") if a == f"--{n}" or a.startswith(f"--{n}=")), None)
    if name is None:
      rest.append(a)
      continue
    value = a.split("=", 1)[1] if "=" in a else next(it, None)
    if value is None:
      raise SystemExit(f"error: --{name} needs a value")
    if name == "port":
      if not value.isdigit() or int(value) > 65535:
        raise SystemExit(f"error: --port must be an integer in [0, 65535], got {value!r}")
      value = int(value)
    net[name] = value
  return rest, net


_NET = None
if __name__ == "__main__":
  sys.argv[1:], _NET = split_net_flags(sys.argv[1:])
cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

from typing import Optional, Sequence

from realign_jax.plumbing import config_check
from realign_jax.plumbing import gin_utils
from realign_jax.inference.methods_dera import DeRa
from realign_jax.serving import server as server_lib


def serve(*, ref_checkpoint: str, method: Optional[DeRa] = None,
          vocab_path: Optional[str] = None, input_length: int = 96, max_tokens: int = 24,
          num_slots: int = 16, max_queue: int = 64, max_n: int = 4,
          lambda_range: Sequence[float] = (-1.0, 4.0), default_lambda=None,
          model_name: str = "realign", chat_template: bool = False,
          deadline_s: Optional[float] = 60.0, allow_vocabulary_mismatch: bool = False,
          host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
  """Loads the models, binds host:port, serves until SIGTERM.

  Args:
    ref_checkpoint: the reference policy (run or HF directory).
    method: @DeRa() naming the aligned model(s); its first lambda is the default.
    vocab_path: the vocabulary (None: the built-in one).
    input_length: prompt length in ids (longer prompts are refused with a 400).
    max_tokens: the most tokens a row generates (each slot's cache length).
    num_slots: rows decoded at once.
    max_queue: requests waiting for slots before a 429.
    max_n: the largest `n` of a request.
    lambda_range: [low, high] of a request's lambda.
    default_lambda: a request's lambda when it gives none (None: DeRa's first).
    model_name: the `model` requests name (GET /v1/models).
    chat_template: render chat messages with the tokenizer's chat template.
    deadline_s: a request still running after this many seconds is cut (504).
    allow_vocabulary_mismatch: serve run directories that record another vocabulary.
    host, port: where to listen (the --host / --port flags).
  """
  config_check.check_args(serve, dict(locals()))
  sock = server_lib.listen(host, port)
  served = server_lib.load(
      ref_checkpoint=ref_checkpoint, method=method if method is not None else DeRa(),
      vocab_path=vocab_path, input_length=input_length, max_tokens=max_tokens,
      num_slots=num_slots, max_queue=max_queue, max_n=max_n, lambda_range=lambda_range,
      default_lambda=default_lambda, model_name=model_name, chat_template=chat_template,
      deadline_s=deadline_s, allow_vocabulary_mismatch=allow_vocabulary_mismatch)
  print(f"serving {model_name} on http://{host}:{sock.getsockname()[1]} "
        f"({num_slots} slots)", flush=True)
  server_lib.serve_forever(served, sock)


def main(argv: list) -> int:
  argv, net = split_net_flags(argv, _NET)
  fn = gin_utils.configure_binary(argv, "serve", serve)
  gin_utils.call(fn, host=net["host"], port=net["port"])
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
