"""Pretrained checkpoints on the LM CLIs: ``--model`` (infer) and ``--init-from``
(train) with a tiny Llama written as a transformers folder.

The real SmolLM2 file is proven against transformers in tests/test_gguf.py;
here the point is the command-line path end to end, on models small enough
for CI.  The bad inputs a user meets here (a mistyped scheme, a truncated or
foreign GGUF, a folder without weights, a prompt longer than the window) are
in tests/test_bad_input.py.
"""

import json

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="needs safetensors: .venv/bin/python -m pip install "
                    "safetensors")
pytest.importorskip("tokenizers")
import hf_helpers  # noqa: E402
from cli_helpers import last_json, run, write_corpus  # noqa: E402

TINY = ["--config.context=32", "--config.batch_size=2", "--config.log_every=1",
        "--config.warmup_steps=1", "--config.eval_windows=2", "--config.eval_batch_size=2",
        "--config.kmeans_tokens=128", "--config.vq.groups=4", "--config.vq.codebook_size=16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text"), "When in disgrace with fortune, line {}.",
                      lines=300, cycle=11)


@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
  return hf_helpers.write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", corpus)


def test_model_flag_evaluates_the_same_on_mesh_1_and_4(hf_folder, corpus):
  common = ("infer.llama", f"--model=hf:{hf_folder}", "--eval", f"--text={corpus}",
            "--context=32", "--eval-windows=2")
  one = last_json(run(*common, "--mesh=1"))
  four = last_json(run(*common, "--mesh=4"))
  assert one["model"] == f"hf:{hf_folder}" and one["family"] == "llama"
  assert one["tokens"] == four["tokens"] == 64
  assert one["perplexity"] == pytest.approx(four["perplexity"], rel=1e-5)
  assert four["bytes_per_device"] == four["bytes_per_device_formula"] > 0


def test_zero_shot_astra_and_fine_tuning_from_a_checkpoint(hf_folder, corpus, tmp_path):
  zero = run("infer.llama", f"--model=hf:{hf_folder}", "--eval", f"--text={corpus}",
             "--context=32", "--eval-windows=2", "--mesh=4",
             "--exchange=vq:groups=4,codebook_size=16")
  zero_shot = last_json(zero)
  assert zero_shot["exchange"] == "vq" and zero_shot["bits_per_token"] == 16
  assert np.isfinite(zero_shot["perplexity"])

  work = tmp_path / "g4"
  proc = run("train.llama", "--mesh=4", f"--init-from=hf:{hf_folder}", f"--workdir={work}",
             f"--config.text={corpus}", "--config.exchange=vq", "--config.steps=2", *TINY)
  trained = last_json(proc)
  assert "k-means" in proc.stdout and trained["exchange"] == "vq"
  saved = json.loads((work / "config.json").read_text())
  assert saved["model"] == f"hf:{hf_folder}" and saved["tokenizer"] == f"hf:{hf_folder}"
  assert saved["vocab_size"] == hf_helpers.TINY_LLAMA_VOCAB and saved["family"] == "llama"
  again = last_json(run("infer.llama", f"--workdir={work}", "--mesh=4", "--eval"))
  assert again["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-5)
  gen = last_json(run("infer.llama", f"--workdir={work}", "--mesh=2", "--prompt",
                      "When in disgrace", "--max-new-tokens=5"))
  assert gen["new_tokens"] == 5
