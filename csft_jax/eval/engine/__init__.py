"""The evaluation engine: batched, jitted generation and continuation scoring with a KV cache.

Modules by role: `plans` (which prompts run together), `sampling` (the next-token rule), `programs`
(the jitted programs and their KV cache), `driver` (the host loop: truncation, slots, results).

Public API:
  generate(model, prompts, max_new_tokens, eos_token_id, ...) -> Generation   (greedy or sampled)
  greedy_generate(model, prompts, max_new_tokens, eos_token_id, ...) -> list[list[int]]
  score(model, contexts, continuations, ...) -> Scores
  score_continuations(model, contexts, continuations, ...) -> list[float]

Batching: prompts are sorted by length and cut into batches; each batch is left-padded to a
bucket length (`BUCKETS_PER_OCTAVE` steps between powers of two, at least `MIN_BUCKET`) and the
last, short batch to a power-of-two row count, so a run compiles one program per distinct
(rows, bucket) pair: a handful, whatever the number of prompts. Each new program is logged.

Shared prefixes: prompts that start alike (the chat template's header, the few-shot demos of a
CMB exam_class) are batched together when that saves prefill work; their common prefix is
prefilled once and its keys/values are copied into every row's cache (`plan_generation`). The
tokens each row computes do not change: greedy outputs are those of whole-prompt prefills.

Generation: `batching='static'` (default): one jitted program per batch runs the prefill (self-
attention through the model's implementation: blockwise or splash compute only each row's causal
blocks) and then single-token decode steps, entirely on device, until every row has produced a stop
token or `max_new_tokens` tokens; the steps attend over the cache as far as it has grown (windows of
`WINDOW_GRID` steps), not over the whole budget. `batching='continuous'`: `batch_size` decode slots;
a slot takes the next prompt as soon as its row stops, and `DECODE_STEPS_PER_CALL` steps of every
slot run per device call between refills. The tokens are the same either way.

Determinism: greedy outputs depend only on the model and the prompt. A sampled sequence draws its
randomness from `fold_in(fold_in(key(seed), prompt index), sample index)` and its own token index,
so it does not depend on batch size, bucketing, slots, the mesh, or the other prompts.
"""

from csft_jax.eval.engine.driver import (
  Generation,
  Progress,
  Scores,
  generate,
  greedy_generate,
  score,
  score_continuations,
)
from csft_jax.eval.engine.plans import (
  BUCKETS_PER_OCTAVE,
  MIN_BUCKET,
  MIN_SHARED_PREFIX,
  BatchPlan,
  bucket_length,
  plan_batches,
  plan_generation,
  prompt_limit,
)
from csft_jax.eval.engine.programs import DECODE_STEPS_PER_CALL, WINDOW_GRID, GenerateProgram, generate_program
from csft_jax.eval.engine.sampling import GREEDY, Sampling

__all__ = [
  "BUCKETS_PER_OCTAVE",
  "DECODE_STEPS_PER_CALL",
  "GREEDY",
  "MIN_BUCKET",
  "MIN_SHARED_PREFIX",
  "WINDOW_GRID",
  "BatchPlan",
  "GenerateProgram",
  "Generation",
  "Progress",
  "Sampling",
  "Scores",
  "bucket_length",
  "generate",
  "generate_program",
  "greedy_generate",
  "plan_batches",
  "plan_generation",
  "prompt_limit",
  "score",
  "score_continuations",
]
