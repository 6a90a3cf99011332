"""Tables kept between markers in a markdown file (RESULTS.md), rewritten in place."""

from __future__ import annotations

import os


def replace_block(markdown: str, name: str, text: str) -> None:
  """``text`` between the ``<!-- NAME:begin -->`` / ``end`` markers of ``markdown``
  (appended with its markers when they are missing)."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  body = open(markdown).read() if os.path.exists(markdown) else ""
  block = f"{begin}\n{text}\n{end}"
  if begin in body:
    head, rest = body.split(begin, 1)
    body = head + block + rest.split(end, 1)[1]
  else:
    body += ("\n" if body else "") + block + "\n"
  with open(markdown, "w") as f:
    f.write(body)
