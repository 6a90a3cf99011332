"""Running the CLIs as a user would, in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def run(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def last_json(proc):
  """The JSON object a successful CLI prints as its last line."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_clean_errors(cases):
  """Each (argv, message): exit code 2, the message on stderr, no traceback."""
  for args, message in cases:
    proc = run(*args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# a whole tqdm bar: ``train:  40%|####  | 32/80 [00:01<00:02, 25.0step/s, loss=2.7]``, or
# without a total ``evaluate: 1batch [00:02,  2.41s/batch]``; text glued after its
# closing bracket (a log line written without a newline first) is not part of it
_BAR = re.compile(r"[\w ]+:\s+(\d+%\|.*\|\s*\d+/\d+|\d+[a-z]+) \[[^\]]*\]\s*")


def stderr_lines(proc_or_text):
  """stderr without progress bars (tqdm redraws with \\r, which splitlines splits on)."""
  text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
  return [line for line in text.splitlines() if line.strip() and not _BAR.fullmatch(line)]


def assert_one_line_error(proc, code, message):
  """Exit status ``code`` and stderr (bars aside) exactly one line holding ``message``."""
  lines = stderr_lines(proc)
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  return lines[0]


def write_corpus(folder: Path, line: str, *, lines: int, cycle: int) -> Path:
  """``folder/verse.txt``: ``lines`` lines of ``line`` with ``{}`` filled by
  ``i % cycle`` (a small text the nano LMs learn in a few steps)."""
  path = Path(folder) / "verse.txt"
  path.write_text("".join(line.format(i % cycle) + "\n" for i in range(lines)))
  return path


VIT_TINY = ["--config.variant=mu/4", "--config.image_size=16", "--config.batch_size=8",
            "--config.log_every=1", "--config.warmup_steps=2", "--config.eval_batch_size=16",
            "--config.lr=3e-3", "--config.augment=false"]


def write_vit_run(folder: Path) -> Path:
  """``folder/run``: a ViT run folder (config.json of the ViT task only), what the
  CLIs of other tasks must refuse."""
  workdir = Path(folder) / "run"
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text('{"dataset": "fashion_mnist", "variant": "mu/7"}')
  return workdir


def write_idx_dataset(folder: Path, n_train: int = 64, n_test: int = 32) -> Path:
  """A tiny learnable IDX dataset (8x8 images, the label a bright row) in the
  Fashion-MNIST layout, for train.vit / infer.vit with ``VIT_TINY``."""
  import numpy as np
  from test_data_images import idx_bytes
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
    images[np.arange(n), labels % 8, :] = 250  # the label is a bright row: learnable
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
  return folder
