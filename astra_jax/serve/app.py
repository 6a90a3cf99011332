"""The HTTP server: a FastAPI app, one handler per endpoint, over an ``Engine``
behind a ``Scheduler``.

  GET  /                      the chat page (chat.html)
  GET  /health                200 {"status": "ok"} (the server answers once warmed up)
  GET  /v1/models             the one model served
  POST /v1/completions        text completion
  POST /v1/chat/completions   chat, with the model's own chat template
  GET  /astra/stats           queue, requests finished, compiles since warm-up

Both generation endpoints stream server-sent events with ``"stream": true``
(``data: {chunk}`` lines, then ``data: [DONE]``).  Every error is OpenAI's
shape with a 4xx/5xx status: 400 for a bad field, a non-JSON body, an unknown
model, a prompt that does not fit the window or a chat without template; 503
(``Retry-After``) when ``--max-queue`` requests wait; 500 if a generation
fails, after which the server goes on serving.  The ``astra`` field of a
response (the first and last chunk of a stream) and the ``X-Astra-Plan``
header say how the request ran.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from astra_jax.serve import protocol as p
from astra_jax.serve.chat import ChatTemplateError
from astra_jax.serve.engine import Engine, PromptTooLong, Sampling
from astra_jax.serve.scheduler import Busy, Done, Failed, Piece, Scheduler

PAGE = pathlib.Path(__file__).with_name("chat.html")


class APIError(Exception):
  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.headers = status, headers
    self.info = p.ErrorInfo(message=message, type=type, param=param, code=code)


def _error(status: int, info: p.ErrorInfo, headers=None) -> JSONResponse:
  return JSONResponse(p.ErrorResponse(error=info).model_dump(), status_code=status,
                      headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
  first = exc.errors()[0] if exc.errors() else {}
  if first.get("type") == "json_invalid":
    return APIError(400, "the request body is not valid JSON: " + first.get("msg", ""),
                    code="invalid_json")
  loc = [str(x) for x in first.get("loc", ()) if x != "body"]
  # union members add the tried type to the location: keep the field's path only
  field = ".".join(x for x in loc if x not in ("str", "int", "float", "bool", "list[str]",
                                                "list[int]", "list[TextPart]", "function-after"))
  what = f"field {field!r}: " if field else "the request body: "
  message = what + first.get("msg", "invalid value")
  if "input" in first and field:
    message += f" (got {json.dumps(first['input'], default=str)[:80]})"
  return APIError(400, message, param=field or None, code="invalid_value")


def create_app(engine: Engine, scheduler: Scheduler, *, started: dict[str, Any] | None = None
               ) -> FastAPI:
  """The app serving ``engine``; ``started``: start-up facts for /astra/stats."""
  app = FastAPI(title="astra-jax", docs_url=None, redoc_url=None)
  created = int(time.time())

  @app.exception_handler(APIError)
  async def api_error(request: Request, exc: APIError):
    return _error(exc.status, exc.info, exc.headers)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: Request, exc: RequestValidationError):
    e = _validation_error(exc)
    return _error(e.status, e.info)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, p.ErrorInfo(message=f"{request.method} {request.url.path}: "
                                                f"{exc.detail}", type=kind))

  @app.exception_handler(Exception)
  async def crashed(request: Request, exc: Exception):
    return _error(500, p.ErrorInfo(message=f"internal error: {type(exc).__name__}: {exc}",
                                   type="server_error"))

  @app.get("/", response_class=HTMLResponse)
  async def page():
    return HTMLResponse(PAGE.read_text())

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models() -> p.ModelList:
    return p.ModelList(data=[p.ModelCard(id=engine.name, created=created,
                                         astra=engine.describe())])

  @app.get("/astra/stats")
  async def stats():
    return {"model": engine.name, **engine.describe(), "pending": scheduler.pending,
            "waiting": scheduler.waiting, "max_queue": scheduler.max_queue,
            "finished": scheduler.finished,
            "compiles_since_warm_up": getattr(engine, "compiles_since_warm_up", None),
            **(engine.stats() if hasattr(engine, "stats") else {}), **(started or {})}

  @app.post("/v1/completions")
  async def completions(body: p.CompletionRequest):
    _check(body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
      prompt = prompt[0]
    if isinstance(prompt, str):
      ids = engine.encode(prompt)
    else:
      bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
      if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary of "
                       f"{engine.vocab_size}", param="prompt", code="invalid_value")
      ids = list(prompt)
    job = _submit(ids, body, body.max_tokens, "prompt")
    rid, model = p.new_id("cmpl"), engine.name
    if body.stream:
      def chunk(text, finish, astra):
        return p.Completion(id=rid, model=model, astra=astra,
                            choices=[p.CompletionChoice(text=text, finish_reason=finish)])
      usage = lambda u: p.Completion(id=rid, model=model, choices=[], usage=u)  # noqa: E731
      return _stream(job, chunk, None, usage, body, len(ids))
    text, done = await _collect(job)
    return _with_plan(p.Completion(
        id=rid, model=model, astra=done.stats,
        choices=[p.CompletionChoice(text=text, finish_reason=done.finish_reason)],
        usage=_usage(len(ids), done)), done.stats)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: p.ChatCompletionRequest):
    _check(body)
    if engine.chat.template is None:
      raise APIError(400, f"{engine.name} has no chat template, so it cannot chat "
                     f"({engine.chat.origin}); use /v1/completions", param="messages",
                     code="no_chat_template")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    try:
      ids = engine.encode(engine.chat.render(messages))
    except ChatTemplateError as e:
      raise APIError(400, str(e), param="messages") from None
    limit = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    job = _submit(ids, body, limit, "messages")
    rid, model = p.new_id("chatcmpl"), engine.name
    if body.stream:
      def chunk(text, finish, astra, role=None):
        return p.ChatCompletionChunk(
            id=rid, model=model, astra=astra,
            choices=[p.ChatChunkChoice(delta=p.Delta(role=role, content=text),
                                       finish_reason=finish)])
      opening = lambda astra: chunk("", None, astra, role="assistant")  # noqa: E731
      usage = lambda u: p.ChatCompletionChunk(id=rid, model=model, choices=[], usage=u)  # noqa
      return _stream(job, chunk, opening, usage, body, len(ids))
    text, done = await _collect(job)
    return _with_plan(p.ChatCompletion(
        id=rid, model=model, astra=done.stats,
        choices=[p.ChatChoice(message=p.AssistantMessage(content=text),
                              finish_reason=done.finish_reason)],
        usage=_usage(len(ids), done)), done.stats)

  # --- shared by the two generation handlers ------------------------------------

  def _check(body: p.Sampled) -> None:
    if body.model not in (None, engine.name):
      raise APIError(400, f"the model {body.model!r} is not served here; this server runs "
                     f"{engine.name!r} (GET /v1/models)", param="model", code="model_not_found")
    refused = body.unsupported()
    if refused:
      raise APIError(400, refused[1], param=refused[0], code="unsupported_value")

  def _submit(ids: list[int], body: p.Sampled, max_tokens: int | None, param: str):
    if not ids:
      raise APIError(400, "the prompt is empty; give at least one token", param=param)
    if max_tokens is None:  # chat: the rest of the window, as OpenAI
      max_tokens = max(engine.context - len(ids), 0)
    try:
      plan = engine.plan(len(ids), max_tokens, body.astra_plan)
    except PromptTooLong as e:
      raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
      raise APIError(400, str(e), param="astra_plan", code="invalid_value") from None
    sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        seed=body.seed, plan=body.astra_plan)
    try:
      return scheduler.submit(ids, sampling, body.stops(), plan)
    except Busy as e:
      raise APIError(503, str(e), type="server_error", code="server_busy",
                     headers={"Retry-After": "1"}) from None

  return app


def _usage(prompt_tokens: int, done: Done) -> p.Usage:
  return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=prompt_tokens + done.completion_tokens)


def _plan_header(plan: dict[str, Any]) -> str:
  return " ".join(f"{k}={v}" for k, v in plan.items() if isinstance(v, (str, int, float)))


def _with_plan(response: p.Response, stats: dict[str, Any]) -> JSONResponse:
  return JSONResponse(response.model_dump(exclude_none=False),
                      headers={"X-Astra-Plan": _plan_header(stats["plan"])})


async def _collect(job) -> tuple[str, Done]:
  text = []
  try:
    async for event in job.events():
      if isinstance(event, Piece):
        text.append(event.text)
      elif isinstance(event, Failed):
        raise APIError(500, f"generation failed: {type(event.error).__name__}: {event.error}",
                       type="server_error")
      else:
        return "".join(text), event
  finally:
    job.cancel()  # a no-op once done; stops the generation if this handler is torn down
  raise AssertionError("the job ended without Done")


def _sse(obj) -> str:
  """One event; a chunk leaves out what it does not carry (``astra``, ``usage``, a
  delta's ``role``) but keeps ``finish_reason``/``logprobs``, null, as OpenAI."""
  if not isinstance(obj, str):
    data = obj.model_dump()
    for key in ("astra", "usage"):
      if data.get(key) is None:
        data.pop(key, None)
    for choice in data.get("choices", []):
      delta = choice.get("delta")
      if delta is not None:
        choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    obj = json.dumps(data, ensure_ascii=False)
  return f"data: {obj}\n\n"


def _stream(job, chunk, opening, usage, body: p.Sampled, prompt_tokens: int
            ) -> StreamingResponse:
  """SSE: ``opening(astra)`` (chat: the role) or the first text piece carries the
  plan; one ``chunk(text, None, None)`` per piece; the finishing chunk has the
  finish_reason and the times; ``usage(Usage)`` if the client asked
  (``stream_options.include_usage``); then ``data: [DONE]``."""

  async def events() -> AsyncIterator[str]:
    try:
      first = {"plan": job.plan}
      if opening is not None:
        yield _sse(opening(first))
        first = None
      async for event in job.events():
        if isinstance(event, Piece):
          yield _sse(chunk(event.text, None, first))
          first = None
        elif isinstance(event, Failed):
          info = p.ErrorInfo(message=f"generation failed: {type(event.error).__name__}: "
                             f"{event.error}", type="server_error")
          yield _sse(json.dumps(p.ErrorResponse(error=info).model_dump()))
          break
        else:
          yield _sse(chunk("", event.finish_reason, event.stats))
          if body.stream_options and body.stream_options.include_usage:
            yield _sse(usage(_usage(prompt_tokens, event)))
      yield "data: [DONE]\n\n"
    finally:
      job.cancel()

  return StreamingResponse(events(), media_type="text/event-stream",
                           headers={"X-Astra-Plan": _plan_header(job.plan),
                                    "Cache-Control": "no-cache"})
