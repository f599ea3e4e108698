"""The OpenAI request bodies, checked: a `Completion` or a 400 `ProtocolError` naming the field.

Fields (both endpoints): `model`, `max_tokens` (1 .. the server's limit; default
16 capped at the limit), `temperature` (0 .. 2; 0 is greedy), `top_p` (0, 1],
`n` (1 .. the server's limit), `seed` (integer >= 0; default 0), `stop` (a
string or up to 4), `stream`, `logprobs` (completions: an integer 0..5, the
sampled tokens' log-probs only; chat: a boolean), and `realign`:
{`lambda`: a number, or one weight per aligned model, within the server's
range; `row`: integer >= 0, the prompt index whose offline rows to reproduce
(row seeds row * n + j)}. `/v1/completions` takes `prompt` (a string, or a
list of one string); `/v1/chat/completions` takes `messages` (a non-empty list
of {role, content}). Fields OpenAI defines that do not change sampling here
(`user`, ...) are accepted and ignored; the penalties must be 0.
"""

import dataclasses
import math
from typing import Optional, Sequence

ROLES = ("system", "user", "assistant", "developer")
IGNORED = ("user", "stream_options", "metadata", "store", "logit_bias", "suffix", "echo",
           "best_of", "top_logprobs", "response_format", "tools", "tool_choice",
           "parallel_tool_calls", "service_tier", "max_completion_tokens")


class ProtocolError(Exception):
  """A bad request: HTTP 400 with `param` named in the OpenAI error object."""

  def __init__(self, param: Optional[str], message: str):
    super().__init__(message)
    self.param = param
    self.message = message

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": "invalid_request_error",
                      "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts (from its gin config)."""
  model: str
  num_aligned: int  # aligned models mixed with the reference
  max_tokens: int  # the cache length: the most tokens a row can generate
  max_n: int
  lambda_min: float
  lambda_max: float
  default_lambda: tuple  # one weight per aligned model
  max_stop: int = 4


@dataclasses.dataclass(frozen=True)
class Completion:
  """A checked request (`prompt` is the text, or None for chat: `messages` then)."""
  prompt: Optional[str]
  messages: Optional[tuple]
  max_tokens: int
  temperature: float
  top_p: float
  n: int
  seed: int
  stop: tuple
  stream: bool
  logprobs: bool
  lam: tuple  # one weight per aligned model
  row: int

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def weights(self) -> list:
    """The mixture's weights over (reference, aligned...): (1 - sum lam, lam...)."""
    return [1.0 - sum(self.lam), *self.lam]

  def lambda_value(self):
    return self.lam[0] if len(self.lam) == 1 else list(self.lam)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body, name, default, lo, hi, where=""):
  v = body.get(name, default)
  if v is None:
    v = default
  param = where + name
  if not _is_int(v):
    raise ProtocolError(param, f"'{param}' must be an integer, got {v!r}"[:200])
  if not lo <= v <= hi:
    raise ProtocolError(param, f"'{param}' must be in [{lo}, {hi}], got {v}")
  return v


def _number(body, name, default, lo, hi, lo_open=False):
  v = body.get(name, default)
  if v is None:
    v = default
  if not _is_number(v) or not math.isfinite(v):
    raise ProtocolError(name, f"'{name}' must be a finite number, got {v!r}"[:200])
  if not ((lo < v) if lo_open else (lo <= v)) or v > hi:
    raise ProtocolError(name, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], "
                              f"got {v}")
  return float(v)


def _stop(body, limits) -> tuple:
  v = body.get("stop")
  if v is None:
    return ()
  stops = [v] if isinstance(v, str) else v
  if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
      or len(stops) > limits.max_stop):
    raise ProtocolError("stop", f"'stop' must be a non-empty string or a list of up to "
                                f"{limits.max_stop} of them")
  return tuple(stops)


def _realign(body, limits) -> tuple:
  """(lambda weights, row) from the `realign` object."""
  v = body.get("realign")
  if v is None:
    return tuple(limits.default_lambda), 0
  if not isinstance(v, dict):
    raise ProtocolError("realign", "'realign' must be an object, e.g. {\"lambda\": 0.5}")
  unknown = sorted(set(v) - {"lambda", "row"})
  if unknown:
    raise ProtocolError("realign", f"unknown field realign.{unknown[0]}"[:100] +
                        "; realign takes 'lambda' and 'row'")
  lam = v.get("lambda")
  if lam is None:
    lam = tuple(limits.default_lambda)
  else:
    lam = [lam] if _is_number(lam) else lam
    if (not isinstance(lam, list) or len(lam) != limits.num_aligned
        or not all(_is_number(x) for x in lam)):
      raise ProtocolError("realign.lambda", f"'realign.lambda' must be a number or a list of "
                                            f"{limits.num_aligned} numbers (one per aligned "
                                            f"model)")
    for x in lam:
      if not math.isfinite(x) or not limits.lambda_min <= x <= limits.lambda_max:
        raise ProtocolError("realign.lambda", f"'realign.lambda' must be finite and in "
                                              f"[{limits.lambda_min}, {limits.lambda_max}], "
                                              f"got {x}")
    lam = tuple(float(x) for x in lam)
  row = _int(v, "row", 0, 0, 2**20, where="realign.")
  return lam, row


def _messages(body) -> tuple:
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise ProtocolError("messages", "'messages' must be a non-empty list of "
                                    "{\"role\", \"content\"} objects")
  out = []
  for i, m in enumerate(msgs):
    if (not isinstance(m, dict) or m.get("role") not in ROLES
        or not isinstance(m.get("content"), str)):
      raise ProtocolError(f"messages[{i}]", f"'messages[{i}]' must be an object with a role "
                                            f"in {ROLES} and a string content")
    out.append((m["role"], m["content"]))
  if not any(r == "user" for r, _ in out):
    raise ProtocolError("messages", "'messages' holds no user message")
  return tuple(out)


def parse(body, limits: Limits, *, chat: bool) -> Completion:
  """The checked request, or a ProtocolError naming the first bad field."""
  if not isinstance(body, dict):
    raise ProtocolError(None, "the request body must be a JSON object")
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise ProtocolError("model", "'model' must be a non-empty string")
  if model != limits.model:
    raise ProtocolError("model", f"the model {model[:80]!r} is not served here; "
                                 f"GET /v1/models lists {limits.model!r}")
  prompt = messages = None
  if chat:
    messages = _messages(body)
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
      prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
      raise ProtocolError("prompt", "'prompt' must be a non-empty string (or a list of one)")
  for name in ("presence_penalty", "frequency_penalty"):
    if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
      raise ProtocolError(name, f"'{name}' is not supported here (only 0)")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise ProtocolError("stream", "'stream' must be a boolean")
  lp = body.get("logprobs")
  if chat:
    if lp is not None and not isinstance(lp, bool):
      raise ProtocolError("logprobs", "'logprobs' must be a boolean")
    logprobs = bool(lp)
  else:
    logprobs = _int(body, "logprobs", 0, 0, 5) > 0 if lp is not None else False
  max_tokens = _int(body, "max_tokens", min(16, limits.max_tokens), 1, limits.max_tokens)
  lam, row = _realign(body, limits)
  return Completion(
      prompt=prompt, messages=messages, max_tokens=max_tokens,
      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
      n=_int(body, "n", 1, 1, limits.max_n), seed=_int(body, "seed", 0, 0, 2**31 - 1),
      stop=_stop(body, limits), stream=stream, logprobs=logprobs, lam=lam, row=row)


def default_lambda(value, num_aligned: int) -> tuple:
  """The server's default lambda (a number, or one weight per aligned model) as a tuple."""
  vals = [value] if _is_number(value) else list(value)
  if len(vals) != num_aligned:
    raise ValueError(f"the default lambda {value!r} needs {num_aligned} weights")
  return tuple(float(v) for v in vals)


def stop_index(text: str, stops: Sequence[str]) -> int:
  """Where the first stop string begins in `text` (-1: none)."""
  found = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(found) if found else -1
