"""Chat templates: loss mask on assistant tokens only, prompts, stop tokens."""

import numpy as np
import pytest

from csft_jax.data.conversation import Conversation
from csft_jax.data.errors import DataError
from csft_jax.data.templates import load_chat_template
from tests.data_fixtures import CONVERSATION, demo_tokenizer, template

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
    "<|im_start|>system\n你是医生助手。<|im_end|>\n<|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n"
  )


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


# Per-model content rules of the MedS-Bench official prompt builder (Evaluation/EvalDataset.py).
PADDED = [{"role": "system", "content": "\n 3 cases...\n\n"}, {"role": "user", "content": "Input:\nq\nOutput:\n"}]


def test_llama3_strips_every_message_content():
  t = template("llama3")
  assert t.render_prompt(PADDED) == (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n3 cases...<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nInput:\nq\nOutput:<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
  )
  text, spans = t.render(Conversation(" sys ", (("user", " q\n"), ("assistant", "\n a \n"))))
  assert text == (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>"
  )
  assert [text[s:e] for s, e in spans] == ["a<|eot_id|>"]


def test_llama3_jinja_export_trims_as_the_template_does():
  import jinja2

  t = template("llama3")
  rendered = jinja2.Template(t.jinja()).render(messages=PADDED, add_generation_prompt=True)
  assert rendered == t.render_prompt(PADDED)


def test_internlm2_keeps_contents_as_given():
  # EvalDataset.build_inputs_for_internlm: no strip; BOS as text when the tokenizer adds none.
  assert template("internlm2").render_prompt(PADDED) == (
    "<s><|im_start|>system\n\n 3 cases...\n\n<|im_end|>\n<|im_start|>user\nInput:\nq\nOutput:\n<|im_end|>\n"
    "<|im_start|>assistant\n"
  )


MISTRAL_JINJA = (
  "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
  "{{ message['content'] + eos_token }}{% else %}{{ raise_exception('no system role') }}{% endif %}{% endfor %}"
)


def test_mistral_folds_the_system_turn_into_the_user_turn():
  import copy

  tokenizer = copy.deepcopy(demo_tokenizer())
  tokenizer.chat_template = MISTRAL_JINJA
  tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
  t = load_chat_template("mistral", tokenizer)
  # EvalDataset.build_inputs_for_mistral: one user message `instruction + "\n" + query`, unstripped.
  assert t.render_prompt(PADDED) == "<s>[INST] \n 3 cases...\n\n\nInput:\nq\nOutput:\n [/INST]"
  text, spans = t.render(Conversation("s", (("user", "q"), ("assistant", "a"))))
  assert text == "<s>[INST] s\nq [/INST]a</s>"
  assert [text[s:e] for s, e in spans] == ["a</s>"]
  assert t.name == "mistral"
