"""A streaming import needs about the model's bytes of host RAM, not a multiple of them."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from csft_jax.convert import read_hf_config
from csft_jax.convert.hf import param_paths
from csft_jax.convert.safetensors_io import write_sharded

_CONFIG = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": 8192,
  "hidden_size": 1024,
  "intermediate_size": 2816,
  "num_hidden_layers": 4,
  "num_attention_heads": 8,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-5,
  "max_position_embeddings": 512,
  "tie_word_embeddings": False,
}

_MEASURE = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from csft_jax.convert import load_hf

    jnp.zeros(1).block_until_ready()  # the runtime's own start-up memory is not the import's

    def rss(field):
      for line in open("/proc/self/status"):
        if line.startswith(field):
          return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = rss("VmRSS:")
    model = load_hf(sys.argv[1], dtype="float32")
    print(rss("VmHWM:") - before)
""")


def test_import_peak_memory_is_at_most_1_3x_model_bytes(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_CONFIG))
  config = read_hf_config(str(tmp_path))
  rng = np.random.default_rng(0)
  tensors = [
    (rule.hf if layer is None else rule.hf.format(i=layer), rule.hf_shape, np.dtype(np.float32))
    for rule, layer in param_paths(config, "llama")
  ]
  write_sharded(
    str(tmp_path),
    tensors,
    lambda name: rng.standard_normal(dict((n, s) for n, s, _ in tensors)[name], dtype=np.float32),
    max_shard_bytes=64 * 2**20,
  )
  model_bytes = config.num_params() * 4
  peak = int(
    subprocess.run(
      [sys.executable, "-c", _MEASURE, str(tmp_path)], check=True, capture_output=True, text=True
    ).stdout.split()[-1]
  )
  assert model_bytes > 250 * 2**20
  assert peak <= 1.3 * model_bytes, f"peak {peak / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
