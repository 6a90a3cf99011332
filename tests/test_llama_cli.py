"""End-to-end Llama CLIs (train.llama / infer.llama: the GPT-2 CLIs with the Llama
config) on a tiny generated text with the nano model."""

import json
import os
import re

import pytest

from astra_jax.run import config
from astra_jax.models import gpt2, llama
from astra_jax.run.tasks import lm
from cli_helpers import assert_clean_errors, last_json, run, stderr_lines, write_corpus

TINY = ["--config.variant=nano", "--config.context=32", "--config.batch_size=4",
        "--config.log_every=5", "--config.warmup_steps=2", "--config.eval_windows=4",
        "--config.eval_batch_size=4", "--config.checkpoint_every=10", "--config.kmeans_tokens=256"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text"),
                      "To be, or not to be, line {}: that is the question.", lines=400, cycle=13)


@pytest.fixture(scope="module")
def exact_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("llama_exact")
  result = last_json(run("train.llama", "--mesh=2", f"--workdir={workdir}",
                         f"--config.text={corpus}", "--config.steps=20", "--config.lr=1e-2",
                         *TINY))
  return workdir, result


def test_exact_perplexity_same_on_mesh_1_and_4(exact_run):
  workdir, trained = exact_run
  saved = json.loads((workdir / "config.json").read_text())
  assert (saved["family"], trained["family"], trained["variant"]) == ("llama", "llama", "nano")
  assert trained["perplexity"] < 256  # learnt something beyond uniform bytes
  one = last_json(run("infer.llama", f"--workdir={workdir}", "--mesh=1", "--eval"))
  four = last_json(run("infer.llama", f"--workdir={workdir}", "--mesh=4", "--eval"))
  assert one["perplexity"] == pytest.approx(four["perplexity"], rel=1e-5)
  assert one["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-5)
  # the K/V heads cross the link: nano's 2 x 8 = 16 float32 values per token; each
  # device contributes its 8 tokens' K and V in each of 2 layers
  assert four["bits_per_token"] == 16 * 32
  assert four["bytes_per_device"] == four["bytes_per_device_formula"] == 8 * 16 * 4 * 2 * 2


def test_vq_finetune_eval_and_generation(exact_run, corpus, tmp_path):
  workdir, _ = exact_run
  vq_dir = tmp_path / "vq"
  proc = run("train.llama", "--mesh=4", f"--workdir={vq_dir}", f"--init-from={workdir}",
             f"--config.text={corpus}", "--config.exchange=vq", "--config.vq.groups=4",
             "--config.vq.codebook_size=16", "--config.steps=5", *TINY)
  result = last_json(proc)
  assert "k-means" in proc.stdout and result["exchange"] == "vq"
  assert result["bits_per_token"] == 16 and result["family"] == "llama"
  # what a user waits for is announced on stdout, before the closing JSON line
  cache = re.escape(os.path.join(os.environ["ASTRA_CACHE_DIR"], "codebooks", ""))  # conftest's
  assert re.search(rf"^codebooks: k-means (saved to|loaded from) {cache}", proc.stdout, re.M)
  assert re.search(r"^compiled the training step in \d+\.\d s$", proc.stdout, re.M)
  proc = run("infer.llama", f"--workdir={vq_dir}", "--mesh=4", "--eval")
  evaluated = last_json(proc)
  assert re.search(r"^compiled the evaluation forward in \d+\.\d s$", proc.stdout, re.M)
  assert re.search(r"^compiled the forward again for its bytes per device in \d+\.\d s$",
                   proc.stdout, re.M)
  assert stderr_lines(proc) == []
  assert evaluated["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)
  assert evaluated["bytes_per_device"] == evaluated["bytes_per_device_formula"]
  gen = run("infer.llama", f"--workdir={vq_dir}", "--mesh=4", "--prompt", "To be, or",
            "--max-new-tokens", "12")
  out = last_json(gen)
  assert out["new_tokens"] == 12 and gen.stdout.startswith("To be, or")
  assert out["completion"] in gen.stdout
  # generation's compiles are said on stderr (stdout is the text), before it streams
  assert [re.sub(r"\d+\.\d s$", "N s", line) for line in stderr_lines(gen)] == [
      "compiled the prefill in N s", "compiled the decode step in N s"]


def test_bad_input_gives_clear_errors(exact_run, corpus, tmp_path):
  workdir, _ = exact_run
  cases = [
      (["infer.llama", f"--workdir={workdir}", "--mesh=2", "--exchange=vq", "--eval"],
       "python -m train.llama --init-from"),
      (["train.llama", "--mesh=2", f"--workdir={tmp_path}/a", f"--config.text={corpus}",
        "--config.family=bert", *TINY], "unknown model family 'bert'"),
      (["train.llama", "--mesh=2", f"--workdir={tmp_path}/b", f"--config.text={corpus}",
        "--config.variant=huge", "--config.context=32"], "unknown Llama variant 'huge'"),
  ]
  assert_clean_errors(cases)


def test_family_from_config():
  """The Llama config is the GPT-2 one with another family; run folders written
  before there were families (no ``family`` key) are GPT-2."""
  cfg = config.load("llama_shakespeare")
  assert isinstance(lm.model_config(cfg), llama.LlamaConfig)
  old = config.load("gpt2_shakespeare")
  del old["family"]
  assert isinstance(lm.model_config(old), gpt2.GPT2Config)
  assert lm.exchanged_shape(lm.model_config(cfg)) == (64, 4)  # micro: 2 K/V heads x 32
  assert lm.exchanged_shape(lm.model_config(old)) == (128, 4)
