"""The realignment server as users drive it: the official `openai` client and httpx on 127.0.0.1.

ONE server (module fixture, in this process: uvicorn in a thread) on the
shared tiny SFT run as both reference and aligned model; every API check runs
against it. The parity test compares served tokens with the decode binary's
rows for the same seeds while other requests, with other lambdas and
settings, come and go.
"""

import concurrent.futures as futures
import json
import random
import socket
import time

import httpx
import openai
import pytest

from realign_jax.plumbing.errors import UserError
from realign_jax.inference.methods_dera import DeRa
from realign_jax.serving import protocol
from realign_jax.serving import server as server_lib

MODEL = "realign-tiny"
PROMPTS = ["the cat sat on the mat and looked at the door", "a storm came over the hills"]


@pytest.fixture(scope="module")
def server(tiny_sft_dir):
  served = server_lib.load(ref_checkpoint=tiny_sft_dir, method=DeRa(aligned_checkpoint=tiny_sft_dir),
                           input_length=96, max_tokens=24, num_slots=8, max_queue=64, max_n=4,
                           lambda_range=(-1.0, 4.0), default_lambda=1.0, model_name=MODEL,
                           deadline_s=60.0)
  bg = server_lib.Background(served, "127.0.0.1", 0)
  yield bg
  bg.stop()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _idle(server, timeout=10.0):
  """Waits until no slot is active and nothing waits; True if so."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    h = httpx.get(f"{server.url}/health", timeout=5).json()
    if h["active_slots"] == 0 and h["queue_depth"] == 0:
      return True
    time.sleep(0.02)
  return False


def test_models_and_lambda_zero_and_one(server, client):
  assert [m.id for m in client.models.list().data] == [MODEL]
  for lam in (0.0, 1.0):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, seed=3,
                                  logprobs=1, extra_body={"realign": {"lambda": lam}})
    choice = r.choices[0]
    extra = choice.model_extra["realign"]
    assert extra["lambda"] == lam and extra["kl"] >= -1e-6
    assert 1 <= len(extra["token_ids"]) <= 8
    assert choice.model_extra["usage"]["completion_tokens"] == len(extra["token_ids"])
    assert r.usage.completion_tokens == len(extra["token_ids"])
    assert len(choice.logprobs.token_logprobs) == len(extra["token_ids"])
    assert choice.finish_reason in ("stop", "length")


def test_served_rows_equal_the_decode_binary_rows(server, client, tiny_sft_dir, tmp_path):
  """Token for token, while requests with other lambdas, temperatures and n come and go."""
  from realign_jax import decode as decode_bin
  from tests.helpers import run_main
  out = tmp_path / "rows.jsonl"
  assert run_main(decode_bin.main, [
      "--gin_file=configs/decode/dera_builtin_tiny.gin", f"--gin.REF_CHECKPOINT='{tiny_sft_dir}'",
      f"--gin.ALIGNED_CHECKPOINT='{tiny_sft_dir}'", f"--gin.OUTPUT_FILE='{out}'",
      "--gin.LAMBDAS=[0.0, 1.0, 2.0]", "--gin.decode.max_prompts=3",
      "--gin.decode.batch_size=3", "--gin.decode.seed=11", "--gin.decode.progress=False"]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 9

  def served(row):
    time.sleep(random.random() * 0.05)
    r = client.completions.create(model=MODEL, prompt=row["prompt"], max_tokens=24, seed=11,
                                  extra_body={"realign": {"lambda": row["lam"],
                                                          "row": row["prompt_index"]}})
    return r.choices[0].model_extra["realign"]

  def noise(i):
    time.sleep(random.random() * 0.05)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[i % 2], max_tokens=4 + i, n=2,
                                  seed=i, temperature=0.7, top_p=0.9,
                                  extra_body={"realign": {"lambda": [-0.5, 0.3, 3.0][i % 3]}})
    return len(r.choices)

  with futures.ThreadPoolExecutor(16) as pool:
    got = [pool.submit(served, row) for row in rows]
    others = [pool.submit(noise, i) for i in range(6)]
    assert [f.result() for f in others] == [2] * 6
    for row, f in zip(rows, got):
      extra = f.result()
      assert extra["token_ids"] == row["tokens"], (row["lam"], row["prompt_index"])
      assert extra["kl"] == pytest.approx(row["kl"], rel=1e-3, abs=1e-4)
  assert _idle(server)


def test_sixteen_concurrent_requests_with_mixed_lambdas(server, client):
  def one(i):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[i % 2], max_tokens=12, seed=i,
                                  extra_body={"realign": {"lambda": [0.0, 0.5, 1.0, 2.0][i % 4]}})
    return r.choices[0].finish_reason
  with futures.ThreadPoolExecutor(16) as pool:
    assert all(f in ("stop", "length") for f in pool.map(one, range(16)))
  metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
  for name in ("realign_queue_depth", "realign_active_slots", "realign_generated_tokens_total",
               "realign_time_to_first_token_seconds_bucket",
               "realign_time_per_output_token_seconds_bucket"):
    assert name in metrics
  tokens = [line for line in metrics.splitlines()
            if line.startswith("realign_generated_tokens_total")]
  assert float(tokens[0].split()[-1]) > 0


def test_streamed_chat_equals_the_whole_answer(server, client):
  msgs = [{"role": "user", "content": PROMPTS[1]}]
  kw = dict(model=MODEL, messages=msgs, max_tokens=10, seed=4,
            extra_body={"realign": {"lambda": 0.5}})
  whole = client.chat.completions.create(**kw)
  text, finish = "", None
  for chunk in client.chat.completions.create(stream=True, **kw):
    if chunk.choices:
      text += chunk.choices[0].delta.content or ""
      finish = chunk.choices[0].finish_reason or finish
  assert text == whole.choices[0].message.content
  assert finish == whole.choices[0].finish_reason


def test_disconnect_frees_the_slot(server):
  body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 24, "stream": True,
          "realign": {"lambda": 1.0}}
  with httpx.Client(timeout=30) as http:
    with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
      assert r.status_code == 200
      next(r.iter_lines())
  assert _idle(server)


def test_queue_full_is_429_and_deadline_is_504(server):
  body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4}
  engine = server.served.engine
  engine.max_queue, saved = 0, engine.max_queue
  try:
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
  finally:
    engine.max_queue = saved
  assert r.status_code == 429 and r.headers["retry-after"] == "1"
  assert r.json()["error"]["type"] == "rate_limit_error"
  server.served.deadline_s, saved = 1e-9, server.served.deadline_s
  try:
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
  finally:
    server.served.deadline_s = saved
  assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
  assert _idle(server)


def test_api_key_and_truncation_warning(server, client):
  """With a key every route but /health needs it; an over-long prompt is cut, and said so."""
  server.served.api_key = "sk-test"
  try:
    assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 401
    assert httpx.get(f"{server.url}/metrics", timeout=5,
                     headers={"Authorization": "Bearer sk-test"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
      client.models.list()
    keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0)
    r = keyed.completions.create(model=MODEL, prompt="word " * 200, max_tokens=2)
  finally:
    server.served.api_key = None
  assert "truncated to its first 95" in r.model_extra["realign"]["warnings"][0]


def _malformed(rng: random.Random):
  """(body bytes, the field the 400 must name, or None for the body itself)."""
  good = {"model": MODEL, "prompt": "hello there", "max_tokens": 4}
  cases = [
      ("max_tokens", rng.choice([0, -1, 25, 10**9, 1.5, "8", True, [4]])),
      ("temperature", rng.choice([-0.1, 2.5, "hot", float("nan"), [1.0], True])),
      ("top_p", rng.choice([0, 0.0, 1.01, -1, "x", None and 0 or {}])),
      ("n", rng.choice([0, 5, 100, 1.0, "2", False])),
      ("seed", rng.choice([-1, 2**40, 0.5, "1", [1]])),
      ("stop", rng.choice([5, [""], ["a"] * 5, [1, 2], {"s": 1}, ""])),
      ("stream", rng.choice(["yes", 1, 0, None and 1 or [], {}])),
      ("logprobs", rng.choice([-1, 6, "1", 1.5, [1]])),
      ("model", rng.choice(["", 3, None, "gpt-4", ["realign"]])),
      ("prompt", rng.choice(["", 7, [], ["a", "b"], {"p": 1}, None])),
      ("realign", rng.choice([1.0, "x", [1.0], {"lam": 1}])),
      ("realign.lambda", rng.choice([float("inf"), float("-inf"), float("nan"), 4.5, -1.5,
                                     "1", [1.0, 2.0], [], True, {"a": 1}])),
      ("realign.row", rng.choice([-1, 0.5, "0", 2**30])),
      ("presence_penalty", rng.choice([0.5, -1, "0", True])),
  ]
  field, value = rng.choice(cases)
  body = dict(good)
  if field.startswith("realign."):
    body["realign"] = {field.split(".")[1]: value}
  elif value is None:
    body.pop(field)
  else:
    body[field] = value
  raw = json.dumps(body, allow_nan=True).encode()
  kind = rng.random()
  if kind < 0.05:
    return raw[: rng.randrange(1, len(raw))], None  # cut JSON
  if kind < 0.08:
    return json.dumps(rng.choice([[1, 2], "text", 3, None])).encode(), None
  return raw, field


def test_fuzz_malformed_requests_are_400_naming_the_field(server):
  rng = random.Random(0)
  with httpx.Client(base_url=server.url, timeout=30) as http:
    for i in range(520):
      raw, field = _malformed(rng)
      chat = field not in (None, "prompt", "logprobs") and i % 3 == 0
      if chat:
        body = json.loads(raw)
        if isinstance(body, dict) and "prompt" in body:
          body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        raw = json.dumps(body).encode()
      r = http.post("/v1/chat/completions" if chat else "/v1/completions", content=raw,
                    headers={"content-type": "application/json"})
      assert r.status_code == 400, (raw[:200], r.text[:300])
      err = r.json()["error"]
      assert err["type"] == "invalid_request_error" and err["message"]
      if field is not None:
        assert err["param"] == field, (raw[:200], err)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
  assert _idle(server)


def test_protocol_limits_checked():
  limits = protocol.Limits(model="m", num_aligned=2, max_tokens=8, max_n=2, lambda_min=0.0,
                           lambda_max=1.0, default_lambda=(0.5, 0.5))
  c = protocol.parse({"model": "m", "prompt": "x", "realign": {"lambda": [0.2, 0.3]}}, limits,
                     chat=False)
  assert c.weights() == pytest.approx([0.5, 0.2, 0.3]) and c.max_tokens == 8
  with pytest.raises(protocol.ProtocolError) as e:
    protocol.parse({"model": "m", "prompt": "x", "realign": {"lambda": 0.2}}, limits, chat=False)
  assert e.value.param == "realign.lambda"


def test_binary_start_up_errors_are_one_line(tiny_sft_dir, tmp_path, capsys):
  """A port in use and a checkpoint that cannot be loaded: one line, exit 2 (in process)."""
  from realign_jax import serve as serve_bin
  from tests.helpers import assert_one_line_error, run_main
  busy = socket.socket()
  busy.bind(("127.0.0.1", 0))
  busy.listen(1)
  port = busy.getsockname()[1]
  base = ["--gin_file=configs/serve/dera_builtin_tiny.gin",
          f"--gin.ALIGNED_CHECKPOINT='{tiny_sft_dir}'"]
  try:
    rc = run_main(serve_bin.main, base + [f"--gin.REF_CHECKPOINT='{tiny_sft_dir}'",
                                          "--host", "127.0.0.1", f"--port={port}"])
  finally:
    busy.close()
  out = capsys.readouterr()
  assert_one_line_error(rc, out.out, out.err, [f"cannot listen on 127.0.0.1:{port}"])
  rc = run_main(serve_bin.main, base + [f"--gin.REF_CHECKPOINT='{tmp_path / 'nowhere'}'",
                                        "--port=0"])
  out = capsys.readouterr()
  assert_one_line_error(rc, out.out, out.err, ["nowhere"])


def test_binary_serves_and_sigterm_finishes_the_request_in_flight(tiny_sft_dir):
  """The one subprocess contract test: --port=0 on 127.0.0.1; SIGTERM mid-stream: the
  stream still ends with [DONE] and the binary exits 0."""
  import signal
  import subprocess
  import sys
  from tests.helpers import REPO_ROOT, binary_env
  proc = subprocess.Popen(
      [sys.executable, "-m", "realign_jax.serve", "--gin_file=configs/serve/dera_builtin_tiny.gin",
       f"--gin.REF_CHECKPOINT='{tiny_sft_dir}'", f"--gin.ALIGNED_CHECKPOINT='{tiny_sft_dir}'",
       "--gin.serve.num_slots=2", "--gin.serve.max_n=2", "--port=0"],
      cwd=REPO_ROOT, env=binary_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.startswith("serving realign-tiny on http://127.0.0.1:"), (line, proc.stderr.read()
                                                                          if not line else "")
    url = line.split()[3]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 24, "stream": True}
    lines = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
      for i, event in enumerate(r.iter_lines()):
        if i == 0:
          proc.send_signal(signal.SIGTERM)
        lines.append(event)
    assert lines[-1] == "data: [DONE]" or "data: [DONE]" in lines, lines[-3:]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
