"""The continuous-batching engine: fixed slots, every model's KV cache per slot, one jitted step.

A slot holds one row (one choice of a request). Each model's cache is kept
per slot (`dera.prefill` of batch 1, stacked over slots: leaves [S, 1, ...]),
so each slot has its own cache index and rows at different positions decode
together. Between steps the engine thread admits waiting requests (prefill
once per request, the cache copied into its n slots) and frees finished rows
at once. ONE jitted program advances every slot by a token: the models' steps
mixed by `dera.mixed_step` (vmapped over slots, each slot with its own
weights), then the sampler's per-step math (`sampler.process_logits_rows`,
`sampler.step_keys`, `sampler.draw_rows`, `sampler.exact_kl`).

A row's tokens depend only on its prompt, settings and seed: row j of a
request with seed s and `row` r draws at step t with
fold_in(fold_in(PRNGKey(s), r * n + j), t), as row r * n + j of the offline
decode binary with `decode.seed = s` (prompt r of its prompt file), so a
served request reproduces those rows token for token.
"""

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.decoding import dera, sampler


class QueueFull(Exception):
  """The waiting queue is at capacity (the server answers 429)."""


@dataclasses.dataclass
class Request:
  """One request's rows: its prompt ids and per-row settings (checked by the protocol layer).

  `weights` are the mixture's (1 + M) weights over (reference, aligned...);
  `on_event(kind, choice_index, payload)` is called from the engine thread
  with kind 'token' ({'token', 'logprob', 'ref_logprob', 'kl'}), 'finish'
  ({'reason'}) or 'error' ({'message'}).
  """
  inputs: np.ndarray  # [input_length] int32 prompt ids
  n: int
  max_tokens: int
  temperature: float
  top_p: float
  greedy: bool
  weights: Sequence[float]
  seed: int
  row: int = 0
  on_event: Optional[Callable] = None
  deadline: Optional[float] = None  # time.monotonic() after which the rows are cut
  stop_check: Optional[Callable] = None  # (choice_index, tokens) -> True to stop ("stop")
  cancelled: bool = False
  submitted: float = dataclasses.field(default_factory=time.monotonic)

  def cancel(self) -> None:
    """Frees the request's slots within one decoding step (a client that went away)."""
    self.cancelled = True


class _Row:
  __slots__ = ("req", "j", "tokens")

  def __init__(self, req, j):
    self.req, self.j, self.tokens = req, j, []


class Engine:
  """Slots over a mixture of models (reference first); `start()` runs the engine thread."""

  def __init__(self, components: Sequence[dera.Component], *, num_slots: int,
               max_new_tokens: int, input_length: int, max_queue: int = 64, mesh=None,
               rules=None, metrics=None):
    self.components = list(components)
    self.tokens = dera.shared_tokens(self.components)
    self.num_slots = num_slots
    self.max_new_tokens = max_new_tokens
    self.input_length = input_length
    self.max_queue = max_queue
    self.mesh, self.rules, self.metrics = mesh, rules, metrics
    self._waiting = queue.Queue()
    self._rows: List[Optional[_Row]] = [None] * num_slots
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread = None
    self._state = None
    self.steps = 0
    self._build()

  # ---- compiled pieces ------------------------------------------------------
  def _build(self):
    comps, pad, eos = self.components, self.tokens.pad_id, self.tokens.eos_id
    max_new = self.max_new_tokens

    def prefill(inputs):  # [1, Li] -> one slot's mixture cache
      return dera.prefill(comps, inputs, max_new)

    def admit(state, cache1, slot, key, w, temp, top_p, greedy, limit):
      put = lambda big, one: big.at[slot].set(one)
      return dict(state, cache=jax.tree_util.tree_map(put, state["cache"], cache1),
                  tok=state["tok"].at[slot].set(0), t=state["t"].at[slot].set(0),
                  done=state["done"].at[slot].set(False), keys=state["keys"].at[slot].set(key),
                  w=state["w"].at[slot].set(w), temp=state["temp"].at[slot].set(temp),
                  top_p=state["top_p"].at[slot].set(top_p),
                  greedy=state["greedy"].at[slot].set(greedy),
                  limit=state["limit"].at[slot].set(limit))

    def free(state, slot):
      return dict(state, done=state["done"].at[slot].set(True))

    def one_slot(tok, cache, w):  # a slot's rows (batch 1) through the mixture's step
      out, cache = dera.mixed_step(comps, w[:, None])(tok[None], cache)
      return out.logits[0], out.components[:, 0], cache

    def step(state):
      logits, comp, cache = jax.vmap(one_slot)(state["tok"], state["cache"], state["w"])
      raw = sampler.mask_pad(logits, pad)
      logq = jax.nn.log_softmax(
          sampler.process_logits_rows(raw, state["temp"], state["top_p"], state["greedy"]),
          axis=-1)
      keys = sampler.step_keys(state["keys"], state["t"])
      done = state["done"]
      new = jnp.where(done, pad, sampler.draw_rows(keys, logq, state["greedy"]))
      lp = jnp.take_along_axis(logq, new[:, None], axis=1)[:, 0]
      logp_ref = jax.nn.log_softmax(sampler.mask_pad(comp[:, 0], pad), axis=-1)
      ref_lp = jnp.take_along_axis(logp_ref, new[:, None], axis=1)[:, 0]
      # NOTE: greedy rows sample a point mass (log q = 0, KL = -log p_ref(y)), as
      # the decode binary's greedy rows.
      kl = jnp.where(state["greedy"], -ref_lp, sampler.exact_kl(logq, logp_ref))
      lp = jnp.where(state["greedy"], 0.0, lp)
      t = state["t"] + (~done).astype(jnp.int32)
      finished = ~done & ((new == eos) | (t >= state["limit"]))
      state = dict(state, cache=cache, tok=new, t=t, done=done | finished)
      return state, {"token": new, "logprob": lp, "ref_logprob": ref_lp, "kl": kl,
                     "live": ~done, "eos": new == eos}

    self._prefill = jax.jit(prefill)
    self._admit = jax.jit(admit, donate_argnums=0)
    self._free = jax.jit(free, donate_argnums=0)
    self._step = jax.jit(step, donate_argnums=0)

  def _init_state(self):
    s, m = self.num_slots, len(self.components)
    one = jax.eval_shape(self._prefill, jax.ShapeDtypeStruct((1, self.input_length), jnp.int32))
    cache = jax.tree_util.tree_map(lambda a: jnp.zeros((s,) + a.shape, a.dtype), one)
    key0 = jax.random.PRNGKey(0)
    return {"cache": cache, "tok": jnp.zeros((s,), jnp.int32), "t": jnp.zeros((s,), jnp.int32),
            "done": jnp.ones((s,), bool), "keys": jnp.zeros((s,) + key0.shape, key0.dtype),
            "w": jnp.zeros((s, m), jnp.float32), "temp": jnp.ones((s,), jnp.float32),
            "top_p": jnp.ones((s,), jnp.float32), "greedy": jnp.zeros((s,), bool),
            "limit": jnp.ones((s,), jnp.int32)}

  def _context(self):
    stack = contextlib.ExitStack()
    if self.mesh is not None:
      stack.enter_context(jax.set_mesh(self.mesh))
      stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def warm_up(self) -> None:
    """Compiles the prefill, admission and step programs (a throwaway row)."""
    with self._context():
      if self._state is None:
        self._state = self._init_state()
      req = Request(np.zeros((self.input_length,), np.int32), n=1, max_tokens=1,
                    temperature=1.0, top_p=1.0, greedy=False,
                    weights=[1.0] + [0.0] * (len(self.components) - 1), seed=0)
      self._admit_request(req, [0])
      self._state, out = self._step(self._state)
      jax.block_until_ready(out)
      self._state = self._free(self._state, 0)
      self._rows[0] = None

  # ---- the engine thread ----------------------------------------------------
  def start(self) -> None:
    self._thread = threading.Thread(target=self._run, name="realign-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: Optional[float] = None) -> None:
    """Stops admitting; rows in flight finish (cut after `timeout` seconds)."""
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout)

  def submit(self, req: Request) -> None:
    if self._stop.is_set():
      raise QueueFull("the server is shutting down")
    if self._waiting.qsize() >= self.max_queue:
      raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
    self._waiting.put(req)
    self._observe()
    self._wake.set()

  @property
  def active_slots(self) -> int:
    return sum(r is not None for r in self._rows)

  @property
  def queue_depth(self) -> int:
    return self._waiting.qsize()

  def _observe(self):
    if self.metrics is not None:
      self.metrics.queue_depth.set(self.queue_depth)
      self.metrics.active_slots.set(self.active_slots)

  def _run(self):
    with self._context():
      if self._state is None:
        self._state = self._init_state()
      while True:
        if not self._stop.is_set():
          self._admit_waiting()
        elif not self._waiting.empty():
          self._reject_waiting()
        if self.active_slots == 0:
          self._observe()
          if self._stop.is_set():
            return
          self._wake.wait(0.05)
          self._wake.clear()
          continue
        try:
          self._one_step()
        except Exception as e:  # NOTE: a failed step fails its rows, never the server
          logging.exception("decoding step failed")
          for slot, row in enumerate(self._rows):
            if row is not None:
              self._finish(slot, "error", f"decoding failed: {e}")

  def _reject_waiting(self):
    while not self._waiting.empty():
      req = self._waiting.get_nowait()
      for j in range(req.n):
        _emit(req, "error", j, {"message": "the server is shutting down"})

  def _admit_waiting(self):
    while not self._waiting.empty():
      free = [i for i, r in enumerate(self._rows) if r is None]
      req = self._waiting.queue[0]
      if req.cancelled:
        self._waiting.get_nowait()
        continue
      if req.deadline is not None and time.monotonic() > req.deadline:
        self._waiting.get_nowait()
        for j in range(req.n):
          _emit(req, "error", j, {"message": "the request exceeded the server's deadline "
                                             "waiting for a slot"})
        continue
      if len(free) < req.n:
        return
      self._waiting.get_nowait()
      self._admit_request(req, free[:req.n])

  def _admit_request(self, req: Request, slots: Sequence[int]) -> None:
    cache1 = self._prefill(jnp.asarray(req.inputs, jnp.int32)[None])
    base = jax.random.PRNGKey(req.seed)
    w = jnp.asarray(req.weights, jnp.float32)
    for j, slot in enumerate(slots):
      key = jax.random.fold_in(base, req.row * req.n + j)
      self._state = self._admit(self._state, cache1, slot, key, w,
                                jnp.float32(req.temperature), jnp.float32(req.top_p),
                                jnp.bool_(req.greedy), jnp.int32(req.max_tokens))
      self._rows[slot] = _Row(req, j)
    self._observe()

  def _one_step(self):
    t0 = time.monotonic()
    self._state, out = self._step(self._state)
    out = jax.device_get(out)
    self.steps += 1
    now = time.monotonic()
    if self.metrics is not None:
      self.metrics.step_seconds.observe(now - t0)
    for slot, row in enumerate(self._rows):
      if row is None or not out["live"][slot]:
        continue
      req = row.req
      if req.cancelled:
        self._finish(slot, "cancelled")
        continue
      tok = int(out["token"][slot])
      row.tokens.append(tok)
      if self.metrics is not None:
        self.metrics.tokens.inc()
        if len(row.tokens) == 1:
          self.metrics.ttft.observe(now - req.submitted)
      _emit(req, "token", row.j, {"token": tok, "logprob": float(out["logprob"][slot]),
                                  "ref_logprob": float(out["ref_logprob"][slot]),
                                  "kl": float(out["kl"][slot])})
      if out["eos"][slot]:
        self._finish(slot, "stop")
      elif len(row.tokens) >= req.max_tokens:
        self._finish(slot, "length")
      elif req.stop_check is not None and req.stop_check(row.j, row.tokens):
        self._finish(slot, "stop")
      elif req.deadline is not None and now > req.deadline:
        self._finish(slot, "error", "the request exceeded the server's deadline")
    self._observe()

  def _finish(self, slot: int, reason: str, message: str = "") -> None:
    row = self._rows[slot]
    self._rows[slot] = None
    self._state = self._free(self._state, slot)
    if reason == "error":
      _emit(row.req, "error", row.j, {"message": message})
    else:
      _emit(row.req, "finish", row.j, {"reason": reason})


def _emit(req, kind, j, payload):
  if req.on_event is not None:
    try:
      req.on_event(kind, j, payload)
    except Exception:  # NOTE: a listener that went away must not stop the engine
      logging.exception("request listener failed")
