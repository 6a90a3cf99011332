"""The train CLIs document ``--config.KEY=VALUE`` in --help, and ``--show-config``
lists a config's keys (overrides applied) without training."""

import pytest

from cli_helpers import assert_one_line_error, run

from astra_jax.run import config

TRAIN_CLIS = ("train.vit", "train.gpt2", "train.llama", "train.dit")


@pytest.mark.parametrize("module", TRAIN_CLIS)
def test_help_names_overrides_and_the_listing(module):
  proc = run(module, "--help")
  assert proc.returncode == 0, proc.stderr
  assert "--config.KEY=VALUE" in proc.stdout and "--show-config" in proc.stdout, proc.stdout


def test_show_config_lists_keys_after_overrides_and_exits(tmp_path):
  proc = run("train.vit", f"--workdir={tmp_path}/run", "--config.exchange=vq",
             "--config.batch_size=64", "--config.lr=1e-4", "--show-config")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("# configs.vit_fashion_mnist")
  for line in ("batch_size: int = 64", "exchange: str = 'vq'", "lr: float = 0.0001",
               "augment: bool = False", "vq.groups: int = 32"):
    assert line in lines, proc.stdout
  assert len(lines) == 1 + len(config.listing(config.load("vit_fashion_mnist")))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, family", [("train.gpt2", "gpt2"), ("train.llama", "llama")])
def test_show_config_of_the_lm_clis(module, family, tmp_path):
  proc = run(module, f"--workdir={tmp_path}/run", "--show-config")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith(f"# configs.{family}_shakespeare"), lines[0]
  # a None key is listed as a str: an override sets it to text (or back to none)
  assert f"family: str = '{family}'" in lines and "text: str = None" in lines, proc.stdout
  assert not (tmp_path / "run").exists()


def test_unknown_key_still_fails(tmp_path):
  for extra in (["--show-config"], []):
    proc = run("train.gpt2", "--mesh=1", f"--workdir={tmp_path}/run", "--config.setps=3", *extra)
    assert_one_line_error(proc, 2, "unknown config key 'setps'")
    assert not (tmp_path / "run").exists()


def test_listing_dots_nested_keys():
  cfg = config.load("gpt2_shakespeare", ["--config.vq.groups=4", "--config.tokenizer=none"])
  lines = config.listing(cfg)
  assert "vq.groups: int = 4" in lines and "tokenizer: str = None" in lines, lines
  assert not any(line.startswith("vq:") for line in lines)
