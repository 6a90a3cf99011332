"""infer.launch's output rules, without processes: gloo's routine lines are
dropped (the text they cut is joined again), and the result is the JSON of
the rank that names itself as its producer, else rank 0's last line."""

import json
from types import SimpleNamespace

from infer import launch


def gloo(rank, connected, expected):
  return (f"[Gloo] Rank {rank} is connected to {connected} peer ranks. Expected number of "
          f"connected peer ranks is : {expected}\n")


def test_gloo_connection_lines_are_dropped_and_cut_text_joined():
  raw = ["prefill\n", gloo(0, 1, 1), "Now is" + gloo(3, 3, 3), " the winter\n", "\n",
         "done" + gloo(1, 1, 1)]
  assert list(launch.without_noise(raw)) == ["prefill", "Now is the winter", "", "done"]


def test_gloo_line_with_missing_peers_is_kept():
  line = gloo(1, 0, 1)
  assert list(launch.without_noise(["a\n", line])) == ["a", line.rstrip("\n")]


def test_result_is_the_decoding_ranks_json_else_rank_0s():
  def ranks(*lasts):
    return [SimpleNamespace(rank=i, last=last) for i, last in enumerate(lasts)]
  empty, answer = ({"completion": text, "decoded_by_process": 1} for text in ("", " Paris."))
  lines = ranks(json.dumps(empty), json.dumps(answer))
  assert launch.result_line(lines) == lines[1].last
  # evaluation, training: every rank prints the same result; a rank's last line
  # need not be JSON
  lines = ranks('{"perplexity": 3.0}', '{"perplexity": 3.0}', "not json")
  assert launch.result_line(lines) == lines[0].last
  # only a rank's own JSON makes it the producer, not another rank naming it
  lines = ranks(json.dumps(empty), "Now is the winter")
  assert launch.result_line(lines) == lines[0].last
