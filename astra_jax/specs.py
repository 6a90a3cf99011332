"""Strategy spec strings: 'name:key=value,key=value' -> (name, options).

K/V exchanges (``astra_jax.exchange``) and tensor-parallel syncs
(``astra_jax.tensor_parallel``) are both chosen by such a string on the
command line and in the bench, e.g. ``vq:groups=32,codebook_size=1024`` or
``flash:bits=8``.  Values become int, float or bool where they parse as one.
"""

from __future__ import annotations


def parse_spec(spec: str, example: str) -> tuple[str, dict]:
  """Splits a spec; ValueError naming the fix (with ``example``) when malformed."""
  name, _, opts = spec.partition(":")
  options = {}
  for item in filter(None, opts.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"spec {spec!r}: write options as key=value, e.g. {example}")
    options[key.strip()] = _value(value.strip())
  return name.strip(), options


def _value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)
