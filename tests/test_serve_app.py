"""The server's HTTP layer, in process, over a fake engine (no model, no compile):
OpenAI's request/response shapes, server-sent events, errors, the FIFO queue and
503 past --max-queue; and its pieces: stop strings and incremental decoding,
chat templates, bucket lengths.  The real model behind a real server process:
tests/test_serve.py."""

import asyncio
import json
import threading
import time

import httpx
import pytest

from astra_jax.serve import app as app_lib, chat, engine as engine_lib, scheduler, text


class FakeEngine(engine_lib.Engine):
  """Byte tokens; the reply is the prompt upper-cased, then '.' up to max_tokens
  (token 0 ends it when ``eos_at`` says so).  ``gate``: each generation waits for it."""

  name, context, vocab_size = "fake", 64, 256

  def __init__(self, *, gate: threading.Event | None = None, template: str | None = "default",
               fail_on: str | None = None):
    self.gate, self.fail_on, self.calls = gate, fail_on, []
    if template == "default":
      template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")
    self.chat = chat.ChatFormat(template, "the test", end_ids=(0,))

  def encode(self, s):
    return list(s.encode())

  def decode(self, ids):
    return bytes(ids).decode(errors="replace")

  def describe(self):
    return {"context": self.context, "mesh": 1, "exchange": "exact", "buckets": [64]}

  def plan(self, prompt_len, max_tokens, force=None):
    if prompt_len + max_tokens > self.context:
      raise engine_lib.PromptTooLong(f"{prompt_len} + {max_tokens} > {self.context}")
    return {"mesh": 1, "exchange": "exact", "bucket": 64}

  def generate(self, prompt_ids, sampling):
    self.calls.append(self.decode(prompt_ids))
    if self.gate is not None:
      assert self.gate.wait(20)
    if self.fail_on and self.fail_on in self.decode(prompt_ids):
      raise RuntimeError("the device fell off")
    reply = list(self.decode(prompt_ids).upper().encode()) + [ord(".")] * self.context
    return engine_lib.Generation(iter(reply[:sampling.max_tokens]), self.plan(0, 0), 0.001)


def _serve(engine, max_queue=8):
  queue = scheduler.Scheduler(engine, max_queue)
  return app_lib.create_app(engine, queue, started={"startup_s": 0.0}), queue


def _run(engine, body, max_queue=8):
  """``body(client, queue)`` against an app serving ``engine``, in one event loop."""
  app, queue = _serve(engine, max_queue)

  async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
      return await body(client, queue)

  try:
    return asyncio.run(main())
  finally:
    queue.shutdown()


def _events(response) -> list:
  """The SSE body: every event is ``data: ...`` and the last is [DONE]."""
  blocks = [b for b in response.text.split("\n\n") if b]
  assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
  assert blocks[-1] == "data: [DONE]"
  return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


# --- text: stop strings, end-of-text, partial characters ---------------------------------

def _push_all(stream, tokens):
  out, ended = [], False
  for t in tokens:
    piece, ended = stream.push(t)
    out.append(piece)
    if ended:
      break
  else:
    out.append(stream.finish())
  return out, ended


def test_stop_string_across_tokens_is_held_back_and_cut():
  stream = text.TextStream(lambda ids: bytes(ids).decode(), stops=["END", "xyz"])
  pieces, ended = _push_all(stream, list(b"abc EN") + list(b"D more"))
  assert ended and stream.finish_reason == "stop" and stream.text == "abc "
  assert pieces == ["a", "b", "c", " ", "", "", ""]  # 'E', 'N' held until 'D' decides
  stream = text.TextStream(lambda ids: bytes(ids).decode(), stops=["END"])
  pieces, ended = _push_all(stream, list(b"a ENx EN"))
  assert not ended and "".join(pieces) == "a ENx EN" == stream.text  # finish() releases 'EN'


def test_end_of_text_token_and_partial_characters():
  decode = lambda ids: bytes(ids).decode(errors="replace")  # noqa: E731
  stream = text.TextStream(decode, eos_ids=[0])
  euro = list("€".encode())  # 3 bytes: nothing shows until the last
  pieces, ended = _push_all(stream, [ord("a")] + euro + [0, ord("b")])
  assert pieces == ["a", "", "", "€", ""] and ended and stream.text == "a€"
  assert len(stream.ids) == 5  # the end-of-text token counts as generated
  with pytest.raises(ValueError, match="ended"):
    stream.push(1)


# --- chat templates, buckets, exchange names ------------------------------------------

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_template_renders_like_transformers_and_refuses_cleanly():
  fmt = chat.ChatFormat(SMOL, "test")
  assert fmt.render([{"role": "user", "content": "Hi"}]) == (
      "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n")
  strict = chat.ChatFormat("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user "
                           "first') }}{% endif %}{{ messages | tojson }}", "test")
  assert strict.render([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'
  with pytest.raises(chat.ChatTemplateError, match="user first"):
    strict.render([{"role": "assistant", "content": "x"}])
  with pytest.raises(chat.ChatTemplateError, match="no chat template"):
    chat.ChatFormat(None, "nowhere").render([])
  with pytest.raises(chat.ChatTemplateError, match="does not parse"):
    chat.ChatFormat("{% for %}", "test").render([])
  with pytest.raises(chat.ChatTemplateError):  # the sandbox: no attribute games
    chat.ChatFormat("{{ ''.__class__.__mro__ }}", "test").render([])


def test_chat_format_of_a_transformers_folder(tmp_path):
  class Tok:
    def encode(self, s):
      return [7] if s == "<eos>" else [1, 2]

  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default",
                                                                "template": "D"}],
      "eos_token": {"content": "<eos>"}, "bos_token": "<s>"}))
  fmt = chat._from_folder(str(tmp_path), Tok())
  assert (fmt.template, fmt.bos_token, fmt.eos_token, fmt.end_ids) == ("D", "<s>", "<eos>", (3, 7))
  (tmp_path / "tokenizer_config.json").write_text("{}")
  assert chat._from_folder(str(tmp_path), Tok()).template is None
  (tmp_path / "chat_template.jinja").write_text("J")
  assert chat._from_folder(str(tmp_path), Tok()).template == "J"
  assert chat.for_checkpoint(None, Tok()).template is None  # a run folder


def test_default_buckets_are_mesh_multiples_up_to_the_context():
  assert engine_lib.default_buckets(2, 64) == [16, 32, 64]
  assert engine_lib.default_buckets(4, 1024) == [16, 32, 64, 128, 256, 512, 1024]
  assert engine_lib.default_buckets(3, 100) == [18, 36, 72, 99]
  assert engine_lib.default_buckets(8, 8) == [8]
  with pytest.raises(ValueError, match="shorter than the mesh"):
    engine_lib.default_buckets(8, 4)


def test_compile_counter_sees_a_new_compile_and_not_a_cached_call():
  import jax
  import jax.numpy as jnp
  counter = engine_lib.CompileCounter()
  f = jax.jit(lambda x: jnp.sin(x) * 3)  # a new function: never compiled before
  f(jnp.ones(3))
  seen = counter.count
  f(jnp.zeros(3))
  assert seen >= 1 and counter.count == seen


def test_top_p_draws_only_from_the_nucleus():
  """Probabilities .5/.3/.15/.05: top_p .7 keeps the first two (the mass before the
  third is .8), top_p .01 only the first; top_p 1 is plain sampling."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from astra_jax.run import generate
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = lambda top_p: np.asarray([int(generate._sample(logits, 1.0, k, top_p)[0])  # noqa
                                   for k in keys])
  assert set(draw(0.7)) == {1, 3} and set(draw(0.01)) == {1}
  everything = draw(1.0)
  assert set(everything) == {0, 1, 2, 3} and 0.4 < np.mean(everything == 1) < 0.6
  assert int(generate._sample(logits, 0.0, keys[0], 0.5)[0]) == 1  # greedy ignores top_p


def test_exchange_spec_names_the_strategy_and_its_sizes():
  from astra_jax.core import exchange
  assert engine_lib.exchange_spec(exchange.make_exchange("exact")) == "exact"
  vq = exchange.make_exchange("vq", groups=8, codebook_size=256)
  assert engine_lib.exchange_spec(vq) == "vq:groups=8,codebook_size=256"


# --- the HTTP layer ---------------------------------------------------------------------

def test_completion_chat_and_their_streams():
  async def body(client, queue):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    r = await client.post("/v1/completions", json={"model": "fake", "prompt": "abc",
                                                   "max_tokens": 5})
    assert r.status_code == 200 and r.headers["x-astra-plan"] == "mesh=1 exchange=exact bucket=64"
    c = r.json()
    assert c["object"] == "text_completion" and c["id"].startswith("cmpl-")
    assert c["choices"] == [{"index": 0, "text": "ABC..", "finish_reason": "length",
                             "logprobs": None}]
    assert c["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert c["astra"]["plan"]["bucket"] == 64 and c["astra"]["prefill_s"] == 0.001
    r = await client.post("/v1/completions", json={"prompt": [97, 98], "max_tokens": 6,
                                                   "stop": ["B."], "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(r)
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == "A"
    assert chunks[0]["astra"] == {"plan": {"mesh": 1, "exchange": "exact", "bucket": 64}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and "queue_s" in chunks[-2]["astra"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)

    messages = [{"role": "user", "content": "hi"}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    c = r.json()
    assert c["object"] == "chat.completion" and c["choices"][0]["message"] == {
        "role": "assistant", "content": "[USE"}  # the prompt is '[user] hi\n[assistant] '
    assert c["usage"]["prompt_tokens"] == len("[user] hi\n[assistant] ")
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 4, "stream": True})
    chunks = _events(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == "[USE"
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    # no max_tokens in a chat: the rest of the window (64 - 22 prompt tokens)
    r = await client.post("/v1/chat/completions", json={"messages": messages})
    assert r.json()["usage"]["completion_tokens"] == 64 - 22
    page = (await client.get("/")).text
    assert all(f'id="{i}"' in page for i in ("prompt", "send", "log"))
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/astra/stats")).json()["finished"] == 5

  _run(FakeEngine(), body)


BAD = [  # (path, body or raw text, status, param, code)
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", "not json", 400, None, "invalid_json"),
    ("/v1/completions", "[1, 2]", 400, None, None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 400, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x" * 60, "max_tokens": 5}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, 999]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "unsupported_value"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "unsupported_value"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, None, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -3}, 400, "max_completion_tokens", None),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on():
  async def body(client, queue):
    for path, payload, status, param, code in BAD:
      if isinstance(payload, str):
        r = await client.post(path, content=payload, headers={"content-type": "application/json"})
      else:
        r = await client.post(path, json=payload)
      assert r.status_code == status, (payload, r.text)
      error = r.json()["error"]
      assert set(error) == {"message", "type", "param", "code"} and error["message"], error
      assert error["type"] == "invalid_request_error", error
      if param:
        assert error["param"] == param, (payload, error)
      if code:
        assert error["code"] == code, (payload, error)
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = await client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    ok = await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert ok.json()["choices"][0]["text"] == "OK"
    # a generation that fails: 500 in the error shape (in a stream: an error event), then on
    r = await client.post("/v1/completions", json={"prompt": "boom", "max_tokens": 2})
    assert r.status_code == 500 and "fell off" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json={"prompt": "boom", "stream": True})
    assert "fell off" in _events(r)[-1]["error"]["message"]
    ok = await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert ok.json()["choices"][0]["text"] == "OK"

  _run(FakeEngine(fail_on="boom"), body)


def test_chat_without_a_template_is_a_clear_400():
  async def body(client, queue):
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                      "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    assert "/v1/completions" in r.json()["error"]["message"]

  _run(FakeEngine(template=None), body)

  async def refused(client, queue):
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                      "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "no system messages" in r.json()["error"]["message"]

  _run(FakeEngine(template="{{ raise_exception('no system messages') }}"), refused)


def test_queue_is_fifo_and_503_past_max_queue():
  """One generation runs at a time, the others wait in arrival order; with 1 running
  and ``max_queue`` = 2 waiting, the next request gets 503 until one finishes."""
  gate = threading.Event()
  engine = FakeEngine(gate=gate)

  async def body(client, queue):
    tasks = []
    for i in range(3):  # one at a time, so arrival order is known
      tasks.append(asyncio.create_task(client.post(
          "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 3, "stream": i == 1})))
      while queue.pending < i + 1:
        await asyncio.sleep(0.01)
    busy = await client.post("/v1/completions", json={"prompt": "late"})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "server_busy" and "--max-queue 2" in \
        busy.json()["error"]["message"]
    assert (await client.get("/astra/stats")).json()["waiting"] == 2
    gate.set()
    done = await asyncio.gather(*tasks)
    assert done[0].json()["choices"][0]["text"] == "P0."
    assert "".join(c["choices"][0]["text"] for c in _events(done[1]) if c["choices"]) == "P1."
    assert done[2].json()["choices"][0]["text"] == "P2."
    assert done[2].json()["astra"]["queue_s"] > done[0].json()["astra"]["queue_s"]
    assert engine.calls == ["p0", "p1", "p2"]
    late = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 4})
    assert late.json()["choices"][0]["text"] == "LATE"

  _run(engine, body, max_queue=2)


def test_a_client_that_leaves_cancels_its_generation():
  """A request cancelled while waiting never generates; one cancelled while
  generating stops at its next token; the queue moves on."""
  gate = threading.Event()
  engine = FakeEngine(gate=gate)
  app, queue = _serve(engine)

  def slow(tokens):
    for t in tokens:
      time.sleep(0.02)
      yield t

  async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
      generate = engine.generate
      engine.generate = lambda ids, sampling: engine_lib.Generation(
          slow(generate(ids, sampling)), {}, 0.0)
      running = queue.submit(list(b"a"), engine_lib.Sampling(max_tokens=40), [], {})
      left = queue.submit(list(b"b"), engine_lib.Sampling(max_tokens=40), [], {})
      left.cancel()  # its client left while it waited
      gate.set()
      events = running.events()
      assert isinstance(await events.__anext__(), scheduler.Piece)
      running.cancel()  # its client left after the first piece
      rest = [e async for e in events]
      assert isinstance(rest[-1], scheduler.Done) and rest[-1].completion_tokens < 40
      while queue.pending:
        await asyncio.sleep(0.01)
      assert engine.calls == ["a"]  # "b" never started
      r = await client.post("/v1/completions", json={"prompt": "go", "max_tokens": 2})
      assert r.json()["choices"][0]["text"] == "GO" and engine.calls == ["a", "go"]

  try:
    asyncio.run(main())
  finally:
    queue.shutdown()
