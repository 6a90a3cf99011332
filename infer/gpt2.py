"""Evaluate or sample a trained GPT-2 (or Llama) run, sequence-parallel prefill.

  python -m infer.gpt2 --workdir DIR --mesh=4 --exchange vq --eval
  python -m infer.gpt2 --workdir DIR --mesh=4 --prompt "ROMEO:" --max-new-tokens 200

--eval prints validation perplexity; the last line is one JSON object with
perplexity, loss, exchange, mesh, groups, bits_per_token, bytes_per_device
(read from the compiled program, one window per forward) and tokens.
--prompt prefills across the mesh, then decodes on the device that holds the
prompt's last token with a KV cache (its own K/V exact, the others' as the
exchange delivered them), streaming the text.  In a multi-process run every
process joins the prefill and the process owning that device decodes and
streams (``decoded_by_process`` in the JSON; the others report no tokens).
The model family comes from the run's config.json, so ``infer.llama`` (the
same ``main``) and this command read either kind of run.
"""

from __future__ import annotations

import sys

from astra_jax.run import cli


def parse(argv, description=None):
  p = cli.Parser(description=description or __doc__.split("\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run folder made by train.gpt2 / train.llama")
  source.add_argument("--model", help="a pretrained model instead of a run: gguf:PATH (llama.cpp "
                      "file), hf:DIR (transformers folder) or smollm2 (bundled)")
  p.add_argument("--context", type=cli.at_least(1), default=None,
                 help="--model: tokens per evaluation window (default 1024, at most the model's)")
  p.add_argument("--text", default=None,
                 help="--model: a UTF-8 file or folder to score and calibrate on (default: "
                      "Shakespeare, every 8th play held out)")
  p.add_argument("--mesh", type=cli.at_least(1), default=4)
  p.add_argument("--exchange", default=None,
                 help="exact | ring | vq, or a spec string such as vq:drop_rate=0.05 (default: "
                      "the run's own; vq needs a vq-trained run and uses its codebooks)")
  p.add_argument("--eval", action="store_true", help="validation perplexity")
  p.add_argument("--prompt", default=None, help="text to continue")
  p.add_argument("--max-new-tokens", type=cli.at_least(0), default=100)
  p.add_argument("--temperature", type=cli.nonnegative, default=0.0, help="0: greedy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=cli.at_least(0), default=None,
                 help="checkpoint step (default latest)")
  p.add_argument("--eval-windows", type=cli.at_least(1), default=None,
                 help="default: the run's config")
  p.add_argument("--out", default=None, help="also write the JSON result here")
  cli.add_link_flags(p)
  return p.parse_args(argv)


def main(argv=None, *, description: str | None = None):
  args = parse(sys.argv[1:] if argv is None else argv, description)
  if not args.eval and args.prompt is None:
    cli.fail("nothing to do: pass --eval, --prompt TEXT, or both")
  cli.setup_devices(args)
  import dataclasses
  import jax
  from astra_jax.io import pretrained
  from astra_jax.run import config, generate, workdir
  from astra_jax.data import text as text_lib
  from astra_jax.core import exchange as exchange_lib
  from astra_jax.run.tasks import exchanges, lm

  result = {}
  try:
    if args.model:
      cfg = config.load("pretrained_lm", [])
      lm.use_pretrained(cfg, args.model)
      # default window: the config's, or the model's whole context if that is shorter
      model_context = pretrained.model_config(pretrained.parse(args.model)).context
      cfg.context = args.context or min(cfg.context, model_context)
      cfg.text = args.text or cfg.text
      if args.step is not None:
        raise ValueError("--step picks a checkpoint of a --workdir run; --model has none")
    else:
      if args.context or args.text:
        raise ValueError("--context and --text are for --model; a run evaluates on the text "
                         "and window it trained with")
      cfg = workdir.load_config(args.workdir, "lm")
      exchanges.for_evaluation(cfg, args.exchange, args.workdir, f"train.{lm.family(cfg)}")
    if args.drop_rate and args.prompt is not None:
      raise ValueError("--drop-rate simulates losses in the prefill forward of --eval; "
                       "generation (--prompt) does not model them: drop one of the two")
    sync = cli.sync_from_flags(args)
    if sync is not None and args.prompt is not None:
      raise ValueError("--tp evaluates tensor-parallel baselines (--eval); generation "
                       "(--prompt) runs the sequence-parallel prefill: drop one of the two")
    target = lm.model_config(cfg, args.exchange)
    if args.drop_rate:  # else the spec's own drop_rate (default 0)
      target = dataclasses.replace(
          target, exchange=dataclasses.replace(target.exchange, drop_rate=args.drop_rate))
    if sync is not None:
      target = dataclasses.replace(target, sync=sync)
    tokenizer = lm.load_tokenizer(cfg)
    if args.model:
      model_cfg, model = target, lm.load_pretrained(args.model, target)
      if isinstance(model_cfg.exchange, exchange_lib.VQExchange) and getattr(
          model_cfg.exchange, "quantize", True):  # ASTRA zero-shot: k-means codebooks only
        train_text, _ = text_lib.load_splits(cfg.text)
        lm.kmeans_codebooks(model, cfg, lm.token_ids(train_text, tokenizer))
    else:
      cfg, model_cfg, model = lm.restore_trained(args.workdir, target, args.step)
    if args.eval:
      _, valid_text = text_lib.load_splits(cfg.text)
      result = lm.evaluate(model, cfg, model_cfg, lm.token_ids(valid_text, tokenizer),
                           args.mesh, cfg.eval_batch_size,
                           args.eval_windows or cfg.eval_windows, tensor=sync is not None)
      print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} validation tokens, "
            f"{result['strategy']} ({result['parallelism']} parallel), mesh {args.mesh}, "
            f"{result['bytes_per_device']:,} bytes/device per {cfg.context}-token forward",
            flush=True)
    if args.prompt is not None:
      prompt = tokenizer.encode(args.prompt)
      if not prompt:
        raise ValueError("--prompt is empty; give the text to continue, e.g. --prompt \"ROMEO:\"")
      stream = generate.generate(model, prompt, args.max_new_tokens, mesh_size=args.mesh,
                                 context=cfg.context, temperature=args.temperature,
                                 key=jax.random.PRNGKey(args.seed))
      owner = generate.decode_device(args.mesh, len(prompt)).process_index
      new = []
      if owner != jax.process_index():
        print(f"prefill done; decoding continues on process {owner}", flush=True)
      else:
        sys.stdout.write(args.prompt)
      shown = ""
      for token in stream:  # decode incrementally so multi-byte characters print whole
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):
          sys.stdout.write(text[len(shown):])
          sys.stdout.flush()
          shown = text
      if owner == jax.process_index():
        sys.stdout.write(tokenizer.decode(new)[len(shown):] + "\n")
      result.update(prompt_tokens=len(prompt), new_tokens=len(new),
                    completion=tokenizer.decode(new), decoded_by_process=owner)
  except ValueError as e:
    cli.fail(str(e))
  # --out holds the answer: the process that decoded it writes the file
  cli.print_result(dict(result, workdir=args.workdir, model=args.model, mesh=args.mesh,
                        exchange=model_cfg.exchange.name), args.out,
                   writer=result.get("decoded_by_process", 0) == jax.process_index())


if __name__ == "__main__":
  cli.entry(main)
