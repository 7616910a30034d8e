"""Chat templates: loss mask on assistant tokens only, prompts, stop tokens."""

import numpy as np
import pytest

from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import DataError
from csft_jax.data.templates import load_chat_template
from tests.data_fixtures import demo_tokenizer, template

CONVERSATION = Conversation(
    "你是医生助手。",
    (("user", "我头痛三天了。"), ("assistant", "有没有发热？"),
     ("user", "没有，只是晚上睡不好。"), ("assistant", "建议规律作息，必要时到神经内科就诊。")))
END_OF_TURN = {"chatml": "<|im_end|>", "internlm2": "<|im_end|>", "llama3": "<|eot_id|>", "hf": "<|im_end|>"}


@pytest.mark.parametrize("name", ["chatml", "internlm2", "llama3", "hf"])
def test_trained_tokens_decode_to_assistant_turns_and_end_of_turn(name):
  ids, mask = template(name).encode(CONVERSATION)
  tok = demo_tokenizer()
  # Each run of trained tokens is one assistant reply with its end-of-turn token.
  bounds = np.flatnonzero(np.diff(mask)) + 1
  runs = zip(np.split(ids, bounds), np.split(mask, bounds))
  trained = [tok.decode(r.tolist()) for r, m in runs if m[0]]
  eot = END_OF_TURN[name]
  assert trained == [f"有没有发热？{eot}", f"建议规律作息，必要时到神经内科就诊。{eot}"]
  # Nothing of the system or user text is trained.
  untrained = tok.decode(ids[mask == 0].tolist())
  for text in ("你是医生助手。", "我头痛三天了。", "没有，只是晚上睡不好。"):
    assert text in untrained


def test_hf_template_of_demo_tokenizer_equals_builtin_chatml():
  hf_ids, hf_mask = template("hf").encode(CONVERSATION)
  ids, mask = template("chatml").encode(CONVERSATION)
  np.testing.assert_array_equal(hf_ids, ids)
  np.testing.assert_array_equal(hf_mask, mask)


def test_llama3_renders_headers_and_bos():
  text, spans = template("llama3").render(CONVERSATION)
  assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是医生助手。<|eot_id|>")
  assert [text[s:e] for s, e in spans] == ["有没有发热？<|eot_id|>", "建议规律作息，必要时到神经内科就诊。<|eot_id|>"]


@pytest.mark.parametrize("name", ["chatml", "hf"])
def test_encode_prompt_ends_with_assistant_prefix(name):
  t = template(name)
  messages = [{"role": "system", "content": "你是医生助手。"}, {"role": "user", "content": "头痛怎么办？"}]
  ids = t.encode_prompt(messages)
  assert demo_tokenizer().decode(ids) == (
      "<|im_start|>system\n你是医生助手。<|im_end|>\n<|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n")


def test_stop_token_ids_are_end_of_turn_then_eos():
  vocab = demo_tokenizer().get_vocab()
  assert template("chatml").stop_token_ids == (vocab["<|im_end|>"], vocab["<|endoftext|>"])
  assert template("llama3").stop_token_ids == (vocab["<|eot_id|>"], vocab["<|end_of_text|>"])
  assert template("hf").stop_token_ids == (vocab["<|im_end|>"], vocab["<|endoftext|>"])


def test_unknown_template_name_is_an_error():
  with pytest.raises(DataError, match="not one of"):
    load_chat_template("vicuna", demo_tokenizer())


def test_byte_level_demo_tokenizer_has_no_unknown_tokens():
  text = "罕见字：龘靐齉爩 and émoji 🩺"
  ids = demo_tokenizer().backend_tokenizer.encode(text, add_special_tokens=False).ids
  assert demo_tokenizer().decode(ids) == text
