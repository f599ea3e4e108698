r"""Serving load: concurrent clients with Poisson arrivals against the realignment server.

  python benchmarks/serve.py --json [--clients 16] [--requests 96] [--size t5_tiny]

A server on 127.0.0.1 (uvicorn in a thread of this process, the engine with
`--slots` slots) over two random-weight models of `--size` (reference and
aligned, DeRa logit mixing). Each of `--clients` clients sends its share of
`--requests` streamed completions, waiting an exponential time (mean
`--think_ms`) before each: Poisson arrivals per client. Each request has a
lambda drawn from a grid, a prompt of the built-in corpus, its own seed and
`--max_tokens` tokens at most. The SAME requests (prompts, lambdas, seeds: so
the same tokens) are then sent one at a time through the same engine. Prints
one JSON object: output tokens/s concurrently and one at a time, their ratio
(`throughput_ratio`), time to first token p50 / p99 (client side, first
streamed text), and the requests that failed (any non-200 or error event).
"""

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from realign_jax.data import pipeline  # noqa: E402
from realign_jax.data import vocab as vocab_lib  # noqa: E402
from realign_jax.decoding import dera  # noqa: E402
from realign_jax.models import sizes  # noqa: E402
from realign_jax.models.api import LanguageModel  # noqa: E402
from realign_jax.serving import app as app_lib  # noqa: E402
from realign_jax.serving import engine as engine_lib  # noqa: E402
from realign_jax.serving import protocol  # noqa: E402
from realign_jax.serving import server as server_lib  # noqa: E402
from realign_jax.serving.metrics import Metrics  # noqa: E402

LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
MODEL = "bench"


def build_server(size: str, slots: int, max_tokens: int, input_length: int):
  cfg = sizes.load(size, dropout_rate=0.0)
  lm = LanguageModel(cfg)
  comps = [dera.Component(lm, lm.init(jax.random.PRNGKey(s))[0]) for s in (0, 1)]
  metrics = Metrics()
  engine = engine_lib.Engine(comps, num_slots=slots, max_new_tokens=max_tokens,
                             input_length=input_length, max_queue=4096, metrics=metrics)
  t0 = time.perf_counter()
  engine.warm_up()
  compile_s = time.perf_counter() - t0
  engine.start()
  limits = protocol.Limits(model=MODEL, num_aligned=1, max_tokens=max_tokens, max_n=1,
                           lambda_min=min(LAMBDAS), lambda_max=max(LAMBDAS),
                           default_lambda=(1.0,))
  served = app_lib.Served(engine=engine, vocab=vocab_lib.load_vocabulary(None), limits=limits,
                          input_length=input_length, metrics=metrics, deadline_s=600.0)
  return server_lib.Background(served, "127.0.0.1", 0), compile_s


async def one_request(http, body) -> dict:
  """Streams one completion; {'ok', 'tokens', 'ttft', 'latency'}."""
  t0 = time.perf_counter()
  ttft, tokens, ok = None, 0, True
  async with http.stream("POST", "/v1/completions", json=body) as r:
    if r.status_code != 200:
      await r.aread()
      return {"ok": False, "tokens": 0, "ttft": None, "latency": time.perf_counter() - t0}
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[6:])
      if "error" in event:
        ok = False
        continue
      choice = event["choices"][0]
      if ttft is None and choice.get("text"):
        ttft = time.perf_counter() - t0
      if choice.get("finish_reason") is not None:
        tokens = choice["usage"]["completion_tokens"]
  return {"ok": ok, "tokens": tokens, "ttft": ttft, "latency": time.perf_counter() - t0}


async def run_clients(url, bodies, clients: int, think_s: float, seed: int) -> tuple:
  """`clients` concurrent clients, each its share of `bodies` with exponential waits."""
  rng = random.Random(seed)
  shares = [bodies[c::clients] for c in range(clients)]
  waits = [[rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0 for _ in s] for s in shares]
  limits = httpx.Limits(max_connections=clients + 4)
  async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
    async def client(share, wait):
      out = []
      for body, w in zip(share, wait):
        await asyncio.sleep(w)
        out.append(await one_request(http, body))
      return out
    t0 = time.perf_counter()
    results = await asyncio.gather(*(client(s, w) for s, w in zip(shares, waits)))
    wall = time.perf_counter() - t0
  return [r for rs in results for r in rs], wall


def summarize(results, wall) -> dict:
  ttft = [r["ttft"] for r in results if r["ttft"] is not None]
  tokens = sum(r["tokens"] for r in results)
  return {"requests": len(results), "failed": sum(not r["ok"] for r in results),
          "output_tokens": tokens, "wall_s": round(wall, 3),
          "output_tokens_per_s": round(tokens / wall, 1),
          "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4) if ttft else None,
          "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4) if ttft else None}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--clients", default="16", help="comma-separated client counts, e.g. 16,64")
  p.add_argument("--requests", type=int, default=96)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--size", default="t5_tiny")
  p.add_argument("--max_tokens", type=int, default=24)
  p.add_argument("--input_length", type=int, default=96)
  p.add_argument("--think_ms", type=float, default=20.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true",
                 help="a few seconds' check of the whole path (4 clients, 8 requests, 8 tokens)")
  args = p.parse_args(argv)
  if args.smoke:
    args.clients, args.requests, args.slots, args.max_tokens = "4", 8, 4, 8
  # NOTE: the built-in prompts are longer than input_length - 1: each response says it
  # was truncated (as the decode binary truncates); the log line per request is noise here.
  logging.getLogger().setLevel(logging.ERROR)
  bg, compile_s = build_server(args.size, args.slots, args.max_tokens, args.input_length)
  try:
    rng = random.Random(args.seed)
    prompts = [e["inputs"] for e in pipeline.text_examples("builtin_summarize", "validation")]
    bodies = [{"model": MODEL, "prompt": rng.choice(prompts), "max_tokens": args.max_tokens,
               "seed": i, "stream": True, "realign": {"lambda": rng.choice(LAMBDAS)}}
              for i in range(args.requests)]
    asyncio.run(run_clients(bg.url, bodies[:args.slots], args.slots, 0.0, args.seed))  # warm
    runs = {}
    for clients in [int(c) for c in args.clients.split(",")]:
      results, wall = asyncio.run(run_clients(bg.url, bodies, clients, args.think_ms / 1e3,
                                              args.seed))
      runs[str(clients)] = summarize(results, wall)
    results, wall = asyncio.run(run_clients(bg.url, bodies, 1, 0.0, args.seed))
    alone = summarize(results, wall)
  finally:
    bg.stop()
  for r in runs.values():
    r["throughput_ratio"] = round(r["output_tokens_per_s"] / alone["output_tokens_per_s"], 2)
  out = {"benchmark": "serve", "size": args.size, "slots": args.slots,
         "max_tokens": args.max_tokens, "lambdas": list(LAMBDAS), "think_ms": args.think_ms,
         "compile_s": round(compile_s, 2), "concurrent": runs, "one_at_a_time": alone,
         "throughput_ratio": runs[args.clients.split(",")[0]]["throughput_ratio"],
         "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
         "machine": platform.machine(), "jax": jax.__version__,
         "command": " ".join(["python benchmarks/serve.py", *(sys.argv[1:] if argv is None
                                                               else argv)])}
  print(json.dumps(out, indent=None if args.json else 2))
  return 0 if all(r["failed"] == 0 for r in [*runs.values(), alone]) else 1


if __name__ == "__main__":
  sys.exit(main())
