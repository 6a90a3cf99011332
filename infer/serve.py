"""Serve a language model over HTTP with OpenAI's API: sequence-parallel prefill
on --mesh devices of this process, decode on the device holding the prompt's end.

  python -m infer.serve --model smollm2 --mesh 2 --port 8000
  python -m infer.serve --model gguf:/path/model.gguf --mesh 4 --exchange vq:groups=32
  python -m infer.serve --workdir workdir/llama --mesh 4
  python -m infer.launch --procs 2 --restart 3 --timeout 0 -- infer.serve --model smollm2 \
      --mesh 2 --exchange exact --exchange vq:groups=32 --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the
model's own chat template; both stream with "stream": true), GET / (a chat
page), GET /health, GET /astra/stats.  Start-up loads the model (as infer.llama
does), then compiles the prefill for every prompt bucket (--buckets; prompts are
padded to the next one) and the decode step on every device that can decode,
so no request compiles; then it prints one JSON line (url, start-up times) on
stdout and serves.  One generation runs at a time, in arrival order; past
--max-queue waiting requests new ones get 503.  --port 0 takes a free port (the
JSON line names it).

Across processes (``infer.launch``, or --coordinator/--num-processes/--process-id
by hand: one device per rank, --mesh = the number of ranks) rank 0 serves HTTP
and the others join each request (``astra_jax.serve.group``): each holds the
whole model, the K/V go forward between ranks (the stream exchange) and no
``jax.distributed`` group ties them, so a rank that dies fails only the
request it was in; the server goes on with the ranks left and takes a rank
that is started again back (``infer.launch --restart``).  Per request it
picks the plan the latency model predicts fastest: one device, or every
live rank with exact K/V or ASTRA codes at each --exchange vq:groups=G given
(k-means codebooks for --model; a run's own for --workdir), measured at
start-up (the link, each plan's compute per bucket); --max-quality-loss
leaves out plans whose perplexity on held-out text is that many percent
worse than one device's.
"""

from __future__ import annotations

import sys
import time

from astra_jax.parallel import distributed
from astra_jax.run import cli


def parse(argv):
  p = cli.Parser(description=__doc__.split("\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run folder made by train.gpt2 / train.llama")
  source.add_argument("--model", help="a pretrained model: gguf:PATH (llama.cpp file), hf:DIR "
                      "(transformers folder) or smollm2 (bundled)")
  p.add_argument("--mesh", type=cli.at_least(1), default=4, help="devices of the prefill")
  p.add_argument("--exchange", action="append", default=None,
                 help="exact | ring | vq, or a spec such as vq:groups=32 (default: exact for "
                      "--model, the run's own for --workdir); across processes, repeat it to "
                      "offer several plans (exact K/V is always one)")
  p.add_argument("--context", type=cli.at_least(1), default=None,
                 help="--model: tokens per sequence, prompt + reply (default 1024, at most "
                      "the model's)")
  p.add_argument("--text", default=None,
                 help="--model with --exchange vq: the text k-means calibrates on (default: "
                      "Shakespeare)")
  p.add_argument("--step", type=cli.at_least(0), default=None,
                 help="--workdir: checkpoint step (default latest)")
  p.add_argument("--buckets", default=None,
                 help="padded prompt lengths, comma-separated multiples of --mesh (default: "
                      "16 or the next multiple, doubling up to the context)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=cli.at_least(0), default=8000, help="0: any free port")
  p.add_argument("--max-queue", type=cli.at_least(0), default=16,
                 help="requests that may wait behind the running one; more get 503")
  p.add_argument("--name", default=None,
                 help="the model id clients use (default: smollm2, the file or folder name)")
  p.add_argument("--max-quality-loss", type=cli.nonnegative, default=None,
                 help="across processes: leave out plans whose perplexity is more than this "
                      "many percent above one device's (measured at start; default: every "
                      "plan given)")
  p.add_argument("--rank-timeout", type=cli.positive, default=45,
                 help="across processes: seconds of silence after which a rank counts as lost")
  p.add_argument("--join-timeout", type=cli.positive, default=900,
                 help="across processes: seconds rank 0 waits for the others at start")
  distributed.add_flags(p)
  return p.parse_args(argv)


def _buckets(text: str | None) -> list[int] | None:
  if text is None:
    return None
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--buckets {text!r}: give comma-separated token counts, e.g. 32,128,512"
                     ) from None
  if not values:
    raise ValueError("--buckets is empty; give comma-separated token counts, e.g. 32,128,512")
  return values


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  if distributed.requested(args):
    return serve_group(args, start)
  if args.exchange and len(args.exchange) > 1:
    cli.fail("several --exchange values are plans of a multi-rank server (infer.launch --procs "
             "N -- infer.serve ...); one process serves one exchange")
  args.exchange = args.exchange[0] if args.exchange else None
  cli.ensure_cpu_devices(args.mesh)
  sock = _listen(args)
  from astra_jax.parallel import mesh as mesh_lib
  from astra_jax.serve import chat, engine as engine_lib, load
  try:
    buckets = _buckets(args.buckets)
    mesh_lib.make_seq_mesh(args.mesh)  # enough devices, else the fix
    loaded = load.load(args.model, args.workdir, exchange=args.exchange, context=args.context,
                       text=args.text, step=args.step)
    if args.name:
      loaded.name = args.name
    loaded_s = time.perf_counter() - start
    print(f"loaded {loaded.name} in {loaded_s:.1f} s; compiling the prefill for each prompt "
          "bucket and the decode step on each decoding device", file=sys.stderr, flush=True)
    engine = engine_lib.LocalEngine(loaded, mesh_size=args.mesh, buckets=buckets,
                                    chat=chat.for_checkpoint(args.model, loaded.tokenizer))
    warm = engine.warm_up()
  except ValueError as e:
    cli.fail(str(e))
  host, port = sock.getsockname()[:2]
  url = f"http://{host}:{port}"
  started = {"url": url, "host": host, "port": port, "model": loaded.name, "mesh": args.mesh, "exchange": engine.exchange,
             "context": engine.context, "buckets": engine.buckets,
             "startup_s": round(time.perf_counter() - start, 2), "load_s": round(loaded_s, 2),
             "compile_s": warm["compile_s"], "compiles_at_start": warm["compiles"],
             "bucket_compile_s": warm["bucket_s"]}
  print(f"serving {loaded.name} at {url} (mesh {args.mesh}, {engine.exchange}): start-up "
        f"{started['startup_s']:.1f} s, of which load {loaded_s:.1f} s and compiling "
        f"{warm['compile_s']:.1f} s ({warm['compiles']} XLA compiles, prompt buckets "
        f"{engine.buckets})", file=sys.stderr, flush=True)
  _serve_http(sock, engine, args.max_queue, started)


def _listen(args):
  import socket
  try:
    return socket.create_server((args.host, args.port))
  except OSError as e:
    cli.fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another "
             "--port (0 takes a free one) or --host")


def _serve_http(sock, engine, max_queue, started) -> None:
  import uvicorn
  from astra_jax.serve import app as app_lib, scheduler
  queue = scheduler.Scheduler(engine, max_queue)
  if hasattr(engine, "run_between"):
    engine.run_between = queue.call_soon
  app = app_lib.create_app(engine, queue, started=started)
  cli.print_result(started)
  config = uvicorn.Config(app, host=started["host"], port=started["port"], log_level="info",
                          timeout_graceful_shutdown=3)
  try:
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    queue.shutdown()
    if hasattr(engine, "shutdown"):
      engine.shutdown()


def serve_group(args, start: float) -> None:
  """One rank of a multi-rank server (module docstring)."""
  try:
    distributed.check(args, args.mesh)
  except ValueError as e:
    cli.fail(str(e))
  if args.distributed == "auto":
    cli.fail("a multi-rank server is formed by its own control channel, not by cluster "
             "detection: give --coordinator, --num-processes and --process-id (infer.launch "
             "does)")
  if args.mesh != args.num_processes:
    cli.fail(f"a multi-rank server runs one device per rank: --mesh={args.mesh} must equal "
             f"--num-processes={args.num_processes}")
  rank = args.process_id
  cli.ensure_cpu_devices(1)
  sock = _listen(args) if rank == 0 else None
  from astra_jax.parallel import stream_transport
  from astra_jax.serve import chat, group, load, rank as rank_lib
  from astra_jax.serve.engine import CompileCounter
  links_host = stream_transport.local_address(args.coordinator)
  try:
    buckets = _buckets(args.buckets)
    compiles = CompileCounter()
    loaded = load.load_group(args.model, args.workdir, exchanges_asked=args.exchange,
                             context=args.context, text=args.text, step=args.step)
    if args.name:
      loaded.name = args.name
    loaded_s = time.perf_counter() - start
    print(f"rank {rank}: loaded {loaded.name} with plans {sorted(loaded.variants)} in "
          f"{loaded_s:.1f} s", file=sys.stderr, flush=True)
    if rank:
      rank_lib.serve_worker(loaded, rank=rank, front=args.coordinator, host=links_host,
                            compiles=lambda: compiles.count)
      return
    engine = group.GroupEngine(loaded, size=args.num_processes, control=args.coordinator,
                               links_host=links_host, buckets=buckets,
                               chat=chat.for_checkpoint(args.model, loaded.tokenizer),
                               max_loss=args.max_quality_loss,
                               rank_timeout_s=args.rank_timeout)
    engine.wait_for_ranks(args.join_timeout)
    warm = engine.warm_up(loaded.held_out)
  except (ValueError, group.RankLost) as e:  # a rank lost during the warm-up too
    cli.fail(str(e))
  host, port = sock.getsockname()[:2]
  url = f"http://{host}:{port}"
  started = {"url": url, "host": host, "port": port, "model": loaded.name,
             "ranks": args.num_processes, "plans": engine.describe()["plans"],
             "context": engine.context, "buckets": engine.buckets,
             "startup_s": round(time.perf_counter() - start, 2), "load_s": round(loaded_s, 2),
             "compile_s": warm["compile_s"], "compiles_at_start": warm["compiles"],
             "bucket_compile_s": warm["bucket_s"], "link": warm["link"],
             "quality": warm["quality"], "quality_loss_pct": engine.planner.loss}
  print(f"serving {loaded.name} at {url} on {args.num_processes} ranks (plans "
        f"{started['plans']}): start-up {started['startup_s']:.1f} s, of which load "
        f"{loaded_s:.1f} s and warm-up {warm['compile_s']:.1f} s", file=sys.stderr, flush=True)
  _serve_http(sock, engine, args.max_queue, started)


if __name__ == "__main__":
  cli.entry(main)
