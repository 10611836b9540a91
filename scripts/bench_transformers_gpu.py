#!/usr/bin/env python3
"""transformers' own generate on the GPU, the baseline of docs/perf.md's GPU table
(scripts/gpu-check runs it beside `inferd bench --offline --device cuda`): a model built
from a config.json with random weights (speed does not depend on their values), bf16,
C prompts of INPUT random token ids decoded together for OUTPUT new tokens each (greedy,
EOS never ends a request), for each C. Prints one JSON line per C.

  bench_transformers_gpu.py CONFIG_DIR INPUT OUTPUT C,C,...
"""
import json
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    config_dir, input_len, output_len, concurrency = sys.argv[1:5]
    input_len, output_len = int(input_len), int(output_len)
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to("cuda").eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    for c in (int(x) for x in concurrency.split(",")):
        ids = torch.randint(0, config.vocab_size, (c, input_len), generator=gen).to("cuda")
        kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(ids[:, :16], **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t0
        assert out.shape == (c, input_len + output_len), out.shape
        print(json.dumps({"engine": "transformers generate", "model": config_dir, "concurrency": c,
                          "input_len": input_len, "output_len": output_len, "seconds": round(secs, 3),
                          "output_tok_per_s": round(c * output_len / secs, 1)}), flush=True)


if __name__ == "__main__":
    main()
