"""``python -m infer.serve`` for real: a tiny Llama (a transformers folder with a
chat template) served on 127.0.0.1 by a subprocess, driven with the official
``openai`` client and with ``curl``: greedy text equals ``infer.llama``'s for the
same prompt, streams equal whole responses, bad requests get OpenAI's error
shape while the server goes on, 12 concurrent requests each get their own
answer, after warm-up no request compiles, and the chat page streams a reply in
Debian's chromium (headless, via selenium).  One server per module; it is
stopped at the end however the tests went.  The HTTP layer's details (every
error, the queue, 503) are in tests/test_serve_app.py."""

import concurrent.futures
import json
import shutil
import subprocess
import time

import httpx
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")
import hf_helpers  # noqa: E402
import serve_helpers  # noqa: E402

PROMPT, NEW = "When in disgrace with", 12
START_LIMIT_S = 240
_python = serve_helpers.python
ROOT = serve_helpers.ROOT


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  return serve_helpers.tiny_chat_llama(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def server(hf_folder, tmp_path_factory):
  """(base url, start-up JSON, the infer.llama reference run started alongside)."""
  log = tmp_path_factory.mktemp("serve") / "server.log"
  with open(log, "w") as err:
    proc = _python("infer.serve", f"--model=hf:{hf_folder}", "--mesh=2", "--port=0",
                   "--max-queue=16", stdout=subprocess.PIPE, stderr=err)
  # the CLI the server must agree with, on the cores the server's warm-up leaves
  reference = _python("infer.llama", f"--model=hf:{hf_folder}", "--mesh=2", "--prompt", PROMPT,
                      "--max-new-tokens", str(NEW), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
  try:
    started = serve_helpers.wait_for_start(proc, log, START_LIMIT_S)
    yield started["url"], started, reference, log
  finally:
    for p in (proc, reference):
      p.terminate()
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def reference(server):
  proc = server[2]
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_started_compiled_every_bucket_and_lists_its_model(server, client):
  url, started, _, log = server
  assert started["buckets"] == [16, 32, 64] and started["context"] == 64
  assert started["compiles_at_start"] > 0 and started["startup_s"] >= started["compile_s"] > 0
  assert f"serving tiny-llama at {url}" in log.read_text()
  (model,) = client.models.list().data
  assert model.id == "tiny-llama" and model.astra["mesh"] == 2
  page = httpx.get(url + "/").text
  assert all(f'id="{i}"' in page for i in ("prompt", "send", "log"))


def test_greedy_completion_equals_infer_llama(client, reference):
  got = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=NEW,
                                  temperature=0)
  assert got.choices[0].text == reference["completion"]
  assert got.choices[0].finish_reason == "length"
  assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (reference["prompt_tokens"],
                                                                    NEW)
  assert got.astra["plan"] == {"plan": "local", "mesh": 2, "exchange": "exact", "bucket": 16,
                               "decode_device": 0, "processes": 1}
  stream = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=NEW,
                                     temperature=0, stream=True,
                                     stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["completion"]
  assert chunks[-1].usage.total_tokens == reference["prompt_tokens"] + NEW


def test_chat_uses_the_template_and_streams_the_same(client):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "When in disgrace"}]
  raw = client.chat.completions.with_raw_response.create(model="tiny-llama", messages=messages,
                                                         max_tokens=8, temperature=0)
  assert raw.headers["x-astra-plan"].startswith("plan=local mesh=2 exchange=exact bucket=")
  chat = raw.parse()
  rendered = "<system>Be brief.\n<user>When in disgrace\n<assistant>"
  same = client.completions.create(model="tiny-llama", prompt=rendered, max_tokens=8,
                                   temperature=0)
  assert chat.choices[0].message.content == same.choices[0].text
  assert chat.usage.prompt_tokens == same.usage.prompt_tokens
  chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages,
                                               max_tokens=8, temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
      chat.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == "length"
  assert chunks[-1].astra["first_token_s"] > 0


def test_sampling_stop_and_seed(client, reference):
  text = reference["completion"]
  stop = text[4:7]
  cut = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=NEW,
                                  temperature=0, stop=[stop, "\u2603"])
  assert cut.choices[0].text == text[:text.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  draws = [client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=NEW,
                                     temperature=1.0, top_p=0.9, seed=seed).choices[0].text
           for seed in (7, 7, 8)]
  assert draws[0] == draws[1]  # a seed repeats its draw


def test_curl_plain_and_streaming(server):
  url = server[0]
  body = json.dumps({"messages": [{"role": "user", "content": "When in"}], "max_tokens": 5,
                     "temperature": 0})
  curl = ["curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/json"]
  plain = json.loads(subprocess.run([*curl, "-d", body, url + "/v1/chat/completions"],
                                    capture_output=True, text=True, check=True).stdout)
  streamed = subprocess.run([*curl, "-N", "-d", body[:-1] + ', "stream": true}',
                             url + "/v1/chat/completions"],
                            capture_output=True, text=True, check=True).stdout
  events = [e for e in streamed.split("\n\n") if e]
  assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
  chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
  assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
      plain["choices"][0]["message"]["content"]
  assert plain["usage"]["completion_tokens"] == 5


def test_bad_requests_are_4xx_in_openai_shape_and_the_server_goes_on(server, client):
  url = server[0]
  cases = [({"prompt": "x", "max_tokens": -1}, "max_tokens"),
           ({"prompt": "x", "temperature": "hot"}, "temperature"),
           ({"prompt": "x", "model": "gpt-4"}, "model"),
           ({"prompt": "When in disgrace " * 20, "max_tokens": 4}, "prompt"),
           ("{not json", None)]
  for body, param in cases:
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(url + "/v1/completions", headers={"content-type": "application/json"},
                   timeout=60, **kwargs)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == param
  with pytest.raises(openai.BadRequestError) as refused:
    client.completions.create(model="tiny-llama", prompt="When in disgrace " * 20, max_tokens=4)
  assert refused.value.code == "context_length_exceeded"
  assert client.completions.create(model="tiny-llama", prompt="When", max_tokens=2,
                                   temperature=0).usage.completion_tokens == 2


LENGTHS = [1, 5, 8, 9, 16, 17, 30, 33, 50, 3, 12, 24]  # every bucket and decoding device


def test_concurrent_requests_each_get_their_own_answer(client, server):
  """12 requests at once (half streaming) equal the same requests one at a time."""
  prompts = [[(7 * i + 3 * n) % hf_helpers.TINY_LLAMA_VOCAB for i in range(n)] for n in LENGTHS]

  def ask(prompt, stream=False):
    kwargs = dict(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0)
    if not stream:
      return client.completions.create(**kwargs).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))

  alone = [ask(p) for p in prompts]
  assert len(set(alone)) > 6  # different prompts, different answers: a mix-up would show
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    together = list(pool.map(ask, prompts, [i % 2 == 1 for i in range(len(prompts))]))
  assert time.perf_counter() - start < 60
  assert together == alone
  stats = httpx.get(server[0] + "/astra/stats").json()
  assert stats["pending"] == 0 and stats["finished"] >= 2 * len(prompts)


def test_no_request_compiled_after_warm_up(server):
  """Runs last: every request above (all three buckets, both decoding devices,
  greedy and sampled) ran on what the start-up compiled."""
  stats = httpx.get(server[0] + "/astra/stats").json()
  assert stats["compiles_since_warm_up"] == 0, stats


def test_start_up_errors_are_one_line(server, tmp_path):
  """A taken port fails before anything loads; a missing model names the fix."""
  port = server[0].rsplit(":", 1)[1]
  taken = _python("infer.serve", "--model=smollm2", f"--port={port}", stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
  missing = _python("infer.serve", f"--model=gguf:{tmp_path}/none.gguf", "--port=0",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  for proc, message in ((taken, f"cannot listen on 127.0.0.1:{port}"),
                        (missing, "none.gguf: no such file")):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == "", err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_chat_page_streams_in_a_real_browser(server, tmp_path):
  """Debian's chromium, headless, through chromedriver: type a prompt, wait for the
  streamed reply and its line of timings and plan, keep a screenshot."""
  webdriver = pytest.importorskip("selenium.webdriver")
  browser, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
  if not (browser and driver_bin):
    pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium "
                "chromium-driver (bash setup.sh test does it as root)")
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-background-networking", "--disable-sync",
               "--disable-component-update", "--window-size=1000,760",
               f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(driver_bin), options=options)
  try:
    driver.set_page_load_timeout(60)
    driver.get(server[0] + "/")
    WebDriverWait(driver, 60).until(lambda d: "mesh 2" in d.find_element(By.ID, "model").text)
    tokens = driver.find_element(By.ID, "max-tokens")  # the page's 128 passes the tiny window
    tokens.clear()
    tokens.send_keys(str(NEW))
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 180).until(
        lambda d: "tokens/s" in d.find_element(By.ID, "log").text
        or d.find_elements(By.CSS_SELECTOR, "#log .error"))
    turns = driver.find_elements(By.CSS_SELECTOR, "#log .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"]
    assert turns[0].text == PROMPT and turns[1].text.strip(), [t.text for t in turns]
    stats = driver.find_element(By.CSS_SELECTOR, "#log .stats").text
    assert "time to first token" in stats and "plan:" in stats and "exchange=" in stats, stats
    shots = ROOT / "results" / "tmp_browser"  # git ignores results/tmp*/
    shots.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shots / "serve_chat.png"))
  finally:
    driver.quit()
