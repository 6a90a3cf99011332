"""What the server tests share: a tiny Llama folder with a chat template, the
CLIs as subprocesses, and waiting for a server's start-up JSON line."""

import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

import pytest

import hf_helpers
from cli_helpers import write_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def python(*args, **kwargs) -> subprocess.Popen:
  """``python -m ARGS`` from the repo root, unbuffered, text mode."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                          **kwargs)


def tiny_chat_llama(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(a random tiny Llama transformers folder with TEMPLATE, the corpus its
  tokenizer was trained on)."""
  corpus = write_corpus(tmp_path_factory.mktemp("text"), "When in disgrace with fortune, "
                        "line {}.", lines=300, cycle=11)
  folder = hf_helpers.write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", corpus)
  (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
  return folder, corpus


def wait_for_start(proc: subprocess.Popen, log: pathlib.Path, limit_s: float,
                   prefix: str = "") -> dict:
  """The start-up JSON line (after ``prefix``) of a server on ``proc``'s stdout;
  fails the test with the end of ``log`` if it does not come in ``limit_s``."""
  lines: queue.Queue = queue.Queue()

  def read():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)  # stdout closed: the server ended

  threading.Thread(target=read, daemon=True).start()
  deadline = time.monotonic() + limit_s
  while True:
    try:
      line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
    except queue.Empty:
      pytest.fail(f"no start-up line in {limit_s} s:\n{log.read_text()[-3000:]}")
    if line is None:
      pytest.fail(f"the server ended before serving:\n{log.read_text()[-3000:]}")
    if line.startswith(prefix + "{"):
      return json.loads(line[len(prefix):])
