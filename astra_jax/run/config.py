"""Configs are Python files with ``get_config()``; ``--config.a.b=value`` overrides.

Overrides are typed by the value they replace, and an unknown key is an error
that lists the known ones (a typo never silently trains the default).
``listing`` shows every key as an override would read it (``--show-config``).
"""

from __future__ import annotations

import importlib
from typing import Sequence

import ml_collections


def load(module: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Imports ``configs.<module>`` (or a dotted path) and applies ``--config.k=v`` overrides."""
  name = module if "." in module else f"configs.{module}"
  try:
    cfg = importlib.import_module(name).get_config()
  except ModuleNotFoundError as e:
    raise ValueError(f"no config module {name!r}: put a get_config() in configs/{module}.py") from e
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ValueError(f"unrecognised argument {item!r}; overrides look like --config.key=value")
    key, value = item[len("--config."):].split("=", 1)
    set_value(cfg, key, value)
  return cfg


def set_value(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r}; known: {sorted(node.keys())}")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"unknown config key {dotted!r}; known keys here: {sorted(node.keys())}")
  old = node[leaf]
  if old is None or isinstance(old, str):
    value = None if text.lower() == "none" else text
  elif isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--config.{dotted} takes true/false, got {text!r}")
    value = text.lower() in ("true", "1")
  else:
    try:
      value = type(old)(float(text)) if isinstance(old, int) and "e" in text.lower() else type(old)(text)
    except ValueError:
      raise ValueError(f"--config.{dotted} takes a {type(old).__name__}, got {text!r}") from None
  node[leaf] = value


def listing(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """One ``key: type = value`` line per leaf, nested keys dotted (``vq.groups``),
  sorted; the type is the one ``set_value`` parses an override as (a None or
  str key takes any text, ``none`` for None)."""
  lines = []
  for key in sorted(cfg.keys()):
    value = cfg[key]
    if isinstance(value, ml_collections.ConfigDict):
      lines += listing(value, f"{prefix}{key}.")
    else:
      kind = "str" if value is None else type(value).__name__
      lines.append(f"{prefix}{key}: {kind} = {value!r}")
  return lines
