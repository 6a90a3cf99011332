"""Running the CLIs as a user would, in a subprocess."""

import json
import os
import re
import subprocess
import sys


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


def stderr_lines(proc_or_text):
  """stderr without progress bars (tqdm redraws with \\r, which splitlines splits on)."""
  text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
  return [line for line in text.splitlines()
          if line.strip() and not re.match(r"^[\w ]+:\s+\d+%\|", line)]


def assert_one_line_error(proc, code, message):
  """Exit status ``code`` and stderr (bars aside) exactly one line holding ``message``."""
  lines = stderr_lines(proc)
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  return lines[0]
