"""Named strategies and their spec strings: 'name:key=value,key=value'.

K/V exchanges (``astra_jax.core.exchange``) and tensor-parallel syncs
(``astra_jax.core.sync``) are both frozen dataclasses registered by
name in a ``Registry`` and chosen by such a string on the command line and in
the bench, e.g. ``vq:groups=32,codebook_size=1024`` or ``flash:bits=8``.
Values become int, float or bool where they parse as one.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class Registry:
  """The strategies of one kind (classes with a ``name`` ClassVar), by name.

  ``kind`` names the family in errors ("exchange", "tensor-parallel sync"),
  ``short`` one of them ("exchange", "sync"), ``example`` a spec to show.
  """

  def __init__(self, kind: str, short: str, example: str):
    self.kind, self.short, self.example = kind, short, example
    self._classes: dict[str, type] = {}

  def register(self, cls):
    """Class decorator: the strategy under its ``name``."""
    self._classes[cls.name] = cls
    return cls

  def available(self) -> list[str]:
    return sorted(self._classes)

  def __contains__(self, name: str) -> bool:
    return name in self._classes

  def make(self, name: str, **options) -> Any:
    """Builds a strategy by name; unknown names or options raise ValueError naming the fix."""
    if name not in self._classes:
      raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.available()}")
    cls = self._classes[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
      raise ValueError(f"{self.short} {name!r} has no option(s) {unknown}; its options are "
                       f"{sorted(fields)}")
    return cls(**options)

  def from_spec(self, spec: str) -> Any:
    """A spec string, e.g. ``self.example``, -> a strategy (ValueError naming the fix)."""
    name, options = parse_spec(spec, example=self.example)
    return self.make(name, **options)


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
