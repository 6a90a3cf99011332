"""Hugging Face reference for tests/test_hf_gpt2.py and tests/test_hf_llama.py
(runs in .venv-hf, not .venv).

  .venv-hf/bin/python tests/hf_reference.py OUTDIR [gpt2|llama]

builds a tiny random ``GPT2LMHeadModel`` (default) or ``LlamaForCausalLM``
(grouped-query attention, Llama 3 RoPE scaling that matters within the
context, untied head) with a fixed seed and writes
  OUTDIR/single/     config.json + model.safetensors (one file)
  OUTDIR/sharded/    the same weights in several model-0000x-of-0000y.safetensors
                     files with model.safetensors.index.json
  OUTDIR/bf16/       (llama) the weights cast to bfloat16, one file
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


def _gpt2():
  cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                initializer_range=0.2,  # clear argmax gaps for greedy parity
                                bos_token_id=None, eos_token_id=None)  # never stop early
  return transformers.GPT2LMHeadModel(cfg).eval(), cfg.n_positions


def _llama():
  # head_dim 16: wavelengths 2*pi*10000^(i/8) = 6.3, 19.9, 62.8, ...; with an original
  # context of 32 (kept below 8, stretched above 32) all three llama3 bands occur
  scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  if int(transformers.__version__.split(".")[0]) >= 5:
    rope = {"rope_parameters": {**scaling, "rope_theta": 10000.0}}
  else:
    rope = {"rope_theta": 10000.0, "rope_scaling": scaling}
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
      bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager",
      **rope)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # RMSNorm weights start at 1; make them matter
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  return model, cfg.max_position_embeddings


def main(out: str, family: str = "gpt2") -> None:
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(SEED)
  model, context = {"gpt2": _gpt2, "llama": _llama}[family]()
  _save(model, os.path.join(out, "single"))
  _save(model, os.path.join(out, "sharded"), max_shard_size="20KB")
  if family == "llama":
    import copy
    _save(copy.deepcopy(model).to(torch.bfloat16), os.path.join(out, "bf16"))

  g = torch.Generator().manual_seed(SEED)
  tokens = torch.randint(0, model.config.vocab_size, (2, context), generator=g)
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
  if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["gpt2"], ["llama"]):
    sys.exit("usage: .venv-hf/bin/python tests/hf_reference.py OUTDIR [gpt2|llama]")
  main(*sys.argv[1:])
