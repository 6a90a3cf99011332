"""One trainer per run folder (``workdir.lock``): a second trainer on a folder in
use is refused with one line naming the holder and leaves the folder as it was;
the lock dies with its process, so a killed trainer's folder is taken over and
resumed.  (A 2-process run does not refuse itself: tests/test_multiprocess.py
trains one.)"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_helpers import assert_one_line_error, last_json, run, write_corpus

from astra_jax.run import workdir

TINY = ["--config.variant=nano", "--config.context=32", "--config.batch_size=4",
        "--config.log_every=5", "--config.warmup_steps=2", "--config.eval_windows=4",
        "--config.eval_batch_size=4", "--config.checkpoint_every=10"]

# holds the folder's lock until killed or its stdin closes
HOLD = ("import sys; from astra_jax.run import workdir; workdir.lock(sys.argv[1]); "
        "print('held', flush=True); sys.stdin.read()")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("text"),
                      "To be, or not to be, line {}: that is the question.", lines=400, cycle=13)


def hold(folder):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "held\n"
  return proc


def stopped(pid, timeout=30):
  """Waits until every thread of ``pid`` is stopped: kill() returns before the
  signal lands, and orbax's writer threads may still finish a write (seen in CI)."""
  deadline = time.monotonic() + timeout
  while True:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{task}/stat") as f:
        states.append(f.read().rsplit(")", 1)[1].split()[0])
    if all(s in "Tt" for s in states):
      return
    assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
    time.sleep(0.05)


def snapshot(folder):
  """Every file and folder under ``folder`` with its size and mtime."""
  seen = {}
  for parent, dirs, files in os.walk(folder):
    for name in dirs + files:
      st = os.stat(os.path.join(parent, name))
      seen[os.path.join(parent, name)] = (st.st_size, st.st_mtime_ns)
  return seen


def saved_steps(folder):
  ckpts = folder / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def test_lock_has_one_holder_and_dies_with_it(tmp_path):
  folder = tmp_path / "run"
  path = folder / workdir.LOCK
  holder = hold(folder)
  try:
    text = path.read_text()
    with pytest.raises(workdir.Busy) as refused:
      workdir.lock(str(folder))
    assert str(refused.value).startswith(
        f"{folder} is being trained by process {holder.pid} (python -c import sys; ")
    assert str(refused.value).endswith(f"on host {socket.gethostname()}); wait for it or stop it")
    assert path.read_text() == text and os.listdir(folder) == [workdir.LOCK]
  finally:
    holder.kill()  # SIGKILL: no clean-up ran, the file still names it
    holder.wait()
  assert json.loads(path.read_text())["pid"] == holder.pid
  workdir.lock(str(folder))  # taken over: the OS dropped the dead holder's lock
  try:
    assert json.loads(path.read_text())["pid"] == os.getpid()
    workdir.lock(str(folder))  # already this process's
    with open(path) as f, pytest.raises(BlockingIOError):
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the OS, not only written down
  finally:
    workdir.release(str(folder))
  with open(path) as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    # a holder that has not written its name yet is still obeyed
    path.write_text("")
    with pytest.raises(workdir.Busy, match="by another process \\(it has not yet written"):
      workdir.lock(str(folder))


def test_trainers_refused_by_a_held_folder_write_nothing(corpus, tmp_path, capfd):
  """Through infer.results (which runs the train CLIs) and a 2-process launch."""
  from infer import results
  folder = tmp_path / "run"
  holder = hold(folder)
  try:
    before = snapshot(folder)
    args = ["--mesh=2", f"--workdir={folder}", f"--config.text={corpus}", "--config.steps=5",
            *TINY]
    capfd.readouterr()
    with pytest.raises(SystemExit) as stopped:
      results._run("train.gpt2", *args)  # stops with the trainer's own line and status
    err = capfd.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"error: {folder} is being trained by process {holder.pid} (python -c "), err
    proc = run("infer.launch", "--procs=2", "--", "train.gpt2", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"[rank 0] error: {folder} is being trained by process {holder.pid}" in proc.stderr
    assert f"[rank 1] error: process 0 of this run could not lock {folder}" in proc.stderr
    assert snapshot(folder) == before
  finally:
    holder.kill()
    holder.wait()


def test_second_trainer_refused_then_killed_ones_folder_taken_over(corpus, tmp_path):
  folder = tmp_path / "run"
  args = ["--mesh=1", f"--workdir={folder}", f"--config.text={corpus}", "--config.steps=100000",
          *TINY]
  with open(tmp_path / "first.err", "w") as err:
    first = subprocess.Popen([sys.executable, "-m", "train.gpt2", *args],
                             stdout=subprocess.DEVNULL, stderr=err)
  try:
    deadline = time.monotonic() + 300
    while not (saved_steps(folder) and (folder / "metrics.jsonl").exists()):
      assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
      assert time.monotonic() < deadline, "the first trainer saved no checkpoint"
      time.sleep(0.2)
    os.kill(first.pid, signal.SIGSTOP)  # alive and holding the lock, but writing nothing
    stopped(first.pid)
    before = snapshot(folder)
    second = run("train.gpt2", *args)
    line = assert_one_line_error(
        second, 2, f"error: {folder} is being trained by process {first.pid} (python -m "
                   "train.gpt2 --mesh=1 --workdir=")
    assert line.endswith("; wait for it or stop it"), line
    assert snapshot(folder) == before  # no metrics row, checkpoint or config.json
  finally:
    first.kill()  # SIGKILL (a stopped process too): its lock goes with it
    first.wait()
  last = saved_steps(folder)[-1]
  third = run("train.gpt2", *args, f"--max-steps={last + 5}")
  result = last_json(third)
  assert f"resuming from step {last} in {folder}" in third.stdout
  assert result["steps"] == last + 5
  rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
  trained = [r["step"] for r in rows if "loss" in r]
  assert trained == sorted(set(trained)) and trained[-1] == last + 5  # each step once
  assert rows[-1]["step"] == last + 5 and "valid_perplexity" in rows[-1]
