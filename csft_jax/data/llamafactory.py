"""LLaMA-Factory v0.8.3's supervised encoding, the one CollectiveSFT trained with.

  Intern2Template   template `intern2` (chat_template="llamafactory_intern2"): the markup of
                    `template.py`, ids and labels as `processors/supervised.py` builds them
  infer_seqlen      how a cutoff is split between a turn's prompt and its reply
  truncate_turns    `infer_seqlen` turn by turn over an encoded example (overlong="infer_seqlen")

What `intern2` trains on, for InternLM2's tokenizer (bos `<s>`, eos `</s>`):

  <s>[<|im_start|>system\\n{s}<|im_end|>\\n]<|im_start|>user\\n{q1}<|im_end|>\\n<|im_start|>assistant\\n
  [[{a1}]]<|im_end|>\\n<|im_start|>user\\n{q2}<|im_end|>\\n<|im_start|>assistant\\n[[{a2}</s>]]

Trained: every reply and the final `</s>` (efficient_eos: the template ends the example with
the tokenizer's eos instead of ending each reply). Each earlier reply is also trained to be
followed by `</s>`: supervised.py labels the first token of every later prompt, the `<|im_end|>`
separator, with the eos id. That token carries the loss-mask value `LAST_TOKEN_TARGET`, whose
target is the example's last token (the eos): where the next token is that `<|im_end|>`, the
model learns `</s>` instead (the reply's last token is the input), as LLaMA-Factory's shifted
labels do.
"""

import json
from collections.abc import Sequence

import numpy as np

from csft_jax.data.conversation import ASSISTANT, SYSTEM, USER, Conversation
from csft_jax.data.errors import DataError
from csft_jax.data.packing import LAST_TOKEN_TARGET
from csft_jax.data.templates import ChatTemplate, Spans, register_template

NAME = "llamafactory_intern2"
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
SEPARATOR = f"{_IM_END}\n"  # format_separator: opens every prompt after the first.


def _user(content: str) -> str:
  return f"{_IM_START}user\n{content}{_IM_END}\n{_IM_START}assistant\n"


def _system(content: str) -> str:
  return f"{_IM_START}system\n{content}{_IM_END}\n"


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
  """(prompt, reply) lengths kept of one turn within `cutoff_len` tokens (processor_utils.py).

  A short reply (under half the budget) is kept whole and the prompt cut; else a short prompt
  is kept whole and the reply cut; else both are cut in proportion to their lengths.
  """
  if target_len * 2 < cutoff_len:
    max_target_len = cutoff_len
  elif source_len * 2 < cutoff_len:
    max_target_len = cutoff_len - source_len
  else:
    max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
  new_target_len = min(max_target_len, target_len)
  new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
  return new_source_len, new_target_len


def split_turns(loss_mask: np.ndarray) -> list[tuple[int, int, int]]:
  """(start, reply start, end) of each (prompt, reply) turn of an encoded example.

  A prompt is a run of untrained tokens (a `LAST_TOKEN_TARGET` token opens one); the reply is
  the run of trained tokens after it (empty when the reply encodes to nothing).
  """
  turns, start, reply = [], 0, None
  for i, m in enumerate(loss_mask.tolist()):
    if i > start and (m == LAST_TOKEN_TARGET or (m == 0 and reply is not None)):
      turns.append((start, i if reply is None else reply, i))
      start, reply = i, None
    if m == 1 and reply is None:
      reply = i
  turns.append((start, len(loss_mask) if reply is None else reply, len(loss_mask)))
  return turns


def truncate_turns(
  token_ids: np.ndarray, loss_mask: np.ndarray, cutoff_len: int, efficient_eos: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts an example to `cutoff_len` tokens turn by turn, as `_encode_supervised_example` does.

  Each turn gets `infer_seqlen` of the budget left by the turns before it; turns after the
  budget is spent are dropped. With `efficient_eos` the last token (the eos the template
  appends) sits outside the turns and is always kept.

  Args:
    token_ids, loss_mask: one example as a template encodes it.
    cutoff_len: LLaMA-Factory's cutoff_len: the most tokens an example keeps.
    efficient_eos: whether the example ends with an appended eos (Intern2Template).
  """
  tail = 1 if efficient_eos else 0
  body = len(token_ids) - tail
  total, keep = tail, []
  for start, reply, end in split_turns(loss_mask[:body]):
    if total >= cutoff_len:
      break
    source_len, target_len = infer_seqlen(reply - start, end - reply, cutoff_len - total)
    keep += [np.arange(start, start + source_len), np.arange(reply, reply + target_len)]
    total += source_len + target_len
  index = np.concatenate(keep + [np.arange(body, len(token_ids))])
  return token_ids[index], loss_mask[index]


@register_template("llamafactory_intern2")  # as CollectiveSFT trained
class Intern2Template(ChatTemplate):
  """LLaMA-Factory's `intern2` template; see the module docstring.

  Like LLaMA-Factory it encodes each piece of markup and text on its own (the tokenizer's
  `encode(piece, add_special_tokens=False)`), and takes bos and eos from the tokenizer (no bos
  if it has none). Ids and mask are not those of tokenizing `render`'s text in one go where
  the tokenizer would merge across a piece boundary.
  """

  efficient_eos = True  # Read by examples.tokenize_source: the final eos is outside the cutoff.

  def __init__(self, tokenizer):
    vocab = tokenizer.get_vocab()
    missing = [t for t in (_IM_START, _IM_END) if t not in vocab]
    if missing or tokenizer.eos_token_id is None:
      lacks = f"special tokens {missing}" if missing else "an eos token"
      raise DataError(
        f"chat_template {NAME!r} needs {lacks}, which the tokenizer {tokenizer.name_or_path} lacks;"
        " use InternLM2's tokenizer (or chat_template='hf')"
      )
    super().__init__(NAME, tokenizer, [vocab[_IM_END], tokenizer.eos_token_id])
    self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

  def _pieces(self, system: str | None, turns: Sequence[tuple[str, str]]) -> list[list[str]]:
    """The text pieces of each message, as `Template._encode` lays them out (bos aside)."""
    out = []
    for i, (role, text) in enumerate(turns):
      if role == USER:
        head = [SEPARATOR] if i else ([_system(system)] if system else [])
        out.append(head + [_user(text)])
      else:
        out.append([text])
    return out

  def render(self, conversation: Conversation) -> tuple[str, Spans]:
    bos = self.tokenizer.bos_token if self.bos else ""
    text, spans = bos, []
    pieces = self._pieces(conversation.system, conversation.turns)
    for i, message in enumerate(pieces):
      if conversation.turns[i][0] == ASSISTANT:
        last = i == len(pieces) - 1
        # An earlier reply is trained up to the separator's <|im_end|> (labelled eos there).
        end = self.tokenizer.eos_token if last else _IM_END
        spans.append((len(text), len(text) + len(message[0]) + len(end)))
      text += "".join(message)
    return text + self.tokenizer.eos_token, spans

  def encode_batch(self, conversations: Sequence[Conversation]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ids and loss masks as supervised.py builds input_ids and labels (no cutoff).

    Mask: 1 on the replies and the final eos, `LAST_TOKEN_TARGET` on the `<|im_end|>` that
    opens each later prompt, 0 elsewhere.
    """
    laid_out = [self._pieces(c.system, c.turns) for c in conversations]
    ids_of = self._encode_pieces([p for messages in laid_out for m in messages for p in m])
    out = []
    for messages in laid_out:
      ids, mask = list(self.bos), [0] * len(self.bos)
      for i, message in enumerate(messages):
        encoded = [t for piece in message for t in ids_of[piece]]
        if i % 2:  # A reply.
          mask += [1] * len(encoded)
        elif i:  # A later prompt: its first token, the separator's <|im_end|>, is labelled eos.
          mask += [LAST_TOKEN_TARGET] + [0] * (len(encoded) - 1)
        else:
          mask += [0] * len(encoded)
        ids += encoded
      ids.append(self.tokenizer.eos_token_id)
      mask.append(1)
      out.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)))
    return out

  def _encode_pieces(self, pieces: list[str]) -> dict[str, list[int]]:
    unique = [p for p in dict.fromkeys(pieces) if p]
    encodings = self.tokenizer.backend_tokenizer.encode_batch(unique, add_special_tokens=False)
    return {"": [], **{p: e.ids for p, e in zip(unique, encodings)}}

  def _prompt_pieces(self, messages: Sequence[dict[str, str]]) -> list[str]:
    system = messages[0]["content"] if messages and messages[0]["role"] == SYSTEM else None
    turns = [(m["role"], m["content"]) for m in messages if m["role"] != SYSTEM]
    return [p for message in self._pieces(system, turns) for p in message]

  def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
    """The prompt LLaMA-Factory's `encode_oneturn` gives for `messages` + an empty reply."""
    bos = self.tokenizer.bos_token if self.bos else ""
    return bos + "".join(self._prompt_pieces(messages))

  def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
    pieces = self._prompt_pieces(messages)
    ids_of = self._encode_pieces(pieces)
    return list(self.bos) + [t for p in pieces for t in ids_of[p]]

  def jinja(self) -> str:
    """The Jinja chat template LLaMA-Factory writes for `intern2` (what an HF export carries)."""
    bos = json.dumps(self.tokenizer.bos_token if self.bos else "")
    user_head, user_tail = (json.dumps(s) for s in _user("\0").split("\0"))
    system_head, system_tail = (json.dumps(s) for s in _system("\0").split("\0"))
    return (
      f"{{{{ {bos} }}}}{{% if messages[0]['role'] == 'system' %}}{{{{ {system_head} + messages[0]['content']"
      f" + {system_tail} }}}}{{% endif %}}{{% for message in messages %}}{{% if message['role'] == 'user' %}}"
      f"{{{{ {user_head} + message['content'] + {user_tail} }}}}{{% elif message['role'] == 'assistant' %}}"
      f"{{{{ message['content'] + {json.dumps(SEPARATOR)} }}}}{{% endif %}}{{% endfor %}}"
    )
