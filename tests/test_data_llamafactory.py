"""LLaMA-Factory v0.8.3's intern2 template and infer_seqlen, against a reference read off its code.

`llamafactory_reference` below is written from `template.py` (`Template._encode`, the intern2
registration) and `processors/supervised.py` (`_encode_supervised_example`) of that release: each
piece of markup and text is encoded on its own (the tokenizer called on the piece, no special tokens
added), labels are IGNORE on prompts, the eos id on the first token of
every later prompt, and the final eos is appended outside the cutoff. Each turn's budget comes from
our `infer_seqlen`, which equals LLaMA-Factory's own function on the outputs pinned in
tests/fixtures/llamafactory_infer_seqlen.json (made by running it: tools/llamafactory_fixtures.py).
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models

from csft_jax.configuration import resolve_path
from csft_jax.data.config import DEMO_TOKENIZER
from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import DataError
from csft_jax.data.examples import tokenize_source
from csft_jax.data.llamafactory import infer_seqlen, split_turns, truncate_turns
from csft_jax.data.packing import LAST_TOKEN_TARGET, TrainingExample
from csft_jax.data.sources import SourceRecord, SourceStats
from csft_jax.data.templates import load_chat_template
from tests.data_fixtures import CONVERSATION

IGNORE = -100


@functools.cache
def intern2_tokenizer():
  """The demo tokenizer with InternLM2's bos/eos (`<s>`, `</s>`; it has every intern2 token)."""
  return transformers.AutoTokenizer.from_pretrained(resolve_path(DEMO_TOKENIZER), bos_token="<s>", eos_token="</s>")


@functools.cache
def intern2():
  return load_chat_template("llamafactory_intern2", intern2_tokenizer())


def _elements(system, turns):
  """Template._encode's elements of each message, for template intern2."""
  out = []
  for i, (role, content) in enumerate(turns):
    elements = []
    if i == 0:
      elements += [{"bos_token"}]  # format_prefix
      if system:
        elements += ["<|im_start|>system\n" + system + "<|im_end|>\n"]
    if i > 0 and i % 2 == 0:
      elements += ["<|im_end|>\n"]  # format_separator
    if role == "user":
      elements += ["<|im_start|>user\n" + content + "<|im_end|>\n<|im_start|>assistant\n"]
    else:
      elements += [content]  # efficient_eos: no eos slot
    out.append(elements)
  return out


def llamafactory_references(tokenizer, examples, cutoff_len):
  """[(input_ids, labels)] of LLaMA-Factory v0.8.3 for examples [(system, turns)], template intern2."""
  laid_out = [_elements(system, turns) for system, turns in examples]
  texts = list(dict.fromkeys(e for m in laid_out for message in m for e in message if isinstance(e, str) and e))
  ids_of = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
  out = []
  for messages in laid_out:
    encoded = [
      [t for e in message for t in ([tokenizer.bos_token_id] if isinstance(e, set) else ids_of.get(e, []))]
      for message in messages
    ]
    input_ids, labels = [], []
    total_length = 1
    for turn_idx, (source_ids, target_ids) in enumerate(zip(encoded[::2], encoded[1::2])):
      if total_length >= cutoff_len:
        break
      source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total_length)
      source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
      total_length += source_len + target_len
      source_label = [tokenizer.eos_token_id] + [IGNORE] * (source_len - 1) if turn_idx else [IGNORE] * source_len
      input_ids += source_ids + target_ids
      labels += source_label + target_ids
    out.append((input_ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]))
  return out


def llamafactory_reference(tokenizer, system, turns, cutoff_len):
  """(input_ids, labels) of one example; see `llamafactory_references`."""
  return llamafactory_references(tokenizer, [(system, turns)], cutoff_len)[0]


def as_labels(ids: np.ndarray, mask: np.ndarray) -> list[int]:
  """Our (ids, loss mask) as LLaMA-Factory's labels."""
  return np.where(mask == 0, IGNORE, np.where(mask == LAST_TOKEN_TARGET, ids[-1], ids)).tolist()


def assert_trains_like_llamafactory(ids, mask, ref_ids, ref_labels):
  assert ids.tolist() == ref_ids
  assert as_labels(ids, mask) == ref_labels
  # What the train step sees: HF's shifted labels.
  row = TrainingExample(0)((ids, mask))
  shifted = np.asarray(ref_labels[1:])
  np.testing.assert_array_equal(row["loss_mask"], shifted != IGNORE)
  np.testing.assert_array_equal(row["target_ids"][shifted != IGNORE], shifted[shifted != IGNORE])


@pytest.mark.parametrize(
  "lengths, expected",
  [
    ((900, 400, 1023), (623, 400)),  # short reply: kept whole, the prompt takes the rest
    ((100, 2000, 1023), (100, 923)),  # short prompt: kept whole
    ((800, 700, 1023), (546, 477)),  # both long: int(1023 * 700 / 1500) = 477 for the reply
    ((10, 10, 1023), (10, 10)),
    ((512, 512, 1024), (512, 512)),  # fits exactly
    ((5, 3, 1), (1, 0)),
  ],
)
def test_infer_seqlen_splits_the_cutoff_as_llamafactory(lengths, expected):
  assert infer_seqlen(*lengths) == expected


def test_infer_seqlen_equals_llamafactorys_own_function():
  """Outputs of LLaMA-Factory v0.8.3's infer_seqlen, pinned by tools/llamafactory_fixtures.py."""
  fixture = json.loads((Path(__file__).parent / "fixtures" / "llamafactory_infer_seqlen.json").read_text())
  assert fixture["made_by"] == "llamafactory 0.8.3 infer_seqlen" and len(fixture["cases"]) > 2000
  assert [[s, t, c, *infer_seqlen(s, t, c)] for s, t, c, _, _ in fixture["cases"]] == fixture["cases"]


def test_single_turn_text_and_trained_span():
  text, spans = intern2().render(Conversation(None, (("user", "头痛怎么办？"), ("assistant", "注意休息。"))))
  assert text == "<s><|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n注意休息。</s>"
  assert [text[a:b] for a, b in spans] == ["注意休息。</s>"]


def test_multi_turn_text_spans_ids_and_labels():
  text, spans = intern2().render(CONVERSATION)
  assert text == (
    "<s><|im_start|>system\n你是医生助手。<|im_end|>\n<|im_start|>user\n我头痛三天了。<|im_end|>\n"
    "<|im_start|>assistant\n有没有发热？<|im_end|>\n<|im_start|>user\n没有，只是晚上睡不好。<|im_end|>\n"
    "<|im_start|>assistant\n建议规律作息，必要时到神经内科就诊。</s>"
  )
  assert [text[a:b] for a, b in spans] == ["有没有发热？<|im_end|>", "建议规律作息，必要时到神经内科就诊。</s>"]
  ids, mask = intern2().encode(CONVERSATION)
  tok = intern2_tokenizer()
  # The label at the earlier <|im_end|> is </s>; the input there stays <|im_end|>.
  (relabelled,) = np.flatnonzero(mask == LAST_TOKEN_TARGET)
  assert tok.convert_ids_to_tokens(int(ids[relabelled])) == "<|im_end|>"
  assert tok.decode(ids[mask == 1].tolist()) == "有没有发热？建议规律作息，必要时到神经内科就诊。</s>"
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
  ref_ids, ref_labels = llamafactory_reference(tok, CONVERSATION.system, CONVERSATION.turns, cutoff_len=10_000)
  assert ref_labels[relabelled] == tok.eos_token_id
  assert_trains_like_llamafactory(ids, mask, ref_ids, ref_labels)


@pytest.mark.parametrize("cutoff", [8, 17, 30, 45, 60, 75, 200])
@pytest.mark.parametrize("system", [None, "你是医生助手。"])
def test_infer_seqlen_policy_cuts_turn_by_turn_like_llamafactory(cutoff, system):
  conversation = Conversation(system, CONVERSATION.turns + (("user", "需要吃药吗？" * 3), ("assistant", "")))
  records = [SourceRecord(conversation, {}, None)]
  stats = SourceStats()
  source = tokenize_source("s", records, stats, intern2(), seq_len=cutoff, overlong="infer_seqlen")
  ref_ids, ref_labels = llamafactory_reference(intern2_tokenizer(), system, conversation.turns, cutoff)
  assert len(ref_ids) <= cutoff and stats.truncated == (cutoff < 200)
  assert_trains_like_llamafactory(source.token_ids[0], source.loss_masks[0], ref_ids, ref_labels)


def test_truncate_policy_keeps_the_appended_eos():
  records = [SourceRecord(CONVERSATION, {}, None)]
  source = tokenize_source("s", records, SourceStats(), intern2(), seq_len=40, overlong="truncate")
  ids = source.token_ids[0]
  full_ids, _ = intern2().encode(CONVERSATION)
  assert len(ids) == 41 and ids[:40].tolist() == full_ids[:40].tolist() and ids[-1] == intern2_tokenizer().eos_token_id


def test_split_turns_reads_prompts_and_replies_off_the_mask():
  mask = np.array([0, 0, 1, 1, 2, 0, 1, 2, 0, 0, 1], dtype=np.int8)
  assert split_turns(mask) == [(0, 2, 4), (4, 6, 7), (7, 10, 11)]
  assert split_turns(np.array([0, 0, 2, 0, 1], dtype=np.int8)) == [(0, 2, 2), (2, 4, 5)]  # an empty reply
  ids = np.arange(11)
  cut_ids, cut_mask = truncate_turns(ids, mask, cutoff_len=6, efficient_eos=False)
  # Turn 1: infer_seqlen(2, 2, 6) = (2, 2); turn 2: infer_seqlen(2, 1, 2) = (2, 0); turn 3: no budget left.
  assert cut_ids.tolist() == [0, 1, 2, 3, 4, 5] and cut_mask.tolist() == [0, 0, 1, 1, 2, 0]
  cut_ids, cut_mask = truncate_turns(ids, mask, cutoff_len=8, efficient_eos=True)
  # The last token is outside the turns: budget 7 = turn 1 (2, 2) + turn 2 (2, 1); then the tail.
  assert cut_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 10] and cut_mask.tolist() == [0, 0, 1, 1, 2, 0, 1, 1]


def test_prompt_ids_and_exported_jinja_match_the_rendered_prompt():
  messages = [
    {"role": "system", "content": "你是医生助手。"},
    {"role": "user", "content": "我头痛三天了。"},
    {"role": "assistant", "content": "有没有发热？"},
    {"role": "user", "content": "没有。"},
  ]
  template, tok = intern2(), intern2_tokenizer()
  prompt = template.render_prompt(messages)
  assert prompt == (
    "<s><|im_start|>system\n你是医生助手。<|im_end|>\n<|im_start|>user\n我头痛三天了。<|im_end|>\n"
    "<|im_start|>assistant\n有没有发热？<|im_end|>\n<|im_start|>user\n没有。<|im_end|>\n<|im_start|>assistant\n"
  )
  assert tok.apply_chat_template(messages, tokenize=False, chat_template=template.jinja()) == prompt
  ref_ids, _ = llamafactory_reference(
    tok, "你是医生助手。", [(m["role"], m["content"]) for m in messages[1:]] + [("assistant", "")], cutoff_len=10_000
  )
  assert template.encode_prompt(messages) == ref_ids[:-1]  # encode_oneturn's prompt: all but the empty reply
  assert template.stop_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)


def test_a_tokenizer_without_the_markup_tokens_is_refused():
  bare = transformers.PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")), eos_token="</s>"
  )
  with pytest.raises(DataError, match=r"needs special tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
    load_chat_template("llamafactory_intern2", bare)
