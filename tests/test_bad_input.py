"""Every bad input a user reported, through the real CLIs (subprocesses).

Each case asserts exit code 2, exactly one line on stderr naming the fix (no
traceback, no usage block), and that nothing was created or changed on disk.
The runs the cases point at are tiny (one training step of the nano models).
"""

import os
import socket

import pytest

from cli_helpers import last_json, run

LM_TINY = ["--config.variant=nano", "--config.context=32", "--config.batch_size=2",
           "--config.log_every=1", "--config.warmup_steps=1", "--config.eval_windows=2",
           "--config.eval_batch_size=2", "--config.steps=1", "--config.kmeans_tokens=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "verse.txt"
  path.write_text("".join(f"Shall I compare thee, line {i % 7}?\n" for i in range(200)))
  return path


@pytest.fixture(scope="module")
def lm_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm") / "run"
  last_json(run("train.gpt2", "--mesh=2", f"--workdir={workdir}", f"--config.text={corpus}",
                *LM_TINY))
  return workdir


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
  """A ViT run folder: config.json of the ViT task (what the LM CLIs must refuse)."""
  workdir = tmp_path_factory.mktemp("vit") / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"dataset": "fashion_mnist", "variant": "mu/7"}')
  return workdir


def _snapshot(*roots):
  """Every path under ``roots`` with its size and modification time."""
  seen = {}
  for root in roots:
    for folder, dirs, files in os.walk(root):
      for name in dirs + files:
        path = os.path.join(folder, name)
        st = os.stat(path)
        seen[path] = (st.st_size, st.st_mtime_ns)
  return seen


def _fails_cleanly(args, message, *, watch=(), cwd_files=()):
  before = _snapshot(*watch)
  proc = run(*args)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-2000:])
  assert len(lines) == 1, (args, proc.stderr[-2000:])
  assert lines[0].startswith("error: ") and message in lines[0], (args, lines[0])
  assert _snapshot(*watch) == before, f"{args} changed files on disk"
  for path in cwd_files:
    assert not os.path.exists(path), f"{args} created {path}"
  return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--mesh=-2"], "argument --mesh: must be >= 1, got -2"),
    (["--mesh=0"], "argument --mesh: must be >= 1, got 0"),
    (["--mesh=two"], "argument --mesh: expected an integer >= 1, got 'two'"),
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: must be >= 0, got -5"),
    (["--temperature", "-1"], "argument --temperature: must be in [0, inf), got -1"),
    (["--eval-windows", "0"], "argument --eval-windows: must be >= 1, got 0"),
    (["--drop-rate", "1.5"], "argument --drop-rate: must be in [0, 1), got 1.5"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_lm_flags_out_of_range(lm_run, args, message):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", *args), message, watch=[lm_run])


def test_vit_flags_out_of_range(vit_run):
  _fails_cleanly(("infer.vit", f"--workdir={vit_run}", "--mesh=-2"),
                 "argument --mesh: must be >= 1, got -2", watch=[vit_run])


def test_empty_prompt(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--mesh=2", "--prompt", ""),
                 "--prompt is empty", watch=[lm_run])


def test_prompt_longer_than_context(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--mesh=2", "--prompt", "x" * 40,
                  "--max-new-tokens", "1"), "exceeds the model's context of 32 tokens",
                 watch=[lm_run])


def test_lm_cli_on_a_vit_run(vit_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={vit_run}", "--eval"),
                 "is a run of an image classifier (train.vit; evaluate with infer.vit), not "
                 "a language model", watch=[vit_run])


def test_vit_cli_on_an_lm_run(lm_run):
  _fails_cleanly(("infer.vit", f"--workdir={lm_run}"),
                 "is a run of a language model (train.gpt2 / train.llama; evaluate with "
                 "infer.gpt2 / infer.llama), not an image classifier", watch=[lm_run])


def test_checkpoints_folder_instead_of_the_run(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run / 'checkpoints'}", "--eval"),
                 f"(pass the run folder above it: {lm_run})", watch=[lm_run])


def test_hugging_face_folder_instead_of_a_run(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "model.safetensors").write_bytes(b"")
  _fails_cleanly(("infer.gpt2", f"--workdir={folder}", "--eval"),
                 "looks like a Hugging Face model folder", watch=[tmp_path])


def test_exchange_spec_with_unknown_option(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--exchange", "vq:grups=32"),
                 "exchange 'vq' has no option(s) ['grups']", watch=[lm_run])


def test_exchange_spec_unknown_name(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--exchange", "zigzag"),
                 "unknown exchange 'zigzag'; choose one of", watch=[lm_run])


def test_vq_evaluation_of_an_exact_run(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--exchange", "vq:groups=4"),
                 "was trained with the 'exact' exchange and has no codebooks; fine-tune one "
                 "first", watch=[lm_run])


def test_mesh_that_does_not_divide_the_context(lm_run):
  line = _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--mesh=3"),
                        "context length 32 is not divisible by the mesh size 3", watch=[lm_run])
  assert "e.g. 30 or 33" in line and "(1, 2, 4, 8, 16, 32)" in line


def test_mesh_larger_than_the_context_suggests_no_zero(lm_run):
  line = _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--mesh=64"),
                        "context length 32 is not divisible by the mesh size 64", watch=[lm_run])
  assert "e.g. 64)" in line and " 0 " not in line


def test_coordinator_port_in_use(lm_run):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--mesh=2",
                    f"--coordinator=127.0.0.1:{port}", "--num-processes=2", "--process-id=0"),
                   f"port {port} of --coordinator 127.0.0.1:{port} is not free", watch=[lm_run])
