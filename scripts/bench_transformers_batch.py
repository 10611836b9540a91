#!/usr/bin/env python3
"""Offline batch throughput of transformers on CPU (docs/perf.md), the workload of
benches/engine_throughput.rs: C prompts queued at once, O new tokens each, greedy, EOS
never ends a request.

  bench_transformers_batch.py MODEL PROMPTS_JSON CONCURRENCY,... OUTPUT_TOKENS DTYPE
Prints one JSON line per concurrency, for `generate_batch` (transformers' continuous
batching; its time includes the per-call setup of its cache manager, a real cost of the
API) and for `generate` on the batch (all prompts have the same length: no padding).
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402


def main():
    model_id, prompts_path, concurrency, new_tokens, dtype = sys.argv[1:6]
    new_tokens = int(new_tokens)
    prompts = json.load(open(prompts_path))
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=getattr(torch, dtype))
    model.eval()
    # min_new_tokens keeps EOS from ending any request early, as ignore_eos does.
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=model.config.eos_token_id, pad_token_id=0)
    for c in (int(x) for x in concurrency.split(",")):
        batch = prompts[:c]
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate_batch(inputs=batch, generation_config=cfg, progress_bar=False)
            secs = time.perf_counter() - start
        generated = sum(len(o.generated_tokens) for o in out.values())
        print(json.dumps({"engine": f"transformers generate_batch {dtype}", "threads": torch.get_num_threads(),
                          "concurrency": c, "output_tokens": generated, "seconds": round(secs, 2),
                          "output_tok_s": round(generated / secs, 1)}), flush=True)
        with torch.inference_mode():
            ids = torch.tensor(batch)  # equal-length prompts: no padding needed
            start = time.perf_counter()
            res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            secs = time.perf_counter() - start
        generated = (res.shape[1] - ids.shape[1]) * res.shape[0]
        print(json.dumps({"engine": f"transformers generate (static batch) {dtype}", "threads": torch.get_num_threads(),
                          "concurrency": c, "output_tokens": generated, "seconds": round(secs, 2),
                          "output_tok_s": round(generated / secs, 1)}), flush=True)


if __name__ == "__main__":
    main()
