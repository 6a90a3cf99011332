"""Real multi-process runs on this machine (jax.distributed over gloo) equal the
one-process fake-device run; a dead rank stops the others quickly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import last_json, run, write_corpus

TINY = ["--config.variant=nano", "--config.context=32", "--config.batch_size=4",
        "--config.log_every=5", "--config.warmup_steps=2", "--config.eval_windows=4",
        "--config.eval_batch_size=4", "--config.checkpoint_every=10"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text"), "Now is the winter of our discontent, {}.",
                      lines=300, cycle=7)


def launch(procs, *args, timeout=600):
  return run("infer.launch", f"--procs={procs}", "--", *args, timeout=timeout)


def test_train_and_eval_across_processes_equal_one_process(corpus, tmp_path):
  common = [f"--config.text={corpus}", "--config.steps=6", "--config.lr=1e-2", *TINY]
  one = last_json(run("train.gpt2", "--mesh=4", f"--workdir={tmp_path}/one", *common))
  two = last_json(launch(2, "train.gpt2", "--mesh=4", f"--workdir={tmp_path}/two", *common))
  assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
  assert two["bytes_per_device"] == one["bytes_per_device"] > 0
  # evaluation of the one-process run, split over 2 and 4 processes
  ref = last_json(run("infer.gpt2", f"--workdir={tmp_path}/one", "--mesh=4", "--eval"))
  out = last_json(launch(2, "infer.gpt2", f"--workdir={tmp_path}/one", "--mesh=4", "--eval"))
  assert out["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
  assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  assert ref["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
  # 4 processes with the stream exchange: each block on host threads (TCP) to the
  # later ranks only (astra_jax.parallel.stream_transport), nothing in XLA
  out = last_json(launch(4, "infer.gpt2", f"--workdir={tmp_path}/one", "--mesh=4", "--eval",
                         "--exchange=stream:quantize=false"))
  assert out["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
  assert out["exchange"] == "stream" and out["bytes_per_device"] == 0  # none in the program
  # generation: prefill over 2 processes, the owner of the last prompt token decodes
  gen = ["infer.gpt2", f"--workdir={tmp_path}/one", "--mesh=4", "--prompt", "Now is",
         "--max-new-tokens=8"]
  single = run(*gen)
  want = last_json(single)
  proc = launch(2, *gen, f"--out={tmp_path}/gen.json")
  got = last_json(proc)  # the decoding rank's result, not rank 0's empty one
  assert want["completion"] and got["new_tokens"] == 8
  assert got == dict(want, decoded_by_process=1)  # "Now is" ends in the second half
  assert json.loads((tmp_path / "gen.json").read_text()) == got  # --out: the decoder's too
  # each rank's stdout is its own text alone: gloo's connection lines are dropped,
  # and the one cutting the streamed prompt's line is taken out of it
  lines = proc.stdout.splitlines()[:-1]
  rank = {i: [line[len(f"[rank {i}] "):] for line in lines if line.startswith(f"[rank {i}] ")]
          for i in (0, 1)}
  assert len(rank[0]) + len(rank[1]) == len(lines)
  assert rank[1][:-1] == single.stdout.splitlines()[:-1]  # "Now is" + the completion
  assert rank[1][-1] == proc.stdout.splitlines()[-1]  # the launcher's last line: rank 1's
  assert rank[0][0] == "prefill done; decoding continues on process 1"
  assert json.loads(rank[0][1]) == dict(got, completion="", new_tokens=0) and len(rank[0]) == 2
  assert "Gloo" not in proc.stdout + proc.stderr


def test_bad_flags_are_named(tmp_path):
  proc = run("infer.gpt2", f"--workdir={tmp_path}", "--mesh=3", "--eval",
             "--coordinator=127.0.0.1:1", "--num-processes=2", "--process-id=0")
  assert proc.returncode == 2 and "cannot be split evenly over 2 processes" in proc.stderr
  proc = run("infer.gpt2", f"--workdir={tmp_path}", "--mesh=2", "--eval", "--num-processes=2")
  assert proc.returncode == 2 and "missing --coordinator --process-id" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_killed_rank_stops_the_others(corpus, tmp_path):
  cmd = [sys.executable, "-m", "infer.launch", "--procs=2", "--", "train.gpt2", "--mesh=2",
         f"--workdir={tmp_path}/run", f"--config.text={corpus}", "--config.steps=100000",
         *TINY]
  launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
  try:
    for line in launcher.stderr:  # wait until rank 1 trains (its progress bar)
      if line.startswith("[rank 1]") and "step/s" in line:
        break
    victim = subprocess.run(["pgrep", "-f", "--", f"--workdir={tmp_path}/run .*--process-id=1"],
                            capture_output=True, text=True).stdout.split()
    assert victim, "rank 1 not found"
    os.kill(int(victim[0]), signal.SIGKILL)
    start = time.monotonic()
    _, err = launcher.communicate(timeout=90)
    assert time.monotonic() - start < 60
  finally:
    if launcher.poll() is None:
      launcher.terminate()  # the launcher stops its ranks on SIGTERM
      launcher.wait(timeout=60)
  assert launcher.returncode != 0
  assert "rank 1 exited with code -9" in err
  left = subprocess.run(["pgrep", "-f", "--", f"--workdir={tmp_path}/run"], capture_output=True,
                        text=True).stdout.split()
  assert not left, "ranks left running"
