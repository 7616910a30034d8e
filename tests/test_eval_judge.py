"""CMB-Clin judged as the CMB README's GPT-4 protocol: reply parsing, the OpenAI-compatible endpoint
(a local HTTP server speaking chat completions), and judging that survives interruption."""

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from configs.eval import cmb_clin as cmb_clin_config
from csft_jax import evaluate
from csft_jax.configuration import resolve_path
from csft_jax.eval import cmb_clin, judge, runner
from tests.test_evaluate_cli import REPO, _config, model_dir  # noqa: F401  (a fixture)

OFFICIAL_EXAMPLE = (
  "{ \u2018 fluency \u2019: 3 , \u2018 relevance \u2019: 3 , \u2018 completeness \u2019: 3 , "
  "\u2018 proficiency \u2019: 3}"
)


@pytest.mark.parametrize(
  "reply, ratings",
  [
    (OFFICIAL_EXAMPLE, (3, 3, 3, 3)),  # the prompt's own example: curly quotes, spaces inside
    ('{"fluency": 5, "relevance": 4, "completeness": 3, "proficiency": 2}', (5, 4, 3, 2)),
    ("{'fluency': 4, 'relevance': 4, 'completeness': 4, 'proficiency': 5}", (4, 4, 4, 5)),
    ('Evaluation:\n```json\n{"Fluency": 5, "Relevance": 5, "Completeness": 4, "Proficiency": 4}\n```', (5, 5, 4, 4)),
    (
      '{"fluency": 5, "relevance": 4, "completeness": 3, "proficiency": 2} again '
      '{"fluency": 5, "relevance": 4, "completeness": 3, "proficiency": 2}',
      (5, 4, 3, 2),
    ),
    # Malformed: never guessed.
    ('{"fluency": 6, "relevance": 4, "completeness": 3, "proficiency": 2}', None),  # off the scale
    ('{"fluency": "5", "relevance": 4, "completeness": 3, "proficiency": 2}', None),  # not an integer
    ('{"fluency": 4.5, "relevance": 4, "completeness": 3, "proficiency": 2}', None),
    ('{"fluency": 5, "relevance": 4, "completeness": 3}', None),  # a dimension missing
    (
      '{"fluency": 5, "relevance": 4, "completeness": 3, "proficiency": 2} or '
      '{"fluency": 1, "relevance": 4, "completeness": 3, "proficiency": 2}',
      None,
    ),  # two that disagree
    ("fluency: 5, relevance: 4, completeness: 3, proficiency: 2", None),  # no object
    ('{"fluency": 5, "relevance": 4,', None),  # cut off
    ("", None),
  ],
)
def test_parse_judgment(reply, ratings):
  expected = None if ratings is None else dict(zip(cmb_clin.DIMENSIONS, ratings))
  assert cmb_clin.parse_judgment(reply) == expected


def test_summary_means_leave_unreadable_replies_out():
  judged = [{"scores": dict(zip(cmb_clin.DIMENSIONS, r))} for r in ((5, 4, 3, 2), (3, 4, 5, 2))] + [{"scores": None}]
  summary = cmb_clin.summarize_judgments(judged, "j")
  assert summary == {
    "judge": "j",
    "n_judged": 3,
    "n_unparsed": 1,
    "fluency": 4.0,
    "relevance": 4.0,
    "completeness": 4.0,
    "proficiency": 2.0,
    "avg": 3.5,
  }


class _Server(http.server.ThreadingHTTPServer):
  """A chat-completions endpoint on 127.0.0.1: `behave(n)` says what its n-th request (1-based) gets:
  a reply text, ('status', code), or ('sleep', seconds)."""

  daemon_threads, block_on_close = True, False  # a sleeping handler does not hold the test up

  def __init__(self, behave):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.behave, self.seen, self.lock = behave, [], threading.Lock()

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with self.server.lock:
      self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
      action = self.server.behave(len(self.server.seen))
    if isinstance(action, tuple) and action[0] == "sleep":
      time.sleep(action[1])
      action = OFFICIAL_EXAMPLE
    if isinstance(action, tuple):
      payload, code = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, action[1]
    else:
      payload, code = (
        {
          "id": "x",
          "object": "chat.completion",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": action}, "finish_reason": "stop"}],
        },
        200,
      )
    data = json.dumps(payload).encode()
    try:
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client gave up waiting (the timeout case)

  def log_message(self, *args):
    pass


@pytest.fixture
def serve():
  servers = []

  def start(behave):
    server = _Server(behave)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return server

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


REPLIES = [
  '{"fluency": 5, "relevance": 4, "completeness": 3, "proficiency": 2}',
  OFFICIAL_EXAMPLE,
  "The answer is fine.",
  '{"fluency": 4, "relevance": 4, "completeness": 4, "proficiency": 4}',
  '{"fluency": 5, "relevance": 5, "completeness": 5, "proficiency": 5}',
]


def _judged_config(model, out_dir, url, **judge_fields):
  config = _config(cmb_clin_config, model, out_dir, max_new_tokens=4)
  config.judge.update(endpoint=url, api_key_env="CSFT_TEST_JUDGE_KEY", retries=0, **judge_fields)
  return config


def test_endpoint_judges_each_answer_once_across_an_interruption(model_dir, tmp_path, serve, monkeypatch):  # noqa: F811
  monkeypatch.setenv("CSFT_TEST_JUDGE_KEY", "sk-test")
  failing = serve(lambda n: REPLIES[n - 1] if n <= 2 else ("status", 503))
  with pytest.raises(judge.JudgeError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 503"):
    evaluate.run(_judged_config(model_dir, tmp_path, failing.url))
  assert not (tmp_path / "results.json").exists()  # no partial results
  kept = (tmp_path / "judge.jsonl").read_text(encoding="utf-8").splitlines()
  assert len(kept) == 1 + 2  # the fingerprint, then the two answers judged before the failure

  failing.behave = lambda n: REPLIES[n - 2]  # the endpoint recovers: requests 4-6 get replies 2-4
  config = _judged_config(model_dir, tmp_path, failing.url)
  results, text, _ = evaluate.run(config)
  assert len(failing.seen) == 3 + 3  # the 3 answers left, each judged once
  records = results["records"]
  requests = [seen["body"] for seen in failing.seen[:2] + failing.seen[3:]]
  # Each request is the README's prompt filled for that answer, sent as one user message.
  case_of = {case["id"]: case for case in cmb_clin.load_clin(resolve_path(config.clin))}
  assert [r["messages"] for r in requests] == [
    [{"role": "user", "content": cmb_clin.judge_prompt(case_of[r["id"]], r["turn"], r["answer"])}] for r in records
  ]
  assert {(r["model"], r["temperature"]) for r in requests} == {("gpt-4", 0.0)}
  assert {seen["path"] for seen in failing.seen} == {"/v1/chat/completions"}
  assert {seen["auth"] for seen in failing.seen} == {"Bearer sk-test"}
  # Replies, ratings, means: the unreadable reply is counted, not guessed.
  assert [r["judge"]["reply"] for r in records] == REPLIES
  assert [r["judge"]["scores"] for r in records] == [cmb_clin.parse_judgment(reply) for reply in REPLIES]
  judgments = results["summary"]["judgments"]
  assert (judgments["n_judged"], judgments["n_unparsed"]) == (5, 1)
  assert judgments["fluency"] == (5 + 3 + 4 + 5) / 4 and judgments["avg"] == pytest.approx((4.25 + 4 + 3.75 + 3.5) / 4)
  assert judgments["judge"] == f"gpt-4 @ {failing.url}"
  assert "judge avg (1-5)" in text and "1 replies unreadable" in text
  cells = cmb_clin.BENCHMARK.report_cells(json.loads((tmp_path / "results.json").read_text(encoding="utf-8")))
  assert cells["judge/avg"] == judgments["avg"] and cells["judge/n_unparsed"] == 1
  journal = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text(encoding="utf-8").splitlines()]
  assert [e["key"] for e in journal[1:]] == [f"{r['id']}/{r['turn']}" for r in records]
  # A rerun judges nothing again and writes the same results.
  again, _, _ = evaluate.run(config)
  assert len(failing.seen) == 6 and again["summary"]["judgments"] == judgments


def test_kept_replies_are_read_again_by_the_current_parser(tmp_path):
  """judge.jsonl keeps each reply; its scores are read from the reply on every run, so a reading
  fixed since (here: the noted scores were wrong) applies without judging again."""
  config = cmb_clin_config.get_config()
  config.judge.update(endpoint="http://127.0.0.1:9/v1", endpoint_model="gpt-4")  # never called
  journal = judge.JudgeJournal(str(tmp_path / "judge.jsonl"), judge.fingerprint(config))
  journal.add("1/0", "prompt", judge.describe(config), REPLIES[0], {"fluency": 1})
  journal.close()
  (record,) = judge.judge_all(config, [("1/0", "prompt")], cmb_clin.parse_judgment, str(tmp_path))
  assert record["reply"] == REPLIES[0] and record["scores"] == cmb_clin.parse_judgment(REPLIES[0]) != {"fluency": 1}


def test_endpoint_refusal_timeout_and_missing_key_are_one_line_errors(model_dir, tmp_path, serve, monkeypatch):  # noqa: F811
  refusing = serve(lambda n: ("status", 401))
  config = _judged_config(model_dir, tmp_path / "a", refusing.url)
  with pytest.raises(judge.JudgeError, match="'CSFT_TEST_JUDGE_KEY': that environment variable is not set"):
    runner.validate_config(config)  # before any model loads
  monkeypatch.setenv("CSFT_TEST_JUDGE_KEY", "sk-wrong")
  endpoint = judge.Endpoint.from_config(config)
  with pytest.raises(judge.JudgeError, match=r"refused the request: HTTP 401 Unauthorized: Incorrect API key provided"):
    endpoint.reply("hello")
  slow = serve(lambda n: ("sleep", 2.0))
  config = _judged_config(model_dir, tmp_path / "b", slow.url, timeout_s=0.3)
  with pytest.raises(judge.JudgeError, match=r"no reply within 0\.3s \(config\.judge\.timeout_s\), 1 tries"):
    judge.Endpoint.from_config(config).reply("hello")
  for field, value, message in (
    ("temperature", -0.5, r"config\.judge\.temperature=-0\.5 must be >= 0"),
    ("timeout_s", 0.0, r"config\.judge\.timeout_s=0\.0 must be > 0"),
    ("retries", -1, r"config\.judge\.retries=-1 must be >= 0"),
  ):
    bad = _judged_config(model_dir, tmp_path / "c", slow.url)
    bad.judge[field] = value
    with pytest.raises(judge.JudgeError, match=message):
      runner.validate_config(bad)  # before any model loads, not after the answers
  config.judge.model = "/nonexistent"
  with pytest.raises(judge.JudgeError, match="choose one judge"):
    runner.validate_config(config)


def test_cli_judged_by_a_local_model_resumes_and_refuses_a_judge_without_template(model_dir, tmp_path):  # noqa: F811
  """As the README says to run it: `evaluate` with `--config.judge.model`; a rerun judges nothing again."""
  out = tmp_path / "clin"

  def evaluate_cli(judge_model):
    command = [
      sys.executable,
      "-m",
      "csft_jax.evaluate",
      "--config=configs/eval/cmb_clin.py",
      f"--config.checkpoint={model_dir}",
      f"--config.judge.model={judge_model}",
      "--config.max_new_tokens=4",
      "--config.judge.max_new_tokens=8",
      "--config.batch_size=8",
      f"--config.out_dir={out}",
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)

  done = evaluate_cli(model_dir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "judge:" in done.stderr  # its progress bar
  results = json.loads((out / "results.json").read_text(encoding="utf-8"))
  journal = (out / "judge.jsonl").read_text(encoding="utf-8")
  entries = [json.loads(line) for line in journal.splitlines()[1:]]
  records = results["records"]
  assert [e["key"] for e in entries] == [f"{r['id']}/{r['turn']}" for r in records] and len(records) == 5
  assert [r["judge"]["reply"] for r in records] == [e["reply"] for e in entries]
  assert [r["judge"]["scores"] for r in records] == [cmb_clin.parse_judgment(e["reply"]) for e in entries]
  judgments = results["summary"]["judgments"]
  assert judgments["judge"] == model_dir and judgments["n_judged"] == 5
  assert judgments["n_unparsed"] == sum(e["scores"] is None for e in entries)  # a random model's replies
  assert "judge avg (1-5)" in done.stdout

  again = evaluate_cli(model_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (out / "judge.jsonl").read_text(encoding="utf-8") == journal  # nothing judged twice
  rerun = json.loads((out / "results.json").read_text(encoding="utf-8"))
  assert rerun["records"] == records and rerun["summary"]["judgments"] == judgments
  assert rerun["summary"]["counts"]["compilations"] == 0  # the answers came from the journal too

  no_template = tmp_path / "no_template"
  shutil.copytree(model_dir, no_template)
  config = json.loads((no_template / "tokenizer_config.json").read_text(encoding="utf-8"))
  config.pop("chat_template", None)  # transformers 5 writes it to chat_template.jinja
  (no_template / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  for name in ("chat_template.jinja", "chat_template.json"):
    (no_template / name).unlink(missing_ok=True)
  refused = evaluate_cli(no_template)
  assert refused.returncode == 1
  error = refused.stderr.strip().splitlines()
  assert error[-2].startswith(f"error: config.judge.model='{no_template}': chat_template='hf' but tokenizer")
  assert "--config.judge.chat_template" in error[-2]


def test_ctrl_c_while_judging_keeps_what_was_judged_and_a_rerun_judges_the_rest(
  model_dir, tmp_path, serve, monkeypatch
):  # noqa: F811
  monkeypatch.setenv("CSFT_TEST_JUDGE_KEY", "sk-test")

  def interrupt_at_the_second(n):
    if n == 2:  # Ctrl-C while the second answer's judgment is on its way
      os.kill(os.getpid(), signal.SIGINT)
    return REPLIES[n - 1]

  server = serve(interrupt_at_the_second)
  config = _judged_config(model_dir, tmp_path, server.url)
  outcome, text, _ = evaluate.run(config)
  assert isinstance(outcome, evaluate.Interrupted) and outcome.signal_name == "SIGINT"
  assert "2 of 5 prompts done" in text and "Rerun the same command to continue" in text
  assert not (tmp_path / "results.json").exists()
  assert len((tmp_path / "judge.jsonl").read_text(encoding="utf-8").splitlines()) == 1 + 2
  server.behave = lambda n: REPLIES[n - 1]
  results, _, _ = evaluate.run(config)
  assert len(server.seen) == 2 + 3  # the judged two are not asked again
  assert [r["judge"]["reply"] for r in results["records"]] == REPLIES
