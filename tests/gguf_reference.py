"""transformers reference for tests/test_gguf.py (runs in .venv-hf, not .venv).

  .venv-hf/bin/python tests/gguf_reference.py OUT MODEL.gguf EXPORTED_DIR TEXT_FILE

reads the GGUF with transformers' own GGUF support (its tokenizer converter,
and ``from_pretrained(gguf_file=...)``, which dequantizes with llama.cpp's
``gguf`` package and undoes llama.cpp's Q/K row order itself), so nothing of
astra_jax is involved; it also loads EXPORTED_DIR (written by
``astra_jax.io.gguf.write_hf_folder``) as a plain ``LlamaForCausalLM``.
Writes OUT/reference.npz:

  text_ids        the tokenizer's ids for TEXT_FILE, and ``decoded`` their decoding
  chat_ids        ids of a string with special tokens written in it
  tokens [1, T]   the first T = 128 ids of the text (fewer: repeated), and
  logits          the GGUF model's float32 logits for them
  export_weight_diff  the largest |difference| between the parameters of the
                  GGUF model and of the exported folder's model
  prompt, generated, min_gap   greedy continuation (20 tokens, never stopped
                  early) of a prompt, and the smallest top-1/top-2 logit gap on it
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import transformers

TOKENS = 128
NEW_TOKENS = 20
PROMPT = "The capital of France is"
CHAT = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"


def main(out: str, gguf_path: str, exported: str, text_file: str) -> None:
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  folder, name = os.path.split(os.path.abspath(gguf_path))
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  with open(text_file, encoding="utf-8") as f:
    text = f.read()
  text_ids = tok(text)["input_ids"]
  chat_ids = tok(CHAT)["input_ids"]
  tokens = torch.tensor([(text_ids * (TOKENS // len(text_ids) + 1))[:TOKENS]])

  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                            dtype=torch.float32).eval()
  export = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  mine, theirs = dict(model.named_parameters()), dict(export.named_parameters())
  assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
  diff = max(float((mine[k] - theirs[k]).abs().max().detach()) for k in mine)
  del export

  prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
  model.generation_config.eos_token_id = None  # 20 tokens whatever comes
  with torch.no_grad():
    logits = model(tokens).logits.float()
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None,
                         output_scores=True, return_dict_in_generate=True)
  new = gen.sequences[0, prompt.shape[1]:]
  top2 = torch.stack([s[0].topk(2).values for s in gen.scores])
  np.savez(os.path.join(out, "reference.npz"),
           text_ids=np.asarray(text_ids, np.int32), decoded=np.asarray(tok.decode(text_ids)),
           chat_ids=np.asarray(chat_ids, np.int32), tokens=tokens.numpy().astype(np.int32),
           logits=logits.numpy(),
           export_weight_diff=np.float32(diff),
           prompt=prompt[0].numpy().astype(np.int32), generated=new.numpy().astype(np.int32),
           min_gap=np.float32((top2[:, 0] - top2[:, 1]).min()),
           versions=np.asarray([torch.__version__, transformers.__version__]))


if __name__ == "__main__":
  if len(sys.argv) != 5:
    sys.exit("usage: .venv-hf/bin/python tests/gguf_reference.py OUT MODEL.gguf EXPORTED_DIR "
             "TEXT_FILE")
  main(*sys.argv[1:])
