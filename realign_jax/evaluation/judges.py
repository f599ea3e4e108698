"""Judges: which of two responses to a prompt is better.

A judge has `compare(prompts, first, second) -> Judgement`, where the
preference of each pair is 1 (first better), 0 (second better), 0.5 (a tie)
or NaN (no verdict: the failure is counted by reason, never guessed).

- `RewardJudge`: any reward callable `(prompts, responses) -> scores`: a gold
  reward (e.g. the length reward of eq. 10 of the DeRa paper) or a learned
  reward model's scoring function; the higher score wins, equal scores tie.
- `LLMJudge`: an OpenAI-compatible chat-completions endpoint prompted with
  the DeRa paper's summary-rater prompt (appendix D.3), through `httpx` (the
  optional `judge` extra): a bounded number of requests in flight, retries
  that honour Retry-After, and refused credentials (HTTP 401/403) stopping
  the evaluation at the first pair.
"""

import collections
import concurrent.futures
import email.utils
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from realign_jax.plumbing.errors import UserError

RewardFn = Callable[[Sequence[Any], Sequence[Any]], Any]  # (prompts, responses) -> [N] scores

URL_ENV = "REALIGN_JUDGE_URL"
MODEL_ENV = "REALIGN_JUDGE_MODEL"
KEY_ENV = "REALIGN_JUDGE_API_KEY"

# The rater prompt of the DeRa paper (appendix D.3), with its three slots
# written as placeholders.
DEFAULT_TEMPLATE = (
    "You are an expert summary rater. Given a piece of text and two of its possible summaries, "
    "output 1 or 2 to indicate which summary is better. Text - {text}, Summary 1 - {summary1}, "
    "Summary 2 - {summary2}. Preferred Summary -")
PLACEHOLDERS = ("{text}", "{summary1}", "{summary2}")


class Judgement(NamedTuple):
  preference: np.ndarray  # [N] float64: 1 first better, 0 second better, 0.5 tie, NaN failed
  failures: dict  # reason -> number of pairs without a verdict for that reason


# ---- reward judges ------------------------------------------------------------
class RewardJudge:
  """Prefers the response with the higher reward; equal rewards (within `tie_tolerance`) tie."""

  # NOTE: `compare` and `scores` take the responses' sampled ids where known.
  accepts_ids = True

  def __init__(self, reward_fn, *, name: Optional[str] = None, tie_tolerance: float = 0.0):
    # NOTE: a `realign_jax.rewards` Reward object (with `.score`) or a bare callable.
    self.ids_fn = None
    if hasattr(reward_fn, "score"):
      name = name or getattr(reward_fn, "name", None)
      self.ids_fn = getattr(reward_fn, "score_ids", None)
      reward_fn = reward_fn.score
    name = name or "reward"
    if not callable(reward_fn):
      raise UserError(f"judge {name}: the reward function is not callable")
    if not tie_tolerance >= 0:
      raise UserError(f"judge {name}: tie_tolerance must be >= 0, got {tie_tolerance}")
    self.reward_fn, self.name, self.tie_tolerance = reward_fn, name, float(tie_tolerance)

  def check(self) -> None:
    """Nothing to check: the reward was validated when it was built."""

  def describe(self) -> dict:
    return {"type": "reward", "name": self.name, "tie_tolerance": self.tie_tolerance}

  def scores(self, prompts: Sequence[Any], responses: Sequence[Any],
             response_ids: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """[N] rewards; with `response_ids` (the sampled ids) a Reward scores those
    (`Reward.score_ids`: a length in tokens counts the sampled ids, not a re-encoding)."""
    if response_ids is not None and self.ids_fn is not None:
      s = self.ids_fn(list(prompts), list(responses), list(response_ids))
    else:
      s = self.reward_fn(list(prompts), list(responses))
    s = np.asarray(s, np.float64).reshape(-1)
    if s.shape[0] != len(responses):
      raise UserError(f"judge {self.name}: the reward returned {s.shape[0]} scores for "
                      f"{len(responses)} responses")
    return s

  def compare(self, prompts, first, second, first_ids=None, second_ids=None) -> Judgement:
    if not len(prompts) == len(first) == len(second):
      raise ValueError("prompts, first and second must have the same length")
    a, b = self.scores(prompts, first, first_ids), self.scores(prompts, second, second_ids)
    pref = np.where(a > b + self.tie_tolerance, 1.0,
                    np.where(b > a + self.tie_tolerance, 0.0, 0.5))
    bad = ~(np.isfinite(a) & np.isfinite(b))
    pref[bad] = np.nan
    failures = {"non_finite_reward": int(bad.sum())} if bad.any() else {}
    return Judgement(pref, failures)


# ---- LLM judge ----------------------------------------------------------------
class _Retryable(Exception):
  """A transient endpoint failure (5xx, 429, refused connection, timeout)."""

  def __init__(self, reason: str, retry_after: Optional[float] = None):
    super().__init__(reason)
    self.retry_after = retry_after


class _ClientError(Exception):
  """An HTTP 4xx answer other than 401/403/429: this pair fails, the others go on."""


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
  """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), or None."""
  if value is None:
    return None
  value = value.strip()
  if re.fullmatch(r"\d+(\.\d+)?", value):
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError, IndexError):
    return None
  if when is None:
    return None
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_preference(answer: str) -> Optional[int]:
  """1 or 2 if the answer names exactly one of the two summaries, else None (unparseable)."""
  found = set(re.findall(r"(?<![0-9.])([12])(?![0-9])", answer))
  return int(found.pop()) if len(found) == 1 else None


def _httpx():
  try:
    import httpx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the LLM judge needs the httpx package: install realign_jax with the "
                    "'judge' extra (pip install -e .[judge])") from None
  return httpx


class LLMJudge:
  """Asks an OpenAI-compatible chat endpoint which of two summaries is better.

  Args:
    url: the endpoint, either the full `.../chat/completions` URL or its base
      (e.g. `https://host/v1`); default: $REALIGN_JUDGE_URL.
    model: the model name sent with each request; default: $REALIGN_JUDGE_MODEL.
    api_key: sent as a bearer token; default: $REALIGN_JUDGE_API_KEY. It is
      never logged, printed, or written into summaries.
    template: the prompt, with `{text}`, `{summary1}` and `{summary2}`.
    max_retries: retries of a transient failure (HTTP 5xx or 429, a refused
      connection, a timeout).
    initial_backoff_s / max_backoff_s: the delay before a retry, doubled per
      retry and capped, when the server does not say how long to wait.
    max_retry_after_s: a 429/503 answer's Retry-After (seconds or a date) is
      the delay instead, up to this cap.
    timeout_s: per-request timeout.
    max_concurrency: requests in flight at once (the first pair is always
      sent alone, so a wrong URL or key costs one request).
    max_consecutive_failures: after this many pairs in a row lost to an
      unreachable endpoint, the remaining pairs are counted as
      `endpoint_down` without being sent (a dead endpoint fails fast; with
      concurrency, pairs already in flight still finish).

  An answer of HTTP 401 or 403 (credentials refused) raises `UserError` at
  once: no further pair is sent.
  """

  def __init__(self, *, url: Optional[str] = None, model: Optional[str] = None,
               api_key: Optional[str] = None, template: str = DEFAULT_TEMPLATE,
               max_retries: int = 4, initial_backoff_s: float = 1.0, max_backoff_s: float = 30.0,
               max_retry_after_s: float = 120.0, timeout_s: float = 60.0, max_tokens: int = 8,
               temperature: float = 0.0, max_concurrency: int = 4,
               max_consecutive_failures: int = 5, name: str = "llm"):
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
      raise UserError(f"LLM judge: the prompt template lacks {', '.join(missing)}")
    if (max_retries < 0 or initial_backoff_s < 0 or max_backoff_s < 0 or max_retry_after_s < 0
        or timeout_s <= 0):
      raise UserError("LLM judge: retries, backoff and max_retry_after_s must be >= 0 and "
                      "timeout_s > 0")
    if max_consecutive_failures < 1:
      raise UserError("LLM judge: max_consecutive_failures must be >= 1")
    if max_concurrency < 1:
      raise UserError(f"LLM judge: max_concurrency must be >= 1, got {max_concurrency}")
    # NOTE: the endpoint is checked by `check()` (called before any judging),
    # not here, so configs naming an LLM judge build without one configured.
    url = url or os.environ.get(URL_ENV, "")
    model = model or os.environ.get(MODEL_ENV, "")
    path = urllib.parse.urlparse(url).path.rstrip("/")
    self.url = url if not url or path.endswith("/chat/completions") else (
        url.rstrip("/") + "/chat/completions")
    self.model, self.template, self.name = model, template, name
    self._api_key = api_key or os.environ.get(KEY_ENV) or None
    self.max_retries, self.timeout_s = int(max_retries), float(timeout_s)
    self.initial_backoff_s, self.max_backoff_s = float(initial_backoff_s), float(max_backoff_s)
    self.max_retry_after_s = float(max_retry_after_s)
    self.max_tokens, self.temperature = int(max_tokens), float(temperature)
    self.max_concurrency = int(max_concurrency)
    self.max_consecutive_failures = int(max_consecutive_failures)
    self.sleep = time.sleep  # NOTE: replaceable so tests can record the backoff delays.

  def check(self) -> None:
    """Raises UserError unless httpx, an http(s) endpoint URL and a model name are there."""
    if not self.url:
      raise UserError(f"LLM judge: no endpoint URL (pass url= or set ${URL_ENV})")
    parsed = urllib.parse.urlparse(self.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
      raise UserError(f"LLM judge: the URL must be http(s)://host/..., got {self.url!r}")
    if not self.model:
      raise UserError(f"LLM judge: no model name (pass model= or set ${MODEL_ENV})")
    _httpx()

  def __repr__(self) -> str:  # NOTE: the key stays out of every repr and log line.
    return f"LLMJudge(url={self.url!r}, model={self.model!r})"

  def describe(self) -> dict:
    return {"type": "llm", "name": self.name, "url": self.url, "model": self.model,
            "max_retries": self.max_retries, "max_concurrency": self.max_concurrency}

  def render(self, text: str, summary1: str, summary2: str) -> str:
    # NOTE: plain replacement, not str.format: texts and templates may hold braces.
    return (self.template.replace("{text}", text).replace("{summary1}", summary1)
            .replace("{summary2}", summary2))

  def _post(self, client, body: bytes) -> bytes:
    httpx = _httpx()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    try:
      resp = client.post(self.url, content=body, headers=headers)
    except httpx.TimeoutException as e:
      raise _Retryable(type(e).__name__) from None
    except httpx.TransportError as e:  # refused connection, reset, DNS, ...
      raise _Retryable(type(e).__name__) from None
    code = resp.status_code
    if code in (401, 403):
      raise UserError(f"LLM judge {self.url}: HTTP {code} {resp.reason_phrase}: the endpoint "
                      f"refused the credentials (check ${KEY_ENV} and the model name "
                      f"{self.model!r}); no further pairs were sent")
    if code == 429 or code >= 500:
      retry_after = (parse_retry_after(resp.headers.get("Retry-After"))
                     if code in (429, 503) else None)
      raise _Retryable(f"http_{code}", retry_after)
    if code >= 400:
      raise _ClientError(f"http_{code}")
    return resp.content

  def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
    if retry_after is not None:
      return min(retry_after, self.max_retry_after_s)
    return min(self.initial_backoff_s * 2 ** attempt, self.max_backoff_s)

  def ask(self, prompt: str, client=None) -> tuple[Optional[str], Optional[str]]:
    """One chat completion with retries: (answer text, None) or (None, failure reason)."""
    if client is None:
      with _httpx().Client(timeout=self.timeout_s) as own:
        return self.ask(prompt, own)
    body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
    for attempt in range(self.max_retries + 1):
      try:
        raw = self._post(client, body)
      except _Retryable as e:
        if attempt == self.max_retries:
          return None, "endpoint_unavailable"
        delay = self._delay(attempt, e.retry_after)
        logging.warning("LLM judge %s: %s, retry %d/%d in %.2fs", self.url, e, attempt + 1,
                        self.max_retries, delay)
        self.sleep(delay)
        continue
      except _ClientError as e:
        return None, str(e)
      try:
        doc = json.loads(raw.decode("utf-8"))
        content = doc["choices"][0]["message"]["content"]
        if not isinstance(content, str):
          raise TypeError("content is not a string")
      except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        return None, "malformed_response"
      return content, None
    return None, "endpoint_unavailable"

  def compare(self, prompts, first, second) -> Judgement:
    if not len(prompts) == len(first) == len(second):
      raise ValueError("prompts, first and second must have the same length")
    self.check()
    n = len(prompts)
    pref = np.full(n, np.nan)
    failures = collections.Counter()
    lock = threading.Lock()
    state = {"consecutive": 0, "down": False, "error": None}

    def judge_one(client, i: int) -> None:
      with lock:
        if state["error"] is not None:
          return
        if state["down"]:
          failures["endpoint_down"] += 1
          return
      try:
        answer, reason = self.ask(self.render(str(prompts[i]), str(first[i]), str(second[i])),
                                  client)
      except UserError as e:
        with lock:
          if state["error"] is None:
            state["error"] = e
        return
      with lock:
        if reason is not None:
          failures[reason] += 1
          if reason != "endpoint_unavailable":
            state["consecutive"] = 0
            return
          state["consecutive"] += 1
          if state["consecutive"] >= self.max_consecutive_failures and not state["down"]:
            state["down"] = True
            logging.warning("LLM judge %s: unreachable for %d pairs in a row; the pairs not yet "
                            "sent are counted as failures", self.url, state["consecutive"])
          return
        state["consecutive"] = 0
        choice = parse_preference(answer)
        if choice is None:
          failures["unparseable"] += 1
        else:
          pref[i] = 1.0 if choice == 1 else 0.0

    with _httpx().Client(timeout=self.timeout_s) as client:
      if n:
        judge_one(client, 0)  # NOTE: alone: a refused key or a wrong URL costs one request.
      if self.max_concurrency == 1 or n <= 2:
        for i in range(1, n):
          judge_one(client, i)
      else:
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
          list(pool.map(lambda i: judge_one(client, i), range(1, n)))
    if state["error"] is not None:
      raise state["error"]
    return Judgement(pref, dict(failures))
