"""The README's quick start stays true: each command in its marked block runs,
on tiny data, and ends with the JSON fields the guide names after ``->``.

The block is read from README.md, so editing the guide edits this test.  What
the test changes, and only that: it runs in a temporary folder (so run
folders land there), the ViT
commands read a tiny generated dataset with the tiny config the other CLI
tests use (4-group, 16-entry codebooks for ASTRA), and ``--model smollm2`` is
a tiny Llama written as a transformers folder (the real SmolLM2 is proven
against transformers in tests/test_gguf.py).  ``bash setup.sh main ARGS`` is
run as what setup.sh executes for it, which the test reads from setup.sh.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
import hf_helpers  # noqa: E402
from cli_helpers import VIT_TINY, write_corpus, write_idx_dataset  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN_JOB = 'exec .venv/bin/python -m train.vit --mesh=4 "$@"'  # setup.sh's main mode
VQ_TINY = ["--config.vq.groups=4", "--config.vq.codebook_size=16"]


def quickstart() -> list[tuple[list[str], list[str]]]:
  """(argv, JSON fields) of each command in README.md's quick-start block."""
  text = (ROOT / "README.md").read_text()
  block = re.search(r"<!-- quickstart:begin -->\n```bash\n(.*?)```\n<!-- quickstart:end -->",
                    text, re.S)
  assert block, "README.md has no quick-start block between its markers"
  commands = []
  for line in block.group(1).replace("\\\n", " ").splitlines():
    line = line.strip()
    if not line or line.startswith("#") or line.startswith("source "):
      continue
    command, _, fields = line.partition("# ->")
    commands.append((shlex.split(command), [f.strip() for f in fields.split(",") if f.strip()]))
  return commands


def test_the_block_is_what_a_user_types():
  commands = quickstart()
  assert len(commands) >= 6 and all(fields for _, fields in commands), commands
  assert all(argv[:2] in (["python", "-m"], ["bash", "setup.sh"]) for argv, _ in commands)
  assert MAIN_JOB in (ROOT / "setup.sh").read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  corpus = write_corpus(tmp_path_factory.mktemp("text"), "When in disgrace with fortune, line {}.",
                        lines=300, cycle=11)
  return dict(images=write_idx_dataset(tmp_path_factory.mktemp("idx")), corpus=corpus,
              llama=hf_helpers.write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", corpus))


def tiny_run(argv: list[str], tiny: dict) -> list[str]:
  """The command with the test's substitutions (module docstring)."""
  if argv[:3] == ["bash", "setup.sh", "main"]:
    argv = ["python", "-m", "train.vit", "--mesh=4", *argv[3:]]
  module = argv[argv.index("--") + 1] if "--" in argv else argv[2]
  extra = []
  if module in ("train.vit", "infer.vit"):
    extra = [f"--data-dir={tiny['images']}"]
  if module == "train.vit":
    extra += VIT_TINY + (VQ_TINY if "--config.exchange=vq" in argv else [])
  for i, a in enumerate(argv):
    if a == "smollm2" and argv[i - 1] == "--model":
      argv[i] = f"hf:{tiny['llama']}"
      extra = [f"--text={tiny['corpus']}", "--context=32"]
  return [sys.executable, *argv[1:], *extra]


def test_every_quickstart_command_runs_and_prints_its_fields(tiny, tmp_path):
  # run where the guide's relative paths (workdir/...) land in a temporary folder
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
  for argv, fields in quickstart():
    proc = subprocess.run(tiny_run(argv, tiny), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    shown = " ".join(argv)
    assert proc.returncode == 0, (shown, proc.stdout[-2000:], proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(fields) <= set(result), (shown, sorted(result))
    if "completion" in fields:
      assert isinstance(result["completion"], str) and result["new_tokens"] > 0, (shown, result)
