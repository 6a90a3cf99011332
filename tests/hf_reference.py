"""Hugging Face reference for tests/test_hf_gpt2.py (runs in .venv-hf, not .venv).

  .venv-hf/bin/python tests/hf_reference.py OUTDIR

builds a tiny random ``GPT2LMHeadModel`` with a fixed seed and writes
  OUTDIR/single/     config.json + model.safetensors (one file)
  OUTDIR/sharded/    the same weights in several model-0000x-of-0000y.safetensors
                     files with model.safetensors.index.json
  OUTDIR/reference.npz  tokens [B, T], their float32 logits [B, T, V], a prompt,
                     transformers' greedy continuation of it, and the smallest
                     top-1/top-2 logit gap along that continuation.
"""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np
import torch
import transformers

SEED = 1234
NEW_TOKENS = 20
PROMPT = [17, 201, 3, 99, 42, 250, 8]  # 7 tokens: not a multiple of the mesh size


def _save(model, folder, **kwargs):
  if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
    kwargs["safe_serialization"] = True  # transformers < 5; 5 always writes safetensors
  model.save_pretrained(folder, **kwargs)


def main(out: str) -> None:
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(SEED)
  cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                initializer_range=0.2,  # clear argmax gaps for greedy parity
                                bos_token_id=None, eos_token_id=None)  # never stop early
  model = transformers.GPT2LMHeadModel(cfg).eval()
  _save(model, os.path.join(out, "single"))
  _save(model, os.path.join(out, "sharded"), max_shard_size="20KB")

  g = torch.Generator().manual_seed(SEED)
  tokens = torch.randint(0, cfg.vocab_size, (2, cfg.n_positions), generator=g)
  prompt = torch.tensor([PROMPT])
  with torch.no_grad():
    logits = model(tokens).logits.float()
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=NEW_TOKENS, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
  new = gen.sequences[0, len(PROMPT):]
  top2 = torch.stack([s[0].topk(2).values for s in gen.scores])
  np.savez(os.path.join(out, "reference.npz"), tokens=tokens.numpy().astype(np.int32),
           logits=logits.numpy(), prompt=np.asarray(PROMPT, np.int32),
           generated=new.numpy().astype(np.int32),
           min_gap=np.float32((top2[:, 0] - top2[:, 1]).min()),
           versions=np.asarray([torch.__version__, transformers.__version__]))


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: .venv-hf/bin/python tests/hf_reference.py OUTDIR")
  main(sys.argv[1])
