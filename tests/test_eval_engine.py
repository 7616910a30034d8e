"""Evaluation engine: HF parity (greedy tokens, repetition penalty, log-likelihoods), sharding, bucketing, sampling."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csft_jax import loading
from csft_jax.convert import load_hf
from csft_jax.eval import engine
from csft_jax.models import with_runtime
from csft_jax.sharding import make_mesh
from csft_jax.workdir import RunDir
from tests import load_tool
from tests.hf_models import make_hf_model

PARITY_ARCHS = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=PARITY_ARCHS)
def hf_pair(request, tmp_path_factory):
  """(arch, HF model, our model loaded from its saved directory, directory).

  Qwen2 is loaded with unrolled layers, the others scanned: the engine must handle both.
  """
  hf_model = make_hf_model(request.param)
  hf_model.generation_config.eos_token_id = None  # Stop only where a test says so.
  path = tmp_path_factory.mktemp(f"engine_{request.param}")
  hf_model.save_pretrained(path)
  return request.param, hf_model, load_hf(str(path), scan_layers=request.param != "qwen2"), str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("engine_tiny")
  hf_model = make_hf_model("llama", seed=1)
  hf_model.config.max_position_embeddings = 1024  # Room for CMB's 512 new tokens.
  hf_model.generation_config.eos_token_id = None
  hf_model.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
  """A tiny random Llama (vocab 101, 1,024 positions); loading it is faster than an eager random init."""
  return load_hf(tiny_dir)


def _same_parameters(a, b) -> None:
  flat_a, flat_b = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_generate_is_token_identical_to_hf_generate(hf_pair):
  arch, hf_model, ours, _ = hf_pair
  prompts = _prompts(hf_model.config.vocab_size, [5, 11, 3, 8])
  new_tokens = 10
  hf_greedy = load_tool("bench_eval").hf_greedy  # the benchmark's baseline is the reference
  free_run = hf_greedy(hf_model, prompts, [], new_tokens)
  # Two stop ids that HF greedy produces mid-way in rows 0 and 2: those rows end early.
  stops = [free_run[0][4], free_run[2][6]]
  expected = hf_greedy(hf_model, prompts, stops, new_tokens)
  got = engine.greedy_generate(ours, prompts, new_tokens, stops, batch_size=4)
  assert got == expected, arch
  lengths = [len(row) for row in got]
  assert min(lengths) < new_tokens, f"{arch}: no row stopped early: {lengths}"
  assert all(row[-1] in stops for row in got if len(row) < new_tokens)


def test_score_continuations_matches_hf_log_softmax_sums(hf_pair):
  arch, hf_model, ours, _ = hf_pair
  vocab = hf_model.config.vocab_size
  contexts = _prompts(vocab, [7, 3, 12, 7, 1], seed=1)
  contexts[3] = contexts[0]  # Same context, one-token continuations: one shared forward pass.
  continuations = _prompts(vocab, [1, 2, 3, 1, 4], seed=2)
  expected = []
  for context, continuation in zip(contexts, continuations):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
      log_probs = torch.log_softmax(hf_model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(context)
    expected.append(sum(float(log_probs[n - 1 + i, t]) for i, t in enumerate(continuation)))
  got = engine.score_continuations(ours, contexts, continuations, batch_size=2)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=arch)


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_mesh_matches_single_device(tiny_model, mesh_shape):
  mesh = make_mesh(**mesh_shape)
  prompts = _prompts(101, [9, 4, 14, 6, 2, 11])
  single = engine.greedy_generate(tiny_model, prompts, 6, 7, batch_size=8)
  sharded = engine.greedy_generate(tiny_model, prompts, 6, 7, batch_size=8, mesh=mesh)
  assert sharded == single
  contexts, continuations = prompts[:4], _prompts(101, [1, 2, 1, 3], seed=3)
  np.testing.assert_allclose(
    engine.score_continuations(tiny_model, contexts, continuations, batch_size=8, mesh=mesh),
    engine.score_continuations(tiny_model, contexts, continuations, batch_size=8),
    atol=1e-5,
  )


def test_plan_batches_sorts_by_length_and_buckets():
  lengths = [3, 5, 17, 20, 33, 2, 8, 40, 16, 1]
  plans = engine.plan_batches(lengths, batch_size=4, cap=512)
  assert plans == [([7, 4, 3, 2], 4, 40), ([8, 6, 1, 0], 4, 16), ([5, 9], 2, 16)]
  # A data-parallel size of 4 pads the short last batch to 4 rows; the cap bounds buckets.
  assert engine.plan_batches([2, 1], batch_size=8, cap=101, row_multiple=4) == [([0, 1], 4, 16)]
  assert [engine.bucket_length(n, cap=512) for n in (1, 17, 33, 65, 129, 132, 257)] == [16, 24, 40, 72, 144, 144, 288]
  assert engine.bucket_length(300, cap=300) == 300 and engine.bucket_length(40, cap=36) == 40


def test_compilations_are_one_per_bucket_and_reused(tiny_model):
  lengths = [3, 5, 17, 20, 33, 2, 8, 40, 16, 1]
  first = engine.generate(tiny_model, _prompts(101, lengths), 5, None, batch_size=4, batching="static")
  assert first.num_compilations == 3  # (4 x 40), (4 x 16), (2 x 16)
  # Other prompts whose batches fall in the same buckets reuse the compiled programs.
  again = engine.generate(
    tiny_model, _prompts(101, [2, 4, 16, 21, 34, 3, 9, 39, 12, 2], seed=5), 5, None, batch_size=4, batching="static"
  )
  assert again.num_compilations == 0
  assert [len(t[0]) for t in again.tokens] == [5] * len(lengths)


def test_overlong_prompts_are_truncated_from_the_left_and_counted(tiny_model):
  long_prompt, short_prompt = _prompts(101, [30, 5], seed=4)
  result = engine.generate(tiny_model, [long_prompt, short_prompt], 4, None, max_prompt_len=16)
  assert result.num_truncated == 1
  reference = engine.generate(tiny_model, [long_prompt[-16:], short_prompt], 4, None, max_prompt_len=16)
  assert reference.num_truncated == 0
  assert result.tokens == reference.tokens


def test_sampling_is_seeded_and_independent_of_batching(tiny_model):
  prompts = _prompts(101, [6, 3, 9])
  sampling = engine.Sampling(temperature=1.0, top_p=0.9)
  kwargs = dict(sampling=sampling, num_samples=3, seed=0)
  small = engine.generate(tiny_model, prompts, 6, None, batch_size=2, **kwargs).tokens
  large = engine.generate(tiny_model, prompts, 6, None, batch_size=8, **kwargs).tokens
  assert small == large
  other_seed = engine.generate(tiny_model, prompts, 6, None, batch_size=8, **{**kwargs, "seed": 1}).tokens
  assert other_seed != small
  assert any(len({tuple(s) for s in samples}) > 1 for samples in small), "samples of a prompt all equal"
  # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
  nucleus = engine.generate(
    tiny_model, prompts, 6, 7, batch_size=8, num_samples=2, sampling=engine.Sampling(temperature=1.0, top_p=1e-6)
  ).tokens
  greedy = engine.greedy_generate(tiny_model, prompts, 6, 7, batch_size=8)
  assert [samples[0] for samples in nucleus] == [samples[1] for samples in nucleus] == greedy


def _hf_generate_one_by_one(hf_model, prompts, max_new_tokens: int, eos, **options) -> list[list[int]]:
  """transformers `generate` per prompt (no padding, so HF penalises no pad token), cut after a stop."""
  rows = []
  for prompt in prompts:
    with torch.no_grad():
      out = hf_model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        **options,
      )
    row = out[0, len(prompt) :].tolist()
    end = next((i + 1 for i, t in enumerate(row) if eos is not None and t in eos), len(row))
    rows.append(row[:end])
  return rows


def test_repetition_penalty_greedy_is_token_identical_to_hf_generate(tiny_dir, tiny_model):
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
  prompts = _prompts(101, [5, 11, 3, 8])
  prompts[1][6:] = prompts[1][:5]  # A prompt that repeats itself: its tokens are penalised from step 0.
  penalised = _hf_generate_one_by_one(hf_model, prompts, 12, None, repetition_penalty=1.1)
  assert penalised != _hf_generate_one_by_one(hf_model, prompts, 12, None), "the penalty changed nothing"
  # Stop tokens that every row reaches within 12 steps: a 512-token budget ends early, as in HF.
  stops = sorted({row[len(row) // 2] for row in penalised})
  expected = _hf_generate_one_by_one(hf_model, prompts, 512, stops, repetition_penalty=1.1)
  assert max(map(len, expected)) <= 12
  sampling = engine.Sampling(repetition_penalty=1.1)
  got = engine.generate(tiny_model, prompts, 512, stops, sampling=sampling, batch_size=4).tokens
  assert [samples[0] for samples in got] == expected
  # The official CMB-Clin decoding adds min_new_tokens=1: a stop token that would come first is skipped.
  stops.append(penalised[0][0])
  assert len(_hf_generate_one_by_one(hf_model, prompts[:1], 512, stops, repetition_penalty=1.1)[0]) == 1
  expected = _hf_generate_one_by_one(hf_model, prompts, 512, stops, repetition_penalty=1.1, min_new_tokens=1)
  assert len(expected[0]) > 1
  official = engine.Sampling(repetition_penalty=1.1, min_new_tokens=1)
  got = engine.generate(tiny_model, prompts, 512, stops, sampling=official, batch_size=4).tokens
  assert [samples[0] for samples in got] == expected


def test_bad_inputs_raise_clear_errors(tiny_model):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    engine.greedy_generate(tiny_model, [[1, 2], []], 4, None)
  with pytest.raises(ValueError, match="pair 0"):
    engine.score_continuations(tiny_model, [[1, 2]], [[]])
  with pytest.raises(ValueError, match="top_p"):
    engine.Sampling(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="repetition_penalty=0 must be > 0"):
    engine.Sampling(repetition_penalty=0)
  with pytest.raises(ValueError, match="min_new_tokens=-1 must be >= 0"):
    engine.Sampling(min_new_tokens=-1)


def test_load_model_from_hf_directory(tiny_dir, tiny_model):
  model, kind = loading.load_model(tiny_dir)
  assert kind == "hf"
  _same_parameters(model, tiny_model)
  with pytest.raises(loading.LoadError, match="No tokenizer"):  # the directory has no tokenizer files
    loading.load_chat_model(tiny_dir)


def test_load_model_from_training_workdir(tiny_model, tmp_path):
  from csft_jax.checkpointing import save_model

  workdir = tmp_path / "run"
  save_model(str(workdir / "checkpoints"), tiny_model, step=7)
  (workdir / "config.json").write_text(
    json.dumps({"data": {"tokenizer": "csft_jax/assets/demo_tokenizer", "chat_template": "chatml"}})
  )
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "7"):
    model, kind = loading.load_model(str(path), dtype="float32")
    run_dir = RunDir.containing(str(path))
    tokenizer, template = run_dir.data_settings()
    assert kind == "orbax" and run_dir.root == str(workdir)
    assert template == "chatml"
    assert os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))
    _same_parameters(model, tiny_model)
    # The run's tokenizer (3,000 tokens) does not fit this 101-token model: refused before loading.
    with pytest.raises(loading.LoadError, match="has 3000 tokens but the model from .* has vocab_size 101"):
      loading.load_chat_model(str(path))


def _shared_prefix_prompts() -> list[list[int]]:
  """Two groups of prompts with a long common start (40 and 35 tokens), and two of their own."""
  rng = np.random.default_rng(7)
  first, second = rng.integers(0, 101, 40).tolist(), rng.integers(0, 101, 35).tolist()
  prompts = [first + rng.integers(0, 101, n).tolist() for n in (2, 9, 5)]
  prompts += [second + rng.integers(0, 101, n).tolist() for n in (1, 6)]
  prompts += _prompts(101, [12, 3], seed=8)
  prompts.insert(2, prompts[0][:41])  # A prompt that is the prefix plus one token.
  return prompts


def test_plan_generation_shares_only_prefixes_that_save_prefill():
  prompts = _shared_prefix_prompts()
  plans = engine.plan_generation(prompts, batch_size=4, cap=200)
  assert sorted(i for plan in plans for i in plan.rows) == list(range(len(prompts)))
  shared = [plan for plan in plans if plan.prefix_len]
  assert [(sorted(plan.rows), plan.prefix_len) for plan in shared] == [([0, 1, 2, 3], 40)]
  assert all(prompts[i][:40] == prompts[0][:40] for i in shared[0].rows)
  assert shared[0].padded_len == 16  # suffixes of 1..9 tokens
  # The 35-token pair shares its batch with two unrelated prompts: nothing in common there. In
  # batches of two it keeps 32 tokens (the bucket grid below 35).
  assert [
    (sorted(plan.rows), plan.prefix_len) for plan in engine.plan_generation(prompts, 2, 200) if plan.prefix_len
  ] == [([4, 5], 32), ([0, 2], 40), ([1, 3], 40)]
  assert engine.plan_generation(prompts, batch_size=4, cap=200, share_prefixes=False) == [
    engine.BatchPlan(rows, padded_rows, 0, padded_len)
    for rows, padded_rows, padded_len in engine.plan_batches([len(p) for p in prompts], 4, 200)
  ]


def test_shared_prefix_generation_equals_whole_prompts_and_hf(tiny_dir, tiny_model):
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
  prompts = _shared_prefix_prompts()
  whole = engine.generate(tiny_model, prompts, 8, None, batch_size=4, share_prefixes=False, batching="static")
  shared = engine.generate(tiny_model, prompts, 8, None, batch_size=4, batching="static")
  assert shared.tokens == whole.tokens
  # Continuous batching prefills each group's prefix once too, for whichever slots its rows take.
  continuous = engine.generate(tiny_model, prompts, 8, None, batch_size=2, batching="continuous")
  assert continuous.tokens == whole.tokens
  assert (
    continuous.prefill_slots
    < engine.generate(
      tiny_model, prompts, 8, None, batch_size=2, batching="continuous", share_prefixes=False
    ).prefill_slots
  )
  assert shared.prefill_slots < whole.prefill_slots
  assert [samples[0] for samples in shared.tokens] == _hf_generate_one_by_one(hf_model, prompts, 8, None)
  # Sampling keeps its seeding rule, the repetition penalty sees the prefix, meshes agree.
  for sampling, num_samples in (
    (engine.Sampling(temperature=1.0, top_p=0.9), 2),
    (engine.Sampling(repetition_penalty=1.3), 1),
  ):
    options = dict(sampling=sampling, num_samples=num_samples, batch_size=4)
    unshared = engine.generate(tiny_model, prompts, 8, None, share_prefixes=False, batching="static", **options)
    for batching in ("static", "continuous"):
      assert engine.generate(tiny_model, prompts, 8, None, batching=batching, **options).tokens == unshared.tokens
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  for batching in ("static", "continuous"):
    assert (
      engine.generate(tiny_model, prompts, 8, None, batch_size=4, mesh=mesh, batching=batching).tokens == whole.tokens
    )


def test_continuous_batching_equals_static_batches_and_hf_with_early_stops(tiny_dir, tiny_model):
  """More prompts than slots, mixed lengths, replies that stop early at different steps: a slot takes the
  next prompt as its row stops, and every row's tokens are those of static batches and of HF."""
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
  rng = np.random.default_rng(3)
  prompts = _prompts(101, rng.integers(2, 50, 21).tolist(), seed=7)
  # Stop tokens the model says often: replies stop at very different lengths.
  free = engine.generate(tiny_model, prompts, 24, None, batch_size=8, batching="static").tokens
  counts = np.bincount([t for samples in free for t in samples[0]], minlength=101)
  stops = np.argsort(-counts)[:2].tolist()
  static = engine.generate(tiny_model, prompts, 24, stops, batch_size=4, batching="static")
  continuous = engine.generate(tiny_model, prompts, 24, stops, batch_size=4, batching="continuous")
  lengths = [len(samples[0]) for samples in continuous.tokens]
  assert min(lengths) < 8 and max(lengths) == 24, lengths  # the case continuous batching is for
  assert continuous.tokens == static.tokens
  assert [samples[0] for samples in continuous.tokens] == _hf_generate_one_by_one(hf_model, prompts, 24, stops)
  # Prefills per (bucket, refill rows padded to a power of two) and one decode program.
  assert continuous.num_compilations <= 10
  # Every sampling option keeps its rule: the same tokens at any slot count, and as static batches.
  sampling = engine.Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.2, min_new_tokens=3)
  options = dict(sampling=sampling, num_samples=2, seed=4)
  by_slots = [
    engine.generate(tiny_model, prompts, 24, stops, batch_size=slots, batching="continuous", **options).tokens
    for slots in (2, 8)
  ]
  assert (
    by_slots[0]
    == by_slots[1]
    == engine.generate(tiny_model, prompts, 24, stops, batch_size=8, batching="static", **options).tokens
  )
  assert all(len(sample) >= 3 for samples in by_slots[0] for sample in samples)  # min_new_tokens
  # Data parallel over 2 devices, and the early stop of an evaluation.
  mesh = make_mesh(data=2, devices=jax.devices()[:2])
  assert (
    engine.generate(tiny_model, prompts, 24, stops, batch_size=4, mesh=mesh, batching="continuous").tokens
    == static.tokens
  )
  seen = []
  stopped = engine.generate(
    tiny_model,
    prompts,
    24,
    stops,
    batch_size=4,
    on_prompt_done=lambda i, t: seen.append(i),
    should_stop=lambda: len(seen) >= 5,
    batching="continuous",
  )
  assert stopped.stopped and len(seen) == 5
  assert all(stopped.tokens[i] == static.tokens[i] for i in seen)


def test_blockwise_prefill_and_growing_decode_windows_equal_hf(tiny_dir, tiny_model):
  """Prefill through the blockwise kernel (several blocks per row) and decode windows that grow past
  `WINDOW_GRID` steps: the tokens of the dense path and of HF, static (plain and shared prefix) and
  continuous."""
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
  blockwise = with_runtime(tiny_model, attention_impl="blockwise", attention_block_q=16, attention_block_kv=16)
  prompts = _shared_prefix_prompts()[:3] + _prompts(101, [5, 70, 33], seed=11)
  new = engine.WINDOW_GRID + 20
  dense = engine.generate(tiny_model, prompts, new, None, batch_size=4, batching="static", share_prefixes=False)
  assert [samples[0] for samples in dense.tokens] == _hf_generate_one_by_one(hf_model, prompts, new, None)
  for batching, share in (("static", False), ("static", True), ("continuous", False)):
    assert (
      engine.generate(blockwise, prompts, new, None, batch_size=4, batching=batching, share_prefixes=share).tokens
      == dense.tokens
    ), (batching, share)
