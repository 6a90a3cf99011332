"""Every bad input a user reported (issue 15), through the real CLIs (subprocesses).

A bad flag, file or folder ends with exit status 2 and exactly one line on
stderr naming the fix (no traceback, no usage block), and nothing created or
changed on disk; a training run that stops (a signal, a NaN loss, a full
disk, a dead peer) says so in one line with its own exit status and leaves a
run that the same command resumes.  The runs the cases point at are tiny (the
nano language model, 80 steps of 2 windows of 32 tokens).

Cases, each with its test(s):

- flags out of range: ``--mesh=-2`` / ``0`` / ``two``, ``--max-new-tokens -5``,
  ``--temperature -1``, ``--eval-windows 0``, ``--drop-rate 1.5``, an unknown
  flag (test_lm_flags_out_of_range, test_vit_flags_out_of_range)
- config values out of range, refused before anything is written:
  ``--config.batch_size=0``, ``--config.steps=0``, a negative lr
  (test_bad_lm_config_values_fail_before_anything_is_written); the ViT ones,
  ``epochs=0`` and a batch larger than the dataset among them
  (test_bad_vit_config_values_fail_before_anything_is_written)
- an empty prompt (test_empty_prompt); a prompt longer than the context of a
  run (test_prompt_longer_than_context) and of a pretrained model
  (test_prompt_longer_than_a_pretrained_models_window)
- the wrong kind of folder: infer.gpt2 on a ViT run and the reverse
  (test_lm_cli_on_a_vit_run, test_vit_cli_on_an_lm_run), a Hugging Face folder
  as a run (test_hugging_face_folder_instead_of_a_run) and as ``--init-from``
  without its scheme, leaving no run behind
  (test_init_from_a_hugging_face_folder_without_the_scheme)
- pretrained models: an unknown ``--model`` scheme, a missing file or folder
  (test_model_spec_with_unknown_scheme_or_missing_path), a bad ``--init-from``
  spec (test_init_from_a_bad_spec_writes_nothing), a GGUF of another
  architecture (test_gguf_of_another_architecture), a truncated GGUF
  (test_truncated_gguf), an HF folder without its weights
  (test_hf_folder_missing_its_weights)
- misleading hints: the mesh hint (test_mesh_that_does_not_divide_the_context,
  test_mesh_larger_than_the_context_suggests_no_zero), a run's checkpoints/ as
  ``--workdir`` (test_checkpoints_folder_instead_of_the_run), an unknown exchange
  option ``vq:grups=32`` (test_exchange_spec_with_unknown_option), an unknown
  exchange (test_exchange_spec_unknown_name), vq on an exact run
  (test_vq_evaluation_of_an_exact_run)
- ``--out`` and ``--workdir`` that cannot be written fail before the work
  (test_unwritable_out_and_workdir_fail_before_the_work); the result line is
  printed even when the final write of ``--out`` fails
  (test_result_is_printed_even_when_writing_out_fails)
- a checkpoint whose array bytes are garbled or truncated: a warning line and
  the newest good step (the same metric as evaluating that step), the training
  command moves the step aside to ``<step>.corrupt`` and continues, no good step
  left is one line naming the fix
  (test_corrupt_latest_checkpoint_falls_back_to_the_older_step)
- a NaN loss (``--config.lr=1e30``): exit 1, one line, the last good checkpoint
  kept, metrics.jsonl strict JSON
  (test_nan_loss_stops_and_keeps_the_last_good_checkpoint)
- a full disk while training: one line naming the step, no temporary folder
  left (test_full_disk_names_the_step_and_leaves_no_temporary_folder; needs
  root to mount a 1 MB tmpfs, skipped otherwise)
- SIGINT and SIGTERM while training (checkpoint at that step, exit 130 / 143,
  one line), then kill -9, each followed by the same command: the final
  metrics equal an uninterrupted run's, every step logged once
  (test_interrupts_and_kill_then_rerun_match_an_uninterrupted_run)
- multi-process: the coordinator's port already in use
  (test_coordinator_port_in_use); a peer killed with -9 without the launcher,
  process 1 or the coordinator: the survivor stops within 60 s with one line
  naming the dead process (test_killed_peer_stops_the_survivor_with_one_line)
"""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hf_helpers
from cli_helpers import (VIT_TINY, assert_one_line_error, last_json, run, stderr_lines,
                         write_corpus, write_idx_dataset, write_vit_run)

LM_TINY = ["--config.variant=nano", "--config.context=32", "--config.batch_size=2",
           "--config.log_every=1", "--config.warmup_steps=1", "--config.eval_windows=2",
           "--config.eval_batch_size=2", "--config.kmeans_tokens=64"]
LM_STEPS = 80
LM_RUN = [*LM_TINY, f"--config.steps={LM_STEPS}", "--config.checkpoint_every=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text"), "Shall I compare thee, line {}?",
                      lines=200, cycle=7)


def _train_lm(workdir, corpus):
  """The command of ``lm_trained`` (an interrupted run reruns exactly this one)."""
  return [sys.executable, "-m", "train.gpt2", "--mesh=2", f"--workdir={workdir}",
          f"--config.text={corpus}", *LM_RUN]


@pytest.fixture(scope="module")
def lm_trained(corpus, tmp_path_factory):
  """(run folder, result) of an uninterrupted nano GPT-2 run: checkpoints 76 and 80."""
  workdir = tmp_path_factory.mktemp("lm") / "run"
  return workdir, last_json(run(*_train_lm(workdir, corpus)[2:]))


@pytest.fixture(scope="module")
def lm_run(lm_trained):
  return lm_trained[0]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
  """A ViT run folder (what the LM CLIs must refuse)."""
  return write_vit_run(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory):
  return write_idx_dataset(tmp_path_factory.mktemp("tiny_idx"))


@pytest.fixture(scope="module")
def hf_folder(corpus, tmp_path_factory):
  pytest.importorskip("safetensors", reason="needs safetensors: .venv/bin/python -m pip install "
                      "safetensors")
  return hf_helpers.write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", corpus)


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


def _rows(workdir):
  """metrics.jsonl, every line strict JSON (a bare NaN fails)."""
  def no_nan(name):
    raise AssertionError(f"non-finite {name} in metrics.jsonl")
  return [json.loads(line, parse_constant=no_nan)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _values(rows):
  """Each row without its wall-clock fields: equal for equal training."""
  return [{k: v for k, v in r.items() if k not in ("time", "items_per_s")} for r in rows]


def _logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _saved_steps(workdir):
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


# -- flags and config values out of range ------------------------------------------------


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


def test_bad_lm_config_values_fail_before_anything_is_written(corpus, tmp_path):
  for flag, message in (("--config.steps=0", "--config.steps=0 is out of range; pass "
                                             "--config.steps as an integer >= 1"),
                        ("--config.batch_size=0", "--config.batch_size=0 is out of range"),
                        ("--config.lr=-0.001", "--config.lr=-0.001 is out of range")):
    proc = run("train.gpt2", "--mesh=1", f"--workdir={tmp_path}/run", f"--config.text={corpus}",
               *LM_TINY, flag)
    assert_one_line_error(proc, 2, message)
    assert not (tmp_path / "run").exists(), flag


def test_bad_vit_config_values_fail_before_anything_is_written(vit_data, tmp_path):
  cases = [("--config.batch_size=0", "--config.batch_size=0 is out of range; pass "
                                     "--config.batch_size as an integer >= 1"),
           ("--config.batch_size=1000", "more than the 64 training images"),
           ("--config.epochs=0", "--config.epochs=0 is out of range"),
           ("--config.checkpoint_every=0", "--config.checkpoint_every=0 is out of range"),
           ("--config.lr=0", "--config.lr=0.0 is out of range; pass --config.lr as a number > 0"),
           ("--config.warmup_steps=-1", "--config.warmup_steps=-1 is out of range")]
  for flag, message in cases:
    workdir = tmp_path / "run"
    proc = run("train.vit", "--mesh=1", f"--workdir={workdir}", f"--data-dir={vit_data}",
               *VIT_TINY, flag)
    assert_one_line_error(proc, 2, message)
    assert not workdir.exists(), flag


# -- prompts -------------------------------------------------------------------------------


def test_empty_prompt(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--mesh=2", "--prompt", ""),
                 "--prompt is empty", watch=[lm_run])


def test_prompt_longer_than_context(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--mesh=2", "--prompt", "x" * 40,
                  "--max-new-tokens", "1"), "exceeds the model's context of 32 tokens",
                 watch=[lm_run])


def test_prompt_longer_than_a_pretrained_models_window(hf_folder):
  _fails_cleanly(("infer.llama", f"--model=hf:{hf_folder}", "--context=8", "--mesh=1",
                  "--prompt", "When in disgrace with fortune and men's eyes",
                  "--max-new-tokens=4"), "exceeds the model's context of 8 tokens",
                 watch=[hf_folder])


# -- the wrong kind of folder --------------------------------------------------------------


def test_lm_cli_on_a_vit_run(vit_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={vit_run}", "--eval"),
                 "is a run of an image classifier (train.vit; evaluate with infer.vit), not "
                 "a language model", watch=[vit_run])


def test_vit_cli_on_an_lm_run(lm_run):
  _fails_cleanly(("infer.vit", f"--workdir={lm_run}"),
                 "is a run of a language model (train.gpt2 / train.llama; evaluate with "
                 "infer.gpt2 / infer.llama), not an image classifier", watch=[lm_run])


def test_hugging_face_folder_instead_of_a_run(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "model.safetensors").write_bytes(b"")
  _fails_cleanly(("infer.gpt2", f"--workdir={folder}", "--eval"),
                 "looks like a Hugging Face model folder", watch=[tmp_path])


def test_init_from_a_hugging_face_folder_without_the_scheme(hf_folder, tmp_path):
  work = tmp_path / "run"
  _fails_cleanly(("train.llama", f"--init-from={hf_folder}", f"--workdir={work}"),
                 f"(it looks like a Hugging Face model folder: pass it as hf:{hf_folder})",
                 watch=[tmp_path, hf_folder])
  assert not work.exists()


# -- pretrained models (--model, --init-from) ---------------------------------------------


def _gguf_llama(path, *, arch="llama", truncate=False):
  gguf = pytest.importorskip("gguf")
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  if truncate:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  return path


@pytest.mark.parametrize("spec, message", [
    ("foo:bar", "'foo:bar' names no pretrained model: write gguf:PATH"),
    ("gguf:/no/such/file.gguf", "gguf:/no/such/file.gguf: no such file"),
    ("hf:/no/such/folder", "hf:/no/such/folder: no such folder"),
])
def test_model_spec_with_unknown_scheme_or_missing_path(spec, message, tmp_path):
  _fails_cleanly(("infer.llama", f"--model={spec}", "--eval"), message, watch=[tmp_path])


def test_init_from_a_bad_spec_writes_nothing(tmp_path):
  work = tmp_path / "run"
  _fails_cleanly(("train.llama", "--init-from=foo:bar", f"--workdir={work}"),
                 "names no pretrained model", watch=[tmp_path])
  assert not work.exists()


def test_gguf_of_another_architecture(tmp_path):
  path = _gguf_llama(tmp_path / "gpt2.gguf", arch="gpt2")
  _fails_cleanly(("infer.llama", f"--model=gguf:{path}", "--eval"), "gpt2", watch=[tmp_path])


def test_truncated_gguf(tmp_path):
  path = _gguf_llama(tmp_path / "cut.gguf", truncate=True)
  _fails_cleanly(("infer.llama", f"--model=gguf:{path}", "--eval"), str(path),
                 watch=[tmp_path])


def test_hf_folder_missing_its_weights(hf_folder, tmp_path):
  folder = tmp_path / "no-weights"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(hf_helpers.tiny_llama_config()))
  (folder / "tokenizer.json").write_text((hf_folder / "tokenizer.json").read_text())
  _fails_cleanly(("infer.llama", f"--model=hf:{folder}", "--eval"),
                 "has neither model.safetensors nor model.safetensors.index.json",
                 watch=[tmp_path])


# -- misleading hints ----------------------------------------------------------------------


def test_checkpoints_folder_instead_of_the_run(lm_run):
  _fails_cleanly(("infer.gpt2", f"--workdir={lm_run / 'checkpoints'}", "--eval"),
                 f"(pass the run folder above it: {lm_run})", watch=[lm_run])


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


# -- --out and --workdir -------------------------------------------------------------------


def test_unwritable_out_and_workdir_fail_before_the_work(lm_run, corpus, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  proc = run("infer.gpt2", f"--workdir={lm_run}", "--mesh=1", "--eval",
             f"--out={a_file}/result.json")
  assert_one_line_error(proc, 2, f"--out {a_file}/result.json cannot be created: {a_file} is "
                        "a file")
  assert proc.stdout == ""  # nothing evaluated
  proc = run("train.gpt2", "--mesh=1", f"--workdir={a_file}/run", f"--config.text={corpus}",
             *LM_TINY)
  assert_one_line_error(proc, 2, f"--workdir {a_file}/run cannot be created")
  if os.geteuid() != 0:  # root writes through permissions
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = run("infer.gpt2", f"--workdir={lm_run}", "--mesh=1", "--eval",
               f"--out={locked}/result.json")
    assert_one_line_error(proc, 2, "is not writable (Permission denied")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["a_file"] + (["locked"] if os.geteuid() != 0 else []))


def test_result_is_printed_even_when_writing_out_fails(tmp_path, capsys, monkeypatch):
  from astra_jax.run import cli

  def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "replace", disk_full)
  with pytest.raises(SystemExit) as exit_:
    cli.print_result({"accuracy": 0.5}, str(tmp_path / "r.json"))
  captured = capsys.readouterr()
  assert exit_.value.code == 1 and json.loads(captured.out) == {"accuracy": 0.5}
  assert captured.err == (f"error: could not write --out {tmp_path}/r.json (No space left on "
                          "device); the result is the JSON line printed above\n")
  assert list(tmp_path.iterdir()) == []  # no half-written or temporary file


# -- corrupt checkpoints -------------------------------------------------------------------


def _flip_half(path):
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 4, len(data) * 3 // 4):
    data[i] ^= 0x5A
  path.write_bytes(data)


def _truncate_half(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _damage(step_dir, damage):
  files = [f for f in step_dir.glob("default/**/d/*") if f.is_file()]
  assert files
  for f in files:
    damage(f)


def test_corrupt_latest_checkpoint_falls_back_to_the_older_step(lm_trained, corpus, tmp_path):
  workdir, trained = lm_trained
  last, older_step = LM_STEPS, LM_STEPS - 4
  assert _saved_steps(workdir) == [older_step, last]
  evaluate = lambda run_dir, *flags: run("infer.gpt2", f"--workdir={run_dir}", "--mesh=1",
                                         "--eval", *flags)
  older = last_json(evaluate(workdir, f"--step={older_step}"))
  for name, damage in (("garbled", _flip_half), ("truncated", _truncate_half)):
    broken = tmp_path / name
    shutil.copytree(workdir, broken)
    _damage(broken / "checkpoints" / str(last), damage)
    proc = evaluate(broken)
    assert last_json(proc)["perplexity"] == older["perplexity"]
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: checkpoint {broken}/checkpoints/{last} is corrupt ("), lines
    assert lines[0].endswith(f"left in place, using step {older_step} instead")
    assert "<" not in lines[0]
    assert (broken / "checkpoints" / str(last)).is_dir()
  # the training command moves the corrupt step aside and trains it again
  again = run(*_train_lm(broken, corpus)[2:])
  assert last_json(again)["perplexity"] == trained["perplexity"]
  assert f"resuming from step {older_step} in" in again.stdout
  lines = stderr_lines(again)
  assert len(lines) == 1 and lines[0].endswith(
      f"moved it to {broken}/checkpoints/{last}.corrupt, using step {older_step} instead"), lines
  assert _saved_steps(broken) == [older_step, last]
  assert (broken / "checkpoints" / f"{last}.corrupt").is_dir()
  # no good step left: one line naming the fix
  _damage(broken / "checkpoints" / str(older_step), _truncate_half)
  _damage(broken / "checkpoints" / str(last), _truncate_half)
  line = assert_one_line_error(evaluate(broken), 2, f"no good checkpoint left: checkpoint "
                               f"{broken}/checkpoints/{last} is corrupt")
  assert line.endswith(f"(and 1 older steps, also corrupt); delete {broken}/checkpoints and "
                       "train again")


# -- training that stops: NaN loss, full disk, signals -------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
  workdir = tmp_path / "nan"
  proc = run("train.gpt2", "--mesh=2", f"--workdir={workdir}", f"--config.text={corpus}",
             *LM_TINY, "--config.steps=20", "--config.checkpoint_every=2", "--config.lr=1e30")
  line = assert_one_line_error(proc, 1, "training stopped without saving that state")
  found = re.search(r"error: loss is nan\b.*? at step (\d+): .*last good checkpoint, "
                    r"step (\d+), is kept in .*lower --config.lr", line)
  bad_step, kept = int(found.group(1)), int(found.group(2))
  assert kept < bad_step and _saved_steps(workdir)[-1] == kept
  assert [r["step"] for r in _rows(workdir)] == list(range(1, bad_step))
  # the kept checkpoint loads and evaluates (its weights, ~1e30 after one step at
  # that rate, give a NaN perplexity: a number all the same)
  evald = last_json(run("infer.gpt2", f"--workdir={workdir}", "--mesh=1", "--eval"))
  assert evald["tokens"] == 64 and isinstance(evald["perplexity"], float)


def test_full_disk_names_the_step_and_leaves_no_temporary_folder(corpus, tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  # 1 MB: the nano model's first checkpoint (~0.55 MB) fits, the next one does not
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                          str(disk)], capture_output=True).returncode:
    pytest.skip("needs root and tmpfs to make a small disk (tests/test_checkpoint.py "
                "simulates ENOSPC without them)")
  try:
    proc = run("train.gpt2", "--mesh=1", f"--workdir={disk}/run", f"--config.text={corpus}",
               *LM_RUN)
    line = assert_one_line_error(proc, 2, "failed (No space left on device")
    step = int(re.search(r"saving step (\d+) to ", line).group(1))
    assert f"{disk}/run/checkpoints" in line and "free space there" in line
    assert step not in _saved_steps(disk / "run") and _saved_steps(disk / "run")
    assert not list((disk / "run" / "checkpoints").glob("*tmp*"))
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def _interrupt(cmd, logs, ready, what, sig):
  """Runs ``cmd`` until ``ready()``, sends ``sig``; returns (exit status, stdout, stderr).

  Output goes to files: a pipe nobody reads would fill with progress bars and
  stall the run.
  """
  with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 300
    while not ready():
      assert proc.poll() is None, f"the run ended before {what}: {Path(f'{logs}.err').read_text()}"
      assert time.time() < deadline, f"no {what} within 300 s"
      time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=300)
  return code, Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def test_interrupts_and_kill_then_rerun_match_an_uninterrupted_run(lm_trained, corpus, tmp_path):
  """SIGINT, then SIGTERM, then kill -9 mid-training, each followed by the same
  command: the run ends exactly where an uninterrupted one does, every step
  logged once."""
  reference, expected = lm_trained
  workdir = tmp_path / "interrupted"
  cmd = _train_lm(workdir, corpus)
  stopped_at = 0
  for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    status, out, err = _interrupt(cmd, tmp_path / sig.name, lambda: _logged_steps(workdir)
                                  >= stopped_at + 5, "5 more logged steps", sig)
    lines = stderr_lines(err)
    assert status == code and len(lines) == 1, (status, err[-3000:])
    prefix = f"error: stopped by {sig.name} after step "
    assert lines[0].startswith(prefix) and "rerun the same command to resume" in lines[0]
    step = int(lines[0][len(prefix):].split(":")[0])
    assert stopped_at < step < LM_STEPS and _saved_steps(workdir)[-1] == step
    assert [r["step"] for r in _rows(workdir)] == list(range(1, step + 1))
    if stopped_at:
      assert f"resuming from step {stopped_at} in" in out
    stopped_at = step
  status, _, _ = _interrupt(cmd, tmp_path / "KILL", lambda: _saved_steps(workdir)[-1]
                            >= stopped_at + 4, "a new checkpoint", signal.SIGKILL)
  assert status == -signal.SIGKILL
  killed_at = _saved_steps(workdir)[-1]
  again = run(*cmd[2:])
  assert f"resuming from step {killed_at} in" in again.stdout
  assert last_json(again)["perplexity"] == expected["perplexity"]
  assert stderr_lines(again) == []
  rows = _rows(workdir)
  # the last row: the validation perplexity
  assert [r["step"] for r in rows] == list(range(1, LM_STEPS + 1)) + [LM_STEPS]
  assert _values(rows) == _values(_rows(reference))
  assert not list((workdir / "checkpoints").glob("*tmp*"))


# -- several processes ---------------------------------------------------------------------


def test_coordinator_port_in_use(lm_run):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    _fails_cleanly(("infer.gpt2", f"--workdir={lm_run}", "--eval", "--mesh=2",
                    f"--coordinator=127.0.0.1:{port}", "--num-processes=2", "--process-id=0"),
                   f"port {port} of --coordinator 127.0.0.1:{port} is not free", watch=[lm_run])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("victim", [1, 0], ids=["process_1", "coordinator"])
def test_killed_peer_stops_the_survivor_with_one_line(victim, corpus, tmp_path):
  """Two ranks started by hand (no infer.launch to stop the other): kill -9 one
  of them mid-training; the survivor stops within 60 s with one line naming
  the dead process, no stack dump.  jax's own abort of the survivor (SIGABRT,
  from the coordination service: at once when the coordinator dies, after the
  heartbeat timeout when the survivor waits in a barrier) may win the race
  with our exit 1; its stderr must still be that one line."""
  port = _free_port()
  cmd = [sys.executable, "-m", "train.gpt2", "--mesh=2", f"--workdir={tmp_path}/run",
         f"--config.text={corpus}", *LM_TINY, "--config.steps=100000",
         f"--coordinator=127.0.0.1:{port}", "--num-processes=2"]
  logs = [(tmp_path / f"rank{r}.out", tmp_path / f"rank{r}.err") for r in (0, 1)]
  procs = []
  try:
    for rank, (out_path, err_path) in enumerate(logs):
      with open(out_path, "w") as out, open(err_path, "w") as err:  # a pipe would stall it
        procs.append(subprocess.Popen([*cmd, f"--process-id={rank}"], stdout=out, stderr=err,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1")))
    deadline = time.monotonic() + 300  # until rank 1's progress bar counts a finished step
    while not any(re.search(r"\| *[1-9]\d*/100000 \[", path.read_text(errors="replace"))
                  for path in logs[1]):
      for rank, proc in enumerate(procs):
        assert proc.poll() is None, (rank, logs[rank][1].read_text()[-3000:])
      assert time.monotonic() < deadline, "rank 1 did not train within 300 s"
      time.sleep(0.2)
    procs[victim].kill()
    start = time.monotonic()
    survivor = procs[1 - victim]
    code = survivor.wait(timeout=90)
    took = time.monotonic() - start
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait(timeout=60)
  assert took < 60, took
  # the survivor's stderr passes through astra_jax.parallel.stderr_guard, which may
  # write its line just after the survivor exits
  err_path = logs[1 - victim][1]
  deadline = time.monotonic() + 20
  while not any(line.startswith("error: ") for line in stderr_lines(err_path.read_text())):
    assert time.monotonic() < deadline, err_path.read_text()[-3000:]
    time.sleep(0.1)
  time.sleep(0.5)
  err = err_path.read_text()
  lines = stderr_lines(err)
  assert len(lines) == 1, err[-3000:]
  for dump in ("Traceback", "Check failure", "stack trace", "Fatal Python error"):
    assert dump not in err, (dump, err[-3000:])
  at = r"( at [\w.:-]+:\d+)?"  # the peer's gloo address, when the error names it
  assert code in (1, -signal.SIGABRT), (code, err[-3000:])
  if victim == 1:
    assert re.match(rf"error: process 1{at} is gone \(.+\); process 0 stops too\.",
                    lines[0]), lines
  else:
    assert re.match(rf"error: (process 0{at}|the coordinator \(process 0\)) is gone \(.+\); "
                    r"process 1 stops too\.", lines[0]), lines
