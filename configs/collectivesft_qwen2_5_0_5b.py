"""The CollectiveSFT recipe on Qwen2.5-0.5B: the small end of the model-size axis.

Same data, schedule, variants (`paper`, `full`) and arguments as
`configs/collectivesft_internlm2_5_7b.py` (see it), with Qwen2.5-0.5B's checkpoint, tokenizer and
chat template (chatml; LLaMA-Factory's `intern2` needs InternLM2's tokens). Over-long examples are
cut by LLaMA-Factory's infer_seqlen all the same.

  python -m csft_jax.train --config=configs/collectivesft_qwen2_5_0_5b.py:mesh=v5p-8,model_dir=/models/Qwen2.5-0.5B \
      --workdir=W
"""

import ml_collections

from configs import collectivesft_internlm2_5_7b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the recipe for Qwen2.5-0.5B (tied embeddings, q/k/v bias)."""
  return collectivesft_internlm2_5_7b.recipe(
    arg, model_preset="qwen2_5_0_5b", model_dir="checkpoints/Qwen2.5-0.5B", chat_template="chatml", vocab_size=151936
  )
