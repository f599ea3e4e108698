"""The LLM judge client (httpx) against a chat-completions server this test starts
on 127.0.0.1 (standard library; bounded number of requests; stops by itself)."""

import http.server
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import judges
from realign_jax.evaluation import win_rate as wr

KEY = "sk-test-secret-0123456789"
MAX_REQUESTS = 200  # the server refuses to serve more than this, whatever the client does
LIFETIME_S = 120.0  # and shuts itself down after this long


class _Handler(http.server.BaseHTTPRequestHandler):
  """Answers from `server.script`: a callable (request doc) -> (status, body bytes[, headers]).

  Counts requests and the most that were in flight at once.
  """

  def do_POST(self):  # noqa: N802 (http.server's naming)
    srv = self.server
    with srv.lock:
      srv.count += 1
      srv.in_flight += 1
      srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
    try:
      length = int(self.headers.get("Content-Length", 0))
      doc = json.loads(self.rfile.read(length))
      srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                           "doc": doc})
      out = (503, b"too many requests for this test") if srv.count > MAX_REQUESTS else (
          srv.script(doc))
    finally:
      with srv.lock:
        srv.in_flight -= 1
    status, body = out[:2]
    self.send_response(status)
    for k, v in (out[2] if len(out) > 2 else {}).items():
      self.send_header(k, v)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    del args


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  # NOTE: urllib honours proxy variables; the test traffic must stay on 127.0.0.1.
  for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
               "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def server():
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.daemon_threads = True
  srv.count, srv.requests, srv.script = 0, [], None
  srv.lock, srv.in_flight, srv.max_in_flight = threading.Lock(), 0, 0
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  timer = threading.Timer(LIFETIME_S, srv.shutdown)
  timer.daemon = True
  timer.start()
  srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
  yield srv
  timer.cancel()
  srv.shutdown()
  srv.server_close()
  thread.join(timeout=5)


def _reply(content) -> tuple:
  return 200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                   "content": content}}]}).encode()


def _prefers_good(doc):
  """The summary containing GOOD wins; answers as '1' or 'Summary 2'."""
  text = doc["messages"][0]["content"]
  s1 = text.index("Summary 1 - ")
  s2 = text.index("Summary 2 - ")
  return _reply("1" if "GOOD" in text[s1:s2] else "Summary 2")


def _judge(url, **kw):
  kw.setdefault("max_concurrency", 1)  # NOTE: scripted answers arrive in order
  j = judges.LLMJudge(url=url, model="rater", api_key=KEY, initial_backoff_s=0.01,
                      timeout_s=5.0, **kw)
  j.delays = []
  j.sleep = j.delays.append  # record the backoff instead of sleeping
  return j


def test_good_answers_swapped_back(server, caplog):
  server.script = _prefers_good
  judge = _judge(server.url, max_concurrency=4)
  n = 24
  prompts = [f"text {i} with {{braces}}" for i in range(n)]
  caplog.set_level(logging.DEBUG)
  out = wr.win_rate(judge, prompts, [f"GOOD {i}" for i in range(n)],
                    [f"bad {i}" for i in range(n)], seed=0)
  assert out["win_rate"] == 1.0 and out["num_judged"] == n and out["failures"] == {}
  assert 0 < out["num_swapped"] < n  # both orders were shown
  out = wr.win_rate(judge, prompts, ["bad"] * n, ["GOOD"] * n, seed=1)
  assert out["win_rate"] == 0.0
  req = server.requests[0]
  assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
  assert req["doc"]["model"] == "rater" and req["doc"]["temperature"] == 0.0
  text = req["doc"]["messages"][0]["content"]
  assert text.startswith("You are an expert summary rater.") and "{braces}" in text
  assert text.endswith("Preferred Summary -")
  # The key is never in the judge's repr, its description or the logs.
  assert KEY not in repr(judge) and KEY not in json.dumps(judge.describe())
  assert KEY not in caplog.text and KEY not in json.dumps(out)


def test_garbage_answers_are_counted_not_guessed(server):
  answers = iter([_reply("1"), _reply("maybe"), _reply("1 or 2"), (200, b"<html>oops</html>"),
                  (200, b'{"choices": []}'), _reply("2."), _reply(None), _reply("12")])
  server.script = lambda doc: next(answers)
  judge = _judge(server.url)
  res = judge.compare(["t"] * 8, ["a"] * 8, ["b"] * 8)
  np.testing.assert_array_equal(res.preference, [1, np.nan, np.nan, np.nan, np.nan, 0, np.nan,
                                                 np.nan])
  assert res.failures == {"unparseable": 3, "malformed_response": 3}
  assert judge.delays == []  # a garbage answer is not retried
  out = wr.summarize(res.preference, res.failures)
  assert out["num_failed"] == 6 and out["num_judged"] == 2 and out["win_rate"] == 0.5


def test_server_errors_then_success_back_off_exponentially(server):
  answers = iter([(500, b"boom"), (502, b"bad gateway"), (429, b"slow down"), _reply("2")])
  server.script = lambda doc: next(answers)
  judge = _judge(server.url, max_retries=4)
  res = judge.compare(["t"], ["a"], ["b"])
  assert res.preference.tolist() == [0.0] and res.failures == {}
  assert judge.delays == pytest.approx([0.01, 0.02, 0.04])
  assert server.count == 4
  # Retries run out: counted as an unavailable endpoint.
  server.script = lambda doc: (500, b"boom")
  res = _judge(server.url, max_retries=2).compare(["t"], ["a"], ["b"])
  assert res.failures == {"endpoint_unavailable": 1} and np.isnan(res.preference[0])
  # Another client error (a wrong path) is this pair's failure, not retried.
  server.script = lambda doc: (404, b'{"error": "no such route"}')
  judge = _judge(server.url)
  res = judge.compare(["t"], ["a"], ["b"])
  assert res.failures == {"http_404": 1} and judge.delays == []


def test_refused_credentials_stop_at_the_first_pair(server):
  server.script = lambda doc: (401, b'{"error": "invalid api key"}')
  judge = _judge(server.url, max_concurrency=4)
  with pytest.raises(UserError) as e:
    judge.compare(["t"] * 20, ["a"] * 20, ["b"] * 20)
  assert server.count == 1  # exactly one request, although four may be in flight
  msg = str(e.value)
  assert len(msg.splitlines()) == 1 and "HTTP 401" in msg and judges.KEY_ENV in msg
  assert KEY not in msg and judge.delays == []
  # A 403 after some good answers: the pairs after it are not sent.
  answers = iter([_reply("1"), _reply("2"), (403, b"forbidden")])
  server.script = lambda doc: next(answers)
  before = server.count
  with pytest.raises(UserError, match="HTTP 403"):
    _judge(server.url).compare(["t"] * 10, ["a"] * 10, ["b"] * 10)
  assert server.count - before == 3


def test_retry_after_is_honoured(server):
  answers = iter([(429, b"slow down", {"Retry-After": "7"}),
                  (503, b"busy", {"Retry-After": "1.5"}),
                  (503, b"busy", {"Retry-After": "soon"}),  # unparseable: the backoff
                  (429, b"slow down", {"Retry-After": "100000"}),  # capped
                  _reply("1")])
  server.script = lambda doc: next(answers)
  judge = _judge(server.url, max_retries=4, max_retry_after_s=60.0)
  res = judge.compare(["t"], ["a"], ["b"])
  assert res.preference.tolist() == [1.0] and res.failures == {}
  assert judge.delays == pytest.approx([7.0, 1.5, 0.04, 60.0])
  now = 1_000_000_000.0
  date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
  assert judges.parse_retry_after(date, now=now) == pytest.approx(30.0)
  assert judges.parse_retry_after(None) is None


def test_concurrency_is_bounded(server):
  def slow(doc):
    time.sleep(0.1)
    return _prefers_good(doc)
  server.script = slow
  judge = _judge(server.url, max_concurrency=3)
  n = 13
  res = judge.compare(["t"] * n, ["GOOD"] * n, ["bad"] * n)
  assert res.preference.tolist() == [1.0] * n and server.count == n
  assert 2 <= server.max_in_flight <= 3


def test_down_endpoint_counts_failures_and_stops_early():
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()  # nothing listens there now
  judge = _judge(f"http://127.0.0.1:{port}", max_retries=1, max_consecutive_failures=3)
  n = 10
  out = wr.win_rate(judge, ["t"] * n, ["a"] * n, ["b"] * n)
  assert out["win_rate"] is None and out["num_failed"] == n and out["num_judged"] == 0
  assert out["failures"] == {"endpoint_unavailable": 3, "endpoint_down": 7}
  assert judge.delays == pytest.approx([0.01] * 3)


def test_evaluate_reports_a_down_judge_in_the_summary(tmp_path):
  from realign_jax import evaluate as evaluate_bin
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()
  paths = []
  for name, lam in (("a", 1.0), ("b", None)):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"doc {i}", "response": f"{name} {i}",
                                        "lam": lam, "kl": 0.1, "log_ratio": 0.2}) + "\n"
                            for i in range(4)))
    paths.append(str(path))
  judge = _judge(f"http://127.0.0.1:{port}", max_retries=0, max_consecutive_failures=2)
  out = tmp_path / "eval.json"
  evaluate_bin.evaluate(decode_files=[paths[0]], compare_file=paths[1], judge=judge,
                        output_file=str(out))
  doc = json.loads(out.read_text())
  (res,) = doc["win_rates"]
  assert res["win_rate"] is None and res["num_pairs"] == 4 and res["num_failed"] == 4
  assert res["failures"] == {"endpoint_unavailable": 2, "endpoint_down": 2}
  assert doc["judge"]["type"] == "llm" and KEY not in out.read_text()


def test_configuration_from_the_environment(monkeypatch, server):
  monkeypatch.setenv(judges.URL_ENV, server.url + "/chat/completions")
  monkeypatch.setenv(judges.MODEL_ENV, "env-model")
  monkeypatch.setenv(judges.KEY_ENV, "env-key")
  server.script = _prefers_good
  judge = judges.LLMJudge()
  assert judge.url == server.url + "/chat/completions"
  assert judge.compare(["t"], ["GOOD"], ["bad"]).preference.tolist() == [1.0]
  assert server.requests[-1]["auth"] == "Bearer env-key"
  assert server.requests[-1]["doc"]["model"] == "env-model"
  assert "env-key" not in repr(judge)
  monkeypatch.delenv(judges.URL_ENV)
  with pytest.raises(UserError, match="no endpoint URL"):
    judges.LLMJudge().compare(["t"], ["a"], ["b"])
  with pytest.raises(UserError, match="must be http"):
    judges.LLMJudge(url="ftp://127.0.0.1/x").check()
  with pytest.raises(UserError, match="lacks"):
    judges.LLMJudge(url=server.url, template="Which is better? {summary1} {summary2}")


def test_parse_preference():
  assert judges.parse_preference("1") == 1
  assert judges.parse_preference(" Summary 2.\n") == 2
  assert judges.parse_preference("2 - it is shorter") == 2
  for garbage in ("", "maybe", "1 or 2", "12", "0.1", "Summary 3"):
    assert judges.parse_preference(garbage) is None


def test_reward_judge():
  judge = judges.RewardJudge(lambda p, r: [len(x) for x in r], name="len", tie_tolerance=0.5)
  res = judge.compare(["x"] * 3, ["aa", "a", "ab"], ["a", "aa", "cd"])
  assert res.preference.tolist() == [1.0, 0.0, 0.5] and res.failures == {}
  with pytest.raises(UserError, match="2 scores for 3"):
    judges.RewardJudge(lambda p, r: [0.0, 1.0]).compare(["x"] * 3, ["a"] * 3, ["b"] * 3)

  class _Reward:
    name = "gold"

    def score(self, prompts, responses):
      return np.zeros(len(responses))
  assert judges.RewardJudge(_Reward()).describe()["name"] == "gold"
