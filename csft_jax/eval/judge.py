"""LLM judges for benchmarks scored by a model: a local checkpoint through our engine, or an
OpenAI-compatible chat-completions endpoint.

A benchmark that is judged (`Benchmark.judging`) gives one prompt per answer; `judge_all`
sends each as one user message and keeps the replies in `judge.jsonl` (`JudgeJournal`): a header
line with the judge's fingerprint, then one line per judged answer, flushed as its reply arrives
(`key`, `prompt_sha`, the judge, its `reply`, and the benchmark's parse of it, `scores`, null when
unparseable). A rerun judges only the answers without a line (an answer whose prompt changed is
judged anew), so an interrupted judging never judges an answer twice; a journal of another judge is
set aside as `judge.jsonl.old`.

Config (`config.judge`, `default_judge_config`): `model` (a checkpoint path, as
`config.checkpoint`) or `endpoint` (the API's base URL, e.g. https://api.openai.com/v1, or its
`.../chat/completions` URL), never both; the endpoint's key is read from the environment variable
named by `api_key_env` (never from the config, so it is not written into results).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import logging

from csft_jax import configuration, files
from csft_jax.eval import engine

Parse = Callable[[str], "dict[str, int] | None"]


class JudgeError(ValueError):
  """A judge that cannot be used: bad settings, a missing key, an endpoint that refuses."""


configuration.declare_path_fields("judge.model", "judge.tokenizer")


def default_judge_config() -> ml_collections.ConfigDict:
  """`config.judge` of a judged benchmark: off until `model` or `endpoint` is set."""
  return ml_collections.ConfigDict(
    dict(
      model="",  # A local judge: HF directory, training workdir or step directory, run through our engine.
      tokenizer="",  # Override the judge model's tokenizer directory.
      chat_template="",  # Override the judge model's template: a name in csft_jax.data.templates.TEMPLATES.
      dtype="float32",  # 'bfloat16' on TPU/GPU for a large judge.
      endpoint="",  # An OpenAI-compatible API: base URL (…/v1) or its …/chat/completions URL.
      endpoint_model="gpt-4",  # The `model` field of each request.
      api_key_env="OPENAI_API_KEY",  # Environment variable holding the endpoint's key (empty: no key sent).
      temperature=0.0,  # Greedy for a local judge; the request's `temperature` for an endpoint.
      max_new_tokens=128,  # A reply is a short JSON object.
      timeout_s=120.0,  # Per request to an endpoint.
      retries=3,  # More tries on a timeout, HTTP 429 or 5xx, with 2, 4, 8... s between them.
    )
  )


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` asks for a judge."""
  judge = config.get("judge")
  return bool(judge is not None and (judge.model or judge.endpoint))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises `JudgeError` (before any model loads) for judge settings that cannot work."""
  judge = config.judge
  key_missing = judge.api_key_env and not os.environ.get(judge.api_key_env)
  checks = (
    (judge.model and judge.endpoint,
     f"config.judge.model={judge.model!r} and config.judge.endpoint={judge.endpoint!r}: choose one judge."),
    (judge.model and not os.path.exists(judge.model),
     f"config.judge.model={judge.model!r} does not exist: pass a judge checkpoint (HF directory, training workdir "
     "or step directory)."),
    (judge.endpoint and not judge.endpoint.startswith(("http://", "https://")),
     f"config.judge.endpoint={judge.endpoint!r}: expected an http(s) URL such as https://api.openai.com/v1."),
    (judge.endpoint and key_missing,
     f"config.judge.api_key_env={judge.api_key_env!r}: that environment variable is not set; export the endpoint's "
     "key in it (or set config.judge.api_key_env='' for an endpoint that needs none)."),
    (judge.max_new_tokens < 1, f"config.judge.max_new_tokens={judge.max_new_tokens} must be >= 1."),
    (judge.temperature < 0, f"config.judge.temperature={judge.temperature} must be >= 0 (0: greedy)."),
    (judge.timeout_s <= 0, f"config.judge.timeout_s={judge.timeout_s} must be > 0."),
    (judge.retries < 0, f"config.judge.retries={judge.retries} must be >= 0 (0: one try)."),
  )  # fmt: skip
  for failed, message in checks:
    if failed:
      raise JudgeError(message)


def describe(config: ml_collections.ConfigDict) -> str:
  """The judge as results name it: `endpoint_model @ endpoint` or the model path."""
  judge = config.judge
  return f"{judge.endpoint_model} @ {judge.endpoint}" if judge.endpoint else judge.model


def fingerprint(config: ml_collections.ConfigDict, weights: Sequence[str] = ()) -> str:
  """What decides a judge's replies: its model (and weight files' size and time) or endpoint and
  request model, template and decoding; not its timeout, retries or key."""
  judge = config.judge
  fields = {
    k: judge[k]
    for k in (
      "model",
      "tokenizer",
      "chat_template",
      "dtype",
      "endpoint",
      "endpoint_model",
      "temperature",
      "max_new_tokens",
    )
  }
  return files.fingerprint(fields, weights)


def prompt_sha(prompt: str) -> str:
  return hashlib.sha1(prompt.encode()).hexdigest()


class JudgeJournal(files.JsonlJournal):
  """`judge.jsonl`: the judge records of an evaluation, one line per judged answer (module docstring)."""

  def __init__(self, path: str, fingerprint_: str, *, primary: bool = True):
    super().__init__(path, fingerprint_, primary=primary, written_by="another judge")
    self._done = {(e["key"], e["prompt_sha"]): e for e in self.records}

  def record(self, key: str, prompt: str) -> dict[str, Any] | None:
    return self._done.get((key, prompt_sha(prompt)))

  def add(self, key: str, prompt: str, judge: str, reply: str, scores: dict[str, int] | None) -> dict[str, Any]:
    entry = {"key": key, "prompt_sha": prompt_sha(prompt), "judge": judge, "reply": reply, "scores": scores}
    self._done[(key, entry["prompt_sha"])] = entry
    self.write(entry)
    return entry


@dataclasses.dataclass
class Endpoint:
  """An OpenAI-compatible chat-completions API: one user message in, the first choice's text out."""

  url: str
  model: str
  api_key: str | None
  temperature: float
  max_tokens: int
  timeout_s: float
  retries: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Endpoint:
    judge = config.judge
    url = judge.endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
      url += "/chat/completions"
    key = os.environ.get(judge.api_key_env) if judge.api_key_env else None
    return cls(url, judge.endpoint_model, key, judge.temperature, judge.max_new_tokens, judge.timeout_s, judge.retries)

  def reply(self, prompt: str) -> str:
    """The endpoint's reply to `prompt`; raises `JudgeError` naming the URL on a refusal, a
    malformed response, or when every try timed out or failed."""
    body = json.dumps(
      {
        "model": self.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": self.temperature,
        "max_tokens": self.max_tokens,
      }
    ).encode()
    headers = {
      "Content-Type": "application/json",
      **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
    }
    timed_out = f"no reply within {self.timeout_s:g}s (config.judge.timeout_s)"
    for attempt in range(self.retries + 1):
      why = None
      try:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          payload = json.loads(response.read().decode("utf-8"))
        return _first_choice(payload, self.url)
      except urllib.error.HTTPError as error:
        detail = _error_detail(error)
        if error.code != 429 and error.code < 500:
          raise JudgeError(
            f"judge endpoint {self.url} refused the request: HTTP {error.code} {error.reason}"
            f"{': ' + detail if detail else ''}."
          ) from None
        why = f"HTTP {error.code}{': ' + detail if detail else ''}"
      except TimeoutError:
        why = timed_out
      except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):  # socket.timeout is TimeoutError
          why = timed_out
        else:
          raise JudgeError(f"judge endpoint {self.url} cannot be reached: {error.reason}.") from None
      except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JudgeError(f"judge endpoint {self.url} answered with something that is not JSON ({error}).") from None
      if attempt < self.retries:
        logging.warning("judge endpoint %s: %s; trying again in %ds.", self.url, why, 2 ** (attempt + 1))
        time.sleep(2 ** (attempt + 1))
    raise JudgeError(
      f"judge endpoint {self.url}: {why}, {self.retries + 1} tries; judged answers are kept, rerun to go on."
    )


def _first_choice(payload: Any, url: str) -> str:
  try:
    content = payload["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise JudgeError(
      f"judge endpoint {url} answered without choices[0].message.content: {json.dumps(payload)[:200]}"
    ) from None
  return content if isinstance(content, str) else ""


def _error_detail(error: urllib.error.HTTPError) -> str:
  try:
    payload = json.loads(error.read().decode("utf-8"))
    return str(payload.get("error", {}).get("message", "")) if isinstance(payload, dict) else ""
  except (OSError, ValueError, AttributeError):  # no readable JSON error body: the status says enough
    return ""


def judge_all(
  config: ml_collections.ConfigDict,
  prompts: Sequence[tuple[str, str]],
  parse: Parse,
  out_dir: str,
  *,
  local_chat: Callable[[], Any] | None = None,
  should_stop: Callable[[], bool] | None = None,
  primary: bool = True,
) -> list[dict[str, Any]]:
  """Judges `(key, prompt)` pairs not judged before; returns every pair's record, in order.

  Args:
    config: the eval config (`config.judge`).
    prompts: one judge prompt per answer, with a key that names the answer.
    parse: the benchmark's reading of a reply: its scores, or None when it cannot be read.
    out_dir: where `judge.jsonl` is.
    local_chat: builds the local judge's `runner.ChatModel` (called only when some answer is left to judge).
    should_stop: a stop request (SIGINT): raises `runner.EvaluationInterrupted` between replies.
  """
  from csft_jax.eval import runner

  name = describe(config)
  weights = []
  if config.judge.model:
    from csft_jax.loading import weight_files  # only a local judge needs the checkpoint code

    weights = weight_files(config.judge.model)
  journal = JudgeJournal(os.path.join(out_dir, "judge.jsonl"), fingerprint(config, weights), primary=primary)
  try:
    todo = [(key, prompt) for key, prompt in prompts if journal.record(key, prompt) is None]
    if len(todo) < len(prompts):
      logging.info(
        "judge: %d of %d answers were judged before (%s); judging the other %d.",
        len(prompts) - len(todo),
        len(prompts),
        journal.path,
        len(todo),
      )
    if todo and config.judge.endpoint:
      endpoint = Endpoint.from_config(config)
      with runner.progress_bar(len(prompts), "judge", unit="answer", initial=len(prompts) - len(todo)) as advance:
        for done, (key, prompt) in enumerate(todo):
          if should_stop is not None and should_stop():
            raise runner.EvaluationInterrupted(len(prompts) - len(todo) + done, len(prompts), f"kept in {journal.path}")
          reply = endpoint.reply(prompt)
          journal.add(key, prompt, name, reply, parse(reply))
          advance(len(prompts) - len(todo) + done + 1)
    elif todo:
      chat = local_chat()
      sampling = engine.Sampling(temperature=config.judge.temperature)
      try:
        chat.generate(
          [[{"role": "user", "content": p}] for _, p in todo],
          max_new_tokens=config.judge.max_new_tokens,
          sampling=sampling,
          desc="judge",
          on_reply=lambda i, texts: journal.add(todo[i][0], todo[i][1], name, texts[0], parse(texts[0])),
        )
      except runner.EvaluationInterrupted:
        done = sum(journal.record(key, prompt) is not None for key, prompt in prompts)
        raise runner.EvaluationInterrupted(done, len(prompts), f"judged answers kept in {journal.path}") from None
    # Scores read from each reply now, not as the journal noted them: a reading fixed since applies.
    records = [journal.record(key, prompt) for key, prompt in prompts]
    return [{**record, "scores": parse(record["reply"])} for record in records]
  finally:
    journal.close()
