"""Chat templates: conversations -> token ids with a loss mask, prompts -> ids.

Public API:
  load_chat_template(name, tokenizer) -> ChatTemplate   (the only factory)
  TEMPLATES: name -> factory(tokenizer); `register_template(name)` adds one (built-ins below,
      `llamafactory_intern2` in csft_jax/data/llamafactory.py); `template_names()`
  ChatTemplate.encode(conversation) -> (token_ids, loss_mask)   for training
  ChatTemplate.encode_batch(conversations) -> [(token_ids, loss_mask), ...]
  ChatTemplate.encode_prompt(messages) -> list[int]   for generation; ends
      with the assistant generation prefix
  ChatTemplate.stop_token_ids   end-of-turn and end-of-sequence ids

Templates render text plus the character spans the model is trained on
(each assistant reply and its end-of-turn marker); tokenizing once with
offsets turns the spans into a per-token loss mask. Rendering whole text and
tokenizing it once keeps the ids identical to what the template gives at
inference, which encoding turn by turn would not guarantee.

Per-model rules on message contents, as the models' own templates and the
MedS-Bench official prompt builder (`Evaluation/EvalDataset.py`) apply them:
  * `llama3` strips every message's content (Meta's template trims too);
  * `internlm2` and `chatml` keep contents as given;
  * `mistral` (the tokenizer's own template) folds the system turn into the
    first user turn as `system + "\n" + user`, since Mistral-Instruct
    templates take no system role.
"""

import abc
import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np

from csft_jax.data.conversation import ASSISTANT, Conversation
from csft_jax.data.errors import DataError

Spans = list[tuple[int, int]]

# Every chat template by name: a factory of tokenizer -> ChatTemplate. The package imports the modules
# that register more (csft_jax/data/__init__.py), so a name is known wherever csft_jax.data is.
TEMPLATES: dict[str, Callable[..., "ChatTemplate"]] = {}


def register_template(name: str):
  """Decorator: registers `factory(tokenizer) -> ChatTemplate` (a class or function) as `name`."""

  def register(factory):
    if name in TEMPLATES:
      raise ValueError(f"chat template {name!r} is registered twice")
    TEMPLATES[name] = factory
    return factory

  return register


def template_names() -> list[str]:
  """The registered chat template names, sorted."""
  return sorted(TEMPLATES)


class ChatTemplate(abc.ABC):
  """Renders conversations for one tokenizer; see the module docstring."""

  def __init__(self, name: str, tokenizer, stop_token_ids: Sequence[int]):
    self.name = name
    self.tokenizer = tokenizer
    self.stop_token_ids = tuple(dict.fromkeys(int(i) for i in stop_token_ids))

  @abc.abstractmethod
  def render(self, conversation: Conversation) -> tuple[str, Spans]:
    """Returns the text and the [start, end) character spans to train on."""

  @abc.abstractmethod
  def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
    """Returns the text of `messages` followed by the assistant prefix."""

  def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
    """Returns int32 token ids and an int8 mask, 1 on assistant tokens.

    The mask covers every assistant turn including its end-of-turn token;
    system and user tokens and the role headers are 0.
    """
    return self.encode_batch([conversation])[0]

  def encode_batch(self, conversations: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode` for many conversations at once (the tokenizer runs in parallel)."""
    rendered = [self.render(c) for c in conversations]
    encodings = self.tokenizer.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for (_, spans), encoding in zip(rendered, encodings):
      ids = np.asarray(encoding.ids, dtype=np.int32)
      starts = np.fromiter((o[0] for o in encoding.offsets), dtype=np.int64, count=len(ids))
      mask = np.zeros(len(ids), dtype=np.int8)
      for start, end in spans:
        mask[(starts >= start) & (starts < end)] = 1
      out.append((ids, mask))
    return out

  def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` ([{"role", "content"}]) ending with the assistant prefix."""
    text = self.render_prompt(messages)
    return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


@dataclasses.dataclass(frozen=True)
class MarkupSpec:
  """A template that is plain markup around each message."""

  bos: str
  header: str  # Formatted with {role}.
  end_of_turn: str
  separator: str  # After end_of_turn; not trained.
  eos: str
  special_tokens: tuple[str, ...]  # Must each be one token of the tokenizer.
  strip_content: bool = False  # Strip each message's content before rendering it.


BUILTIN_TEMPLATES = {
  "chatml": MarkupSpec("", "<|im_start|>{role}\n", "<|im_end|>", "\n", "<|endoftext|>", ("<|im_start|>", "<|im_end|>")),
  "internlm2": MarkupSpec(
    "<s>", "<|im_start|>{role}\n", "<|im_end|>", "\n", "</s>", ("<s>", "<|im_start|>", "<|im_end|>")
  ),
  "llama3": MarkupSpec(
    "<|begin_of_text|>",
    "<|start_header_id|>{role}<|end_header_id|>\n\n",
    "<|eot_id|>",
    "",
    "<|end_of_text|>",
    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    strip_content=True,
  ),
}


class MarkupTemplate(ChatTemplate):
  """A built-in template (`chatml`, `internlm2`, `llama3`)."""

  def __init__(self, name: str, tokenizer, spec: MarkupSpec):
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.special_tokens if t not in vocab]
    if missing:
      raise DataError(
        f"chat_template {name!r} needs special tokens {missing} that the"
        f" tokenizer {tokenizer.name_or_path} lacks; use chat_template='hf'"
        " or a tokenizer of that model family"
      )
    eos = vocab.get(spec.eos, tokenizer.eos_token_id)
    stops = [vocab[spec.end_of_turn]] + ([eos] if eos is not None else [])
    super().__init__(name, tokenizer, stops)
    self.spec = spec

  def _content(self, text: str) -> str:
    return text.strip() if self.spec.strip_content else text

  def render(self, conversation: Conversation) -> tuple[str, Spans]:
    s = self.spec
    parts = [s.bos]
    if conversation.system:
      parts.append(f"{s.header.format(role='system')}{self._content(conversation.system)}{s.end_of_turn}{s.separator}")
    spans, length = [], len(parts[0]) + (len(parts[1]) if conversation.system else 0)
    for role, text in conversation.turns:
      text = self._content(text)
      head = s.header.format(role=role)
      if role == ASSISTANT:
        start = length + len(head)
        spans.append((start, start + len(text) + len(s.end_of_turn)))
      turn = f"{head}{text}{s.end_of_turn}{s.separator}"
      parts.append(turn)
      length += len(turn)
    return "".join(parts), spans

  def jinja(self) -> str:
    """This template as a Jinja chat template: what an HF export carries, so that transformers'
    `apply_chat_template` renders prompts exactly as this template does."""
    s = self.spec
    before, after = (json.dumps(part) for part in s.header.split("{role}"))
    end = json.dumps(s.end_of_turn + s.separator)
    content = "(message['content'] | trim)" if s.strip_content else "message['content']"
    return (
      f"{{{{ {json.dumps(s.bos)} }}}}{{% for message in messages %}}{{{{ {before} + message['role'] + {after} + "
      f"{content} + {end} }}}}{{% endfor %}}{{% if add_generation_prompt %}}"
      f"{{{{ {before} + 'assistant' + {after} }}}}{{% endif %}}"
    )

  def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
    s = self.spec
    body = "".join(
      f"{s.header.format(role=m['role'])}{self._content(m['content'])}{s.end_of_turn}{s.separator}" for m in messages
    )
    return f"{s.bos}{body}{s.header.format(role=ASSISTANT)}"


@register_template("hf")
class HFTemplate(ChatTemplate):
  """The tokenizer's own Jinja `chat_template`.

  Assistant spans come from rendering growing prefixes of the conversation,
  which requires the template to render a prefix of messages as a prefix of
  the text (true of chatml-, Llama- and InternLM-style templates).
  """

  def __init__(self, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
      raise DataError(
        f"chat_template='hf' but tokenizer {tokenizer.name_or_path} has no"
        " chat_template; pick a built-in one: chatml, internlm2, llama3"
      )
    self.tokenizer = tokenizer
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    prefix = self._apply(probe[:1], generation_prompt=True)
    after = self._apply(probe, generation_prompt=False)[len(prefix) + 1 :]
    end_of_turn = tokenizer.backend_tokenizer.encode(after, add_special_tokens=False).ids[:1]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    super().__init__("hf", tokenizer, end_of_turn + eos)

  def _apply(self, messages, generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)

  def render(self, conversation: Conversation) -> tuple[str, Spans]:
    messages = conversation.messages()
    text = self._apply(messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != ASSISTANT:
        continue
      start = len(self._apply(messages[:i], generation_prompt=True))
      upto = self._apply(messages[: i + 1], generation_prompt=False)
      if not text.startswith(upto) or len(upto) < start:
        raise DataError(
          f"the chat_template of {self.tokenizer.name_or_path} does not render"
          " a conversation prefix as a text prefix, so assistant tokens cannot"
          " be located; use a built-in chat_template instead"
        )
      # Trailing newlines after the end-of-turn token are not trained.
      spans.append((start, len(upto.rstrip("\n"))))
    return text, spans

  def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
    return self._apply(messages, generation_prompt=True)


@register_template("mistral")
class SystemFoldedTemplate(HFTemplate):
  """The tokenizer's own template with the system turn folded into the first user turn.

  `system + "\n" + user`, as MedS-Bench's `build_inputs_for_mistral` builds its single
  user message; Mistral-Instruct templates reject or misplace a system role.
  """

  def __init__(self, tokenizer):
    super().__init__(tokenizer)
    self.name = "mistral"

  def _apply(self, messages, generation_prompt: bool) -> str:
    return super()._apply(fold_system_turn(messages), generation_prompt)


def fold_system_turn(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
  """[system s, user u, ...] -> [user s + "\n" + u, ...]; other lists unchanged."""
  messages = [dict(m) for m in messages]
  if len(messages) >= 2 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
    system = messages.pop(0)
    messages[0]["content"] = system["content"] + "\n" + messages[0]["content"]
  return messages


def load_chat_template(name: str, tokenizer) -> ChatTemplate:
  """Returns the chat template `name` (a registered one, `TEMPLATES`) for `tokenizer`."""
  if name not in TEMPLATES:
    raise DataError(f"config.data.chat_template={name!r} is not one of {template_names()}")
  return TEMPLATES[name](tokenizer)


def _markup_template(name: str, spec: MarkupSpec) -> Callable[..., ChatTemplate]:
  return lambda tokenizer: MarkupTemplate(name, tokenizer, spec)


for _name, _spec in BUILTIN_TEMPLATES.items():
  register_template(_name)(_markup_template(_name, _spec))
