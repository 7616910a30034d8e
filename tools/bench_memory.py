r"""Will the 7B recipe fit? `--compile_for` over the recipe's TPU mesh presets and training methods.

  python tools/bench_memory.py [--config=configs/collectivesft_internlm2_5_7b.py] [--chunk=256] [--json]
  python tools/bench_memory.py --presets=v4-8,v5e-8 --methods=lora,offload --json

For each TPU preset of the recipe (`MESH_PRESETS` of the config file, or `--presets`) and each
method (`--methods`, the recipes' `method=`: full, lora, offload), compiles the real train step for
that slice (csft_jax.aot.check_fit; needs the `tpu` extra, about a minute each on 2 cores). The
full fine-tune compiles twice, with dense logits (`train.loss_chunk_size=0`) and with the chunked
LM head + cross-entropy (`--chunk`); the other methods once, dense. Prints the per-device totals
as a table; with --json the last line is `{"preset/method": {"total_gib", "hbm_per_device_gib",
"fits", "dense_total_gib"}}` (the last compile's totals, and the dense one's).
"""

import json
import time

from absl import flags

from csft_jax import aot, configuration
from csft_jax.console import run_cli

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  path = FLAGS.config
  results, rows = {}, []
  presets = FLAGS.presets or _module_presets(path)
  for preset in presets:
    if preset not in aot.SLICES:
      continue  # GPU presets (e.g. 8xh100) are not TPU slices
    for method in FLAGS.methods:
      reports = {}
      for chunk in (0, FLAGS.chunk) if method == "full" else (0,):
        config = configuration.load(f"{path}:mesh={preset},method={method}", {"train.loss_chunk_size": chunk})
        start = time.perf_counter()
        reports[chunk] = aot.check_fit(config, preset)
        rows.append((preset, method, chunk, reports[chunk], time.perf_counter() - start))
      last = reports[max(reports)]
      results[f"{preset}/{method}"] = {
        "total_gib": round(last.total_gib, 2),
        "hbm_per_device_gib": last.hbm_per_device_gib,
        "fits": last.fits,
        "dense_total_gib": round(reports[0].total_gib, 2),
      }
  print(
    f"{'preset':<8} {'method':<8} {'loss':<10} {'mesh':<34} {'frozen':>7} {'params':>7} {'opt':>7} "
    f"{'temp':>7} {'total':>7} {'HBM':>5} {'fits':>5} {'compile s':>9}"
  )
  for preset, method, chunk, r, seconds in rows:
    loss = "dense" if chunk == 0 else f"chunk {chunk}"
    frozen = f"{r.frozen_gib:>7.2f}" if r.frozen_gib is not None else f"{'-':>7}"
    opt = f"{r.opt_state_gib:>6.2f}{'h' if r.host_gib is not None else ' '}"
    print(
      f"{preset:<8} {method:<8} {loss:<10} {str(r.mesh):<34} {frozen} {r.params_gib:>7.2f} {opt} "
      f"{r.temp_gib:>7.2f} {r.total_gib:>7.2f} {r.hbm_per_device_gib:>5.0f} {str(r.fits):>5} {seconds:>9.0f}"
    )
  print(
    "frozen: LoRA's base (bf16); params and opt: what trains (h: in host memory, outside the total). GiB per device."
  )
  if FLAGS.json:
    print(json.dumps(results))


def _module_presets(path: str) -> list[str]:
  """The recipe's MESH_PRESETS names."""
  return list(configuration.load_module(path).MESH_PRESETS)


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string("config", "configs/collectivesft_internlm2_5_7b.py", "Recipe with MESH_PRESETS and a mesh= arg.")
  flags.DEFINE_integer("chunk", 256, "train.loss_chunk_size of the chunked run.")
  flags.DEFINE_list("presets", [], "Mesh presets to compile (default: every TPU preset of the recipe).")
  flags.DEFINE_list("methods", ["full"], "The recipe's method= values to compile: full, lora, offload.")
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
