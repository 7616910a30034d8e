r"""Will the 7B recipe fit? `--compile_for` over the recipe's TPU mesh presets, dense vs chunked loss.

  python tools/bench_memory.py [--config=configs/collectivesft_internlm2_5_7b.py] [--chunk=256] [--json]

For each TPU preset of the recipe (`MESH_PRESETS` of the config file), compiles the real train step
for that slice (csft_jax.aot.check_fit; needs the `tpu` extra, several minutes on 2 cores) twice:
with dense logits (`train.loss_chunk_size=0`) and with the chunked LM head + cross-entropy
(`--chunk`). Prints the per-device totals as a table; with --json the last line is
`{preset: {"total_gib", "hbm_per_device_gib", "fits", "dense_total_gib"}}` (the chunked run's).
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
  for preset in _module_presets(path):
    if preset not in aot.SLICES:
      continue  # GPU presets (e.g. 8xh100) are not TPU slices
    reports = {}
    for chunk in (0, FLAGS.chunk):
      config = configuration.load(f"{path}:mesh={preset}", {"train.loss_chunk_size": chunk})
      start = time.perf_counter()
      reports[chunk] = aot.check_fit(config, preset)
      rows.append((preset, chunk, reports[chunk], time.perf_counter() - start))
    after = reports[FLAGS.chunk]
    results[preset] = {"total_gib": round(after.total_gib, 2), "hbm_per_device_gib": after.hbm_per_device_gib,
                       "fits": after.fits, "dense_total_gib": round(reports[0].total_gib, 2)}
  print(f"{'preset':<8} {'loss':<12} {'mesh':<34} {'params':>7} {'opt':>7} {'temp':>7} {'total':>7} {'HBM':>5} "
        f"{'fits':>5} {'compile s':>9}")
  for preset, chunk, r, seconds in rows:
    loss = "dense" if chunk == 0 else f"chunk {chunk}"
    print(f"{preset:<8} {loss:<12} {str(r.mesh):<34} {r.params_gib:>7.2f} {r.opt_state_gib:>7.2f} {r.temp_gib:>7.2f} "
          f"{r.total_gib:>7.2f} {r.hbm_per_device_gib:>5.0f} {str(r.fits):>5} {seconds:>9.0f}")
  if FLAGS.json:
    print(json.dumps(results))


def _module_presets(path: str) -> list[str]:
  """The recipe's MESH_PRESETS names."""
  return list(configuration.load_module(path).MESH_PRESETS)


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string("config", "configs/collectivesft_internlm2_5_7b.py", "Recipe with MESH_PRESETS and a mesh= arg.")
  flags.DEFINE_integer("chunk", 256, "train.loss_chunk_size of the chunked run.")
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")


if __name__ == "__main__":
  define_flags()
  run_cli(main)
