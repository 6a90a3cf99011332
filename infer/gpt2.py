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

import argparse
import sys

from astra_jax.run import cli


def parse(argv, description=None):
  p = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a run folder made by train.gpt2 / train.llama")
  p.add_argument("--mesh", type=int, default=4)
  p.add_argument("--exchange", default=None, help="exact | vq (default: the run's own)")
  p.add_argument("--eval", action="store_true", help="validation perplexity")
  p.add_argument("--prompt", default=None, help="text to continue")
  p.add_argument("--max-new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  p.add_argument("--eval-windows", type=int, default=None, help="default: the run's config")
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
  from astra_jax.run import generate, workdir
  from astra_jax.data import text as text_lib
  from astra_jax.run.tasks import lm

  result = {}
  try:
    cfg = workdir.load_config(args.workdir)
    if args.exchange == "vq" and cfg.exchange != "vq":
      raise ValueError(
          f"{args.workdir} was trained with the {cfg.exchange!r} exchange and has no codebooks; "
          f"fine-tune one first: python -m train.{lm.family(cfg)} --init-from {args.workdir} "
          "--config.exchange=vq --workdir NEW_DIR")
    if args.drop_rate and args.prompt is not None:
      raise ValueError("--drop-rate simulates losses in the prefill forward of --eval; "
                       "generation (--prompt) does not model them: drop one of the two")
    sync = cli.sync_from_flags(args)
    if sync is not None and args.prompt is not None:
      raise ValueError("--tp evaluates tensor-parallel baselines (--eval); generation "
                       "(--prompt) runs the sequence-parallel prefill: drop one of the two")
    target = lm.model_config(cfg, args.exchange)
    target = dataclasses.replace(
        target, exchange=dataclasses.replace(target.exchange, drop_rate=args.drop_rate))
    if sync is not None:
      target = dataclasses.replace(target, sync=sync)
    cfg, model_cfg, model = lm.restore_trained(args.workdir, target, args.step)
    tokenizer = text_lib.load_tokenizer(cfg.tokenizer)
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
  cli.print_result(dict(result, workdir=args.workdir, mesh=args.mesh,
                        exchange=model_cfg.exchange.name), args.out)


if __name__ == "__main__":
  main()
