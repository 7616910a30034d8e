"""Scores a benchmark's saved outputs, without a model: `python -m csft_jax.score <benchmark> --flags`.

    python -m csft_jax.score cmb --submission=S.json --answer_key=K.json --out=R.json [--strict]
    python -m csft_jax.score meds_bench --results=results.csv --out=R.json [--task_dir=D]

Each benchmark defines its own flags (`Benchmark.offline`); `--help` after the benchmark's name
lists them. Exit status: 0 scored, 2 an input the scorer refuses (one `error:` line), 1 bad usage.
"""

from __future__ import annotations

import sys

from csft_jax.eval import runner


def scorable() -> list[str]:
  """The benchmarks that score saved outputs."""
  return [name for name in runner.benchmark_names() if runner.get_benchmark(name).offline is not None]


def main() -> None:
  from absl import app, flags

  from csft_jax.console import run_cli

  names = scorable()
  name = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
  if name not in names:
    sys.exit(
      f"usage: python -m csft_jax.score BENCHMARK --flags... with BENCHMARK one of {names}"
      + (f" (got {name!r})" if name else "")
      + "; `python -m csft_jax.score BENCHMARK --help` lists its flags."
    )
  benchmark = runner.get_benchmark(name)
  benchmark.offline.define_flags()

  def score(argv: list[str]) -> int:
    if argv[1:] != [name]:
      raise app.UsageError(f"python -m csft_jax.score {name}: unexpected arguments {argv[2:]}.")
    return benchmark.offline.main(flags.FLAGS)

  run_cli(score)


if __name__ == "__main__":
  main()
