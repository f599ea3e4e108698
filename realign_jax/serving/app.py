"""The ASGI app (Starlette): OpenAI's completion routes over the engine, models, health, metrics.

  POST /v1/completions, /v1/chat/completions   OpenAI fields + `realign` (protocol.py);
                                               SSE streaming with `stream: true`
  GET  /v1/models, /health, /metrics           (Prometheus text format)

Each choice carries `usage` and `realign`: the lambda, the exact KL of the
response to the reference (the sum over steps of the full-vocabulary KL), the
log-ratio estimate and the token ids. Bad input is a 400 with an OpenAI error
object naming the field; a full queue a 429 with Retry-After; a request past
the server's deadline a 504 (its slots freed). With an API key
(`REALIGN_API_KEY` in the server's environment) every route but /health needs
`Authorization: Bearer <key>`.

Prompts longer than input_length - 1 ids are truncated to their beginning, as
the decode binary truncates them, and the response says so
(`realign.warnings`); a chat prompt rendered with a chat template longer than
input_length is refused (400, `messages`): its end is the generation prompt. Chat messages are joined
(contents, blank line between) into one user message, rendered with the
tokenizer's chat template when the server has one (`serve.chat_template`).
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Optional

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from realign_jax.data import chat as chat_lib
from realign_jax.data import vocab as vocab_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import prompts as prompts_lib
from realign_jax.serving import engine as engine_lib
from realign_jax.serving import protocol
from realign_jax.serving.metrics import Metrics


@dataclasses.dataclass
class Served:
  """What the app serves: the engine, the vocabulary and the request limits."""
  engine: engine_lib.Engine
  vocab: object
  limits: protocol.Limits
  input_length: int
  metrics: Metrics
  chat_template: bool = False
  vocab_path: Optional[str] = None
  deadline_s: Optional[float] = None
  api_key: Optional[str] = None


def error(status: int, message: str, param=None, kind="invalid_request_error", headers=None):
  return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                 "code": None}}, status_code=status, headers=headers)


class _Choice:
  """One choice's tokens and what the engine reported about them."""

  def __init__(self):
    self.tokens, self.logprobs, self.ref_logprobs = [], [], []
    self.kl = 0.0
    self.finish = None
    self.error = None
    self.sent = ""  # text already streamed


class _Api:
  """The routes over `served` (its engine already started)."""

  def __init__(self, served: Served):
    self.s = served

  def authorized(self, req: HttpRequest) -> bool:
    if not self.s.api_key:
      return True
    given = req.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {self.s.api_key}".encode())

  def answered(self, resp):
    self.s.metrics.requests.labels(str(resp.status_code)).inc()
    return resp

  async def models(self, req):
    if not self.authorized(req):
      return error(401, "a valid API key is required", kind="authentication_error")
    lim = self.s.limits
    return JSONResponse({"object": "list", "data": [{
        "id": lim.model, "object": "model", "created": 0, "owned_by": "realign_jax",
        "realign": {"aligned_models": lim.num_aligned,
                    "lambda_range": [lim.lambda_min, lim.lambda_max],
                    "default_lambda": list(lim.default_lambda), "max_tokens": lim.max_tokens,
                    "max_n": lim.max_n}}]})

  async def health(self, req):
    return JSONResponse({"status": "ok", "active_slots": self.s.engine.active_slots,
                         "queue_depth": self.s.engine.queue_depth})

  async def metrics(self, req):
    if not self.authorized(req):
      return error(401, "a valid API key is required", kind="authentication_error")
    body, ctype = self.s.metrics.exposition()
    return Response(body, media_type=ctype)

  async def completions(self, req):
    return self.answered(await self._complete(req, chat=False))

  async def chat_completions(self, req):
    return self.answered(await self._complete(req, chat=True))

  def encode(self, comp: protocol.Completion) -> tuple:
    """(ids [input_length], warnings): as the decode binary encodes its prompts."""
    if comp.messages is None:
      text, param = comp.prompt, "prompt"
    else:
      text, param = "\n\n".join(c for _, c in comp.messages), "messages"
    if comp.messages is not None and self.s.chat_template:
      text = chat_lib.render_prompts(self.s.vocab_path, [text])[0]
    chat = self.s.chat_template and comp.messages is not None
    n_ids, room = len(vocab_lib.encode(self.s.vocab, text)), self.s.input_length - 1
    warnings = []
    if n_ids > self.s.input_length and chat:
      # NOTE: a rendered chat prompt ends with the generation prompt: never cut.
      raise protocol.ProtocolError(param, f"'{param}' is {n_ids} tokens after the chat "
                                          f"template, more than the server's input_length "
                                          f"{self.s.input_length}")
    if n_ids > room and not chat:
      warnings.append(f"the prompt is {n_ids} tokens; it was truncated to its first {room} "
                      f"(input_length {self.s.input_length}), as the decode binary does")
    try:
      ids = prompts_lib.encode_prompts(self.s.vocab, [text], self.s.input_length, chat=chat)[0]
    except UserError as e:
      raise protocol.ProtocolError(param, str(e).splitlines()[0]) from e
    return ids, warnings

  async def _complete(self, req, chat: bool):
    if not self.authorized(req):
      return error(401, "a valid API key is required", kind="authentication_error")
    try:
      body = json.loads(await req.body())
    except (ValueError, UnicodeDecodeError):
      return error(400, "the request body is not valid JSON")
    try:
      comp = protocol.parse(body, self.s.limits, chat=chat)
      ids, warnings = self.encode(comp)
    except protocol.ProtocolError as e:
      return JSONResponse(e.body(), status_code=400)
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    choices = [_Choice() for _ in range(comp.n)]

    def on_event(kind, j, payload):
      loop.call_soon_threadsafe(events.put_nowait, (kind, j, payload))

    stop_check = None
    if comp.stop:
      def stop_check(j, tokens):
        return protocol.stop_index(vocab_lib.decode(self.s.vocab, tokens), comp.stop) >= 0
    request = engine_lib.Request(
        inputs=ids, n=comp.n, max_tokens=comp.max_tokens, temperature=comp.temperature or 1.0,
        top_p=comp.top_p, greedy=comp.greedy, weights=comp.weights(), seed=comp.seed,
        row=comp.row, on_event=on_event, stop_check=stop_check,
        deadline=None if not self.s.deadline_s else time.monotonic() + self.s.deadline_s)
    try:
      self.s.engine.submit(request)
    except engine_lib.QueueFull as e:
      return error(429, f"{e}; retry later", kind="rate_limit_error",
                   headers={"Retry-After": "1"})
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": self.s.limits.model}
    if warnings:
      meta["realign"] = {"warnings": warnings}
    prompt_tokens = int(np.sum(ids != self.s.engine.tokens.pad_id))
    if comp.stream:
      gen = self._stream(request, events, choices, comp, chat, meta, prompt_tokens)
      return StreamingResponse(gen, media_type="text/event-stream")
    try:
      while any(c.finish is None and c.error is None for c in choices):
        try:
          _apply(choices, await asyncio.wait_for(events.get(), 0.25))
        except asyncio.TimeoutError:
          if await req.is_disconnected():
            return Response(status_code=499)  # NOTE: nobody reads it; the slots are freed below
    finally:
      if any(c.finish is None and c.error is None for c in choices):
        request.cancel()
    failed = [c.error for c in choices if c.error]
    if failed:
      timeout = "deadline" in failed[0]
      return error(504 if timeout else 500, failed[0], kind="timeout" if timeout else
                   "server_error")
    return JSONResponse(self._response(choices, comp, chat, meta, prompt_tokens))

  async def _stream(self, request, events, choices, comp, chat, meta, prompt_tokens):
    obj = "chat.completion.chunk" if chat else "text_completion"
    try:
      if chat:
        for j in range(comp.n):
          yield _sse(dict(meta, object=obj, choices=[{"index": j, "delta": {
              "role": "assistant", "content": ""}, "finish_reason": None}]))
      while any(c.finish is None and c.error is None for c in choices):
        kind, j, payload = await events.get()
        _apply(choices, (kind, j, payload))
        c = choices[j]
        if c.error:
          yield _sse({"error": {"message": c.error, "type": "timeout" if "deadline" in
                                c.error else "server_error", "param": None, "code": None}})
          continue
        text = self._text(c, comp)
        delta, c.sent = text[len(c.sent):] if text.startswith(c.sent) else "", text
        part = ({"delta": {"content": delta}} if chat else {"text": delta, "logprobs": None})
        part = dict(part, index=j, finish_reason=c.finish)
        if c.finish is not None:
          part.update(self._choice_extra(c, comp, prompt_tokens))
        if delta or c.finish is not None:
          yield _sse(dict(meta, object=obj, choices=[part]))
      yield "data: [DONE]\n\n"
    finally:
      # NOTE: a client that went away (the generator closed) frees its slots
      # within one decoding step.
      if any(c.finish is None and c.error is None for c in choices):
        request.cancel()

  def _text(self, c: _Choice, comp) -> str:
    text = vocab_lib.decode(self.s.vocab, c.tokens)
    if comp.stop:
      cut = protocol.stop_index(text, comp.stop)
      if cut >= 0:
        text = text[:cut]
    return text

  def _choice_extra(self, c: _Choice, comp, prompt_tokens) -> dict:
    n = len(c.tokens)
    return {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                      "total_tokens": prompt_tokens + n},
            "realign": {"lambda": comp.lambda_value(), "kl": c.kl,
                        "log_ratio": float(np.sum(np.asarray(c.logprobs) -
                                                  np.asarray(c.ref_logprobs))) if n else 0.0,
                        "token_ids": list(c.tokens)}}

  def _logprobs(self, c: _Choice, chat: bool):
    pieces = [vocab_lib.decode(self.s.vocab, [t]) for t in c.tokens]
    if chat:
      return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()),
                           "top_logprobs": []} for p, lp in zip(pieces, c.logprobs)]}
    offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist() if pieces else []
    return {"tokens": pieces, "token_logprobs": list(c.logprobs), "top_logprobs": None,
            "text_offset": offsets}

  def _response(self, choices, comp, chat, meta, prompt_tokens) -> dict:
    out = []
    for j, c in enumerate(choices):
      text = self._text(c, comp)
      lp = self._logprobs(c, chat) if comp.logprobs else None
      if chat:
        choice = {"index": j, "message": {"role": "assistant", "content": text},
                  "finish_reason": c.finish, "logprobs": lp}
      else:
        choice = {"index": j, "text": text, "finish_reason": c.finish, "logprobs": lp}
      choice.update(self._choice_extra(c, comp, prompt_tokens))
      out.append(choice)
    completion = sum(len(c.tokens) for c in choices)
    return dict(meta, object="chat.completion" if chat else "text_completion", choices=out,
                usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                       "total_tokens": prompt_tokens + completion})

  async def http_error(self, req, exc):
    return error(exc.status_code, str(exc.detail), kind="invalid_request_error")

  async def server_error(self, req, exc):
    logging.exception("request failed", exc_info=exc)
    return error(500, "internal server error", kind="server_error")

  def app(self) -> Starlette:
    routes = [Route("/v1/completions", self.completions, methods=["POST"]),
              Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
              Route("/v1/models", self.models, methods=["GET"]),
              Route("/health", self.health, methods=["GET"]),
              Route("/metrics", self.metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: self.http_error,
                                                        Exception: self.server_error})


def create_app(served: Served) -> Starlette:
  """The Starlette app over `served` (its engine already started)."""
  return _Api(served).app()


def _apply(choices, event) -> None:
  kind, j, payload = event
  c = choices[j]
  if kind == "token":
    c.tokens.append(payload["token"])
    c.logprobs.append(payload["logprob"])
    c.ref_logprobs.append(payload["ref_logprob"])
    c.kl += payload["kl"]
  elif kind == "finish":
    c.finish = "stop" if payload["reason"] in ("stop", "cancelled") else payload["reason"]
  else:
    c.error = payload["message"]


def _sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"
