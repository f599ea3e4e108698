"""The server assembled: components loaded onto the mesh, the engine, the app, uvicorn.

`load` checks everything the decode binary checks (vocabularies, special ids,
the aligned models' model.json) before any params are read, then loads the
reference and the aligned models of a `DeRa` object sharded onto
`loop.host_mesh()` and warms the engine up. `listen` binds the socket first,
so a port in use is one line at start-up; `serve_forever` runs uvicorn on it
in the calling thread (SIGTERM: stop admitting, finish the requests in
flight, return), `start_in_thread` runs it beside the caller (tests,
benchmarks).
"""

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import uvicorn

from realign_jax.checkpoints import run_dir
from realign_jax.data import chat as chat_lib
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import dera
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import components, loop
from realign_jax.inference import run as run_lib
from realign_jax.inference.method import Context
from realign_jax.inference.methods_dera import DeRa
from realign_jax.parallel import partitioning
from realign_jax.serving import app as app_lib
from realign_jax.serving import engine as engine_lib
from realign_jax.serving import protocol
from realign_jax.serving.metrics import Metrics

API_KEY_ENV = "REALIGN_API_KEY"


def load(*, ref_checkpoint: str, method: DeRa, vocab_path: Optional[str] = None,
         input_length: int = 96, max_tokens: int = 24, num_slots: int = 16,
         max_queue: int = 64, max_n: int = 4, lambda_range: Sequence[float] = (-1.0, 4.0),
         default_lambda=None, model_name: str = "realign", chat_template: bool = False,
         deadline_s: Optional[float] = 60.0, allow_vocabulary_mismatch: bool = False,
         sampling=None) -> app_lib.Served:
  """The served models and their engine (started), every setting checked first."""
  if not isinstance(method, DeRa):
    raise UserError(f"serve.method must be @DeRa() (its aligned_checkpoint or "
                    f"aligned_checkpoints are the aligned models), got {method!r}")
  if method.mixing != "logits":
    raise UserError("the server mixes logits per row: DeRa.mixing must be 'logits'")
  for name, v, lo in (("num_slots", num_slots, 1), ("max_queue", max_queue, 1),
                      ("max_n", max_n, 1), ("max_tokens", max_tokens, 1),
                      ("input_length", input_length, 2)):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
      raise UserError(f"serve.{name} must be an integer >= {lo}, got {v!r}")
  if max_n > num_slots:
    raise UserError(f"serve.max_n={max_n} is more than serve.num_slots={num_slots}")
  lo, hi = (float(x) for x in lambda_range)
  if not lo <= hi:
    raise UserError(f"serve.lambda_range must be [low, high], got {list(lambda_range)}")
  num_aligned = len(method.components())
  if num_aligned == 0:
    raise UserError("the server needs an aligned model: set DeRa.aligned_checkpoint")
  if default_lambda is None:
    first = method.checked_lambdas()[0]
    default_lambda = first
  try:
    default = protocol.default_lambda(default_lambda, num_aligned)
  except (TypeError, ValueError) as e:
    raise UserError(f"serve.default_lambda: {e}") from e
  if not all(lo <= x <= hi for x in default):
    raise UserError(f"serve.default_lambda {list(default)} is outside serve.lambda_range "
                    f"[{lo}, {hi}]")
  run_lib.check_vocabularies(method, ref_checkpoint, vocab_path,
                             allow_other=allow_vocabulary_mismatch)
  ref_cfg, _ = run_dir.read_model_json(ref_checkpoint)
  method.check(Context(ref_checkpoint, ref_cfg, vocab_path, input_length, sampling))
  if chat_template:
    chat_lib.load_template(vocab_path)  # NOTE: a missing template is refused at start-up
  vocab = vocab_lib.load_vocabulary(vocab_path)
  vocab_lib.check_model_tokens(vocab, ref_cfg, f"the model {ref_checkpoint}")
  mesh, rules = loop.host_mesh(), partitioning.logical_axis_rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    comps = components.load_components(method, ref_checkpoint, mesh, rules)
  ordered = [comps["ref"]] + [comps[f"aligned{i}"] for i in range(num_aligned)]
  dera.check_vocabularies(ordered)
  metrics = Metrics()
  engine = engine_lib.Engine(ordered, num_slots=num_slots, max_new_tokens=max_tokens,
                             input_length=input_length, max_queue=max_queue, mesh=mesh,
                             rules=rules, metrics=metrics)
  t0 = time.perf_counter()
  engine.warm_up()
  logging.info("engine compiled in %.1f s", time.perf_counter() - t0)
  engine.start()
  limits = protocol.Limits(model=model_name, num_aligned=num_aligned, max_tokens=max_tokens,
                           max_n=max_n, lambda_min=lo, lambda_max=hi, default_lambda=default)
  return app_lib.Served(engine=engine, vocab=vocab, limits=limits, input_length=input_length,
                        metrics=metrics, chat_template=chat_template, vocab_path=vocab_path,
                        deadline_s=deadline_s, api_key=os.environ.get(API_KEY_ENV) or None)


def listen(host: str, port: int) -> socket.socket:
  """A bound, listening socket on host:port (port 0: any free one); one line when it cannot."""
  if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
    raise UserError(f"--port must be an integer in [0, 65535], got {port!r}")
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise UserError(f"--host {host!r} cannot be resolved: {e.strerror}") from e
  family, _, _, _, addr = infos[0]
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(addr)
  except OSError as e:
    sock.close()
    raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from e
  sock.listen(128)
  return sock


class _Server(uvicorn.Server):
  """uvicorn's server, but SIGTERM / SIGINT end it with exit 0 (it re-raises them after
  its graceful shutdown, so the process would die of the signal)."""

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    sigs = (signal.SIGINT, signal.SIGTERM)
    original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
    try:
      yield
    finally:
      for sig, handler in original.items():
        signal.signal(sig, handler)


def _uvicorn(served: app_lib.Served, graceful_s: Optional[float]) -> uvicorn.Server:
  config = uvicorn.Config(app_lib.create_app(served), log_level="warning", access_log=False,
                          timeout_graceful_shutdown=graceful_s, lifespan="off")
  return _Server(config)


def serve_forever(served: app_lib.Served, sock: socket.socket) -> None:
  """uvicorn on `sock` in this thread until SIGTERM / SIGINT; then the engine stops.

  NOTE: on SIGTERM uvicorn stops accepting connections and waits for the
  requests in flight (at most the deadline); the engine then finishes what it
  still holds.
  """
  server = _uvicorn(served, served.deadline_s)
  try:
    server.run(sockets=[sock])
  finally:
    served.engine.stop(timeout=served.deadline_s)


class Background:
  """uvicorn in a thread beside the caller: `url`, `stop()`."""

  def __init__(self, served: app_lib.Served, host: str = "127.0.0.1", port: int = 0):
    self.served = served
    self.sock = listen(host, port)
    self.url = f"http://{host}:{self.sock.getsockname()[1]}"
    self.server = _uvicorn(served, 5.0)
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   name="realign-uvicorn", daemon=True)
    self.thread.start()
    while not self.server.started:
      if not self.thread.is_alive():
        raise RuntimeError("the server thread ended before it started")
      time.sleep(0.01)

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(10)
    self.served.engine.stop(timeout=10)
    self.sock.close()
