#!/usr/bin/env python3
"""Single-sequence prefill and decode speed of transformers on CPU, for docs/perf.md.

  bench_transformers_cpu.py MODEL PROMPT_IDS_JSON NEW_TOKENS DTYPE
Prints one JSON line: prefill_tok_s (one forward over the prompt) and decode_tok_s
(greedy steps with the KV cache, EOS ignored), best of 3 runs after a warm-up.
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    model_id, ids_path, new_tokens, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    prompt = json.load(open(ids_path))
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=getattr(torch, dtype))
    model.eval()
    best_prefill = best_decode = 0.0
    with torch.inference_mode():
        for run in range(4):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = torch.argmax(out.logits[0, -1]).view(1, 1)
            t2 = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = torch.argmax(out.logits[0, -1]).view(1, 1)
            t3 = time.perf_counter()
            if run == 0:
                continue  # warm-up
            best_prefill = max(best_prefill, len(prompt) / (t1 - t0))
            best_decode = max(best_decode, (new_tokens - 1) / (t3 - t2))
    print(json.dumps({"engine": f"transformers {dtype}", "threads": torch.get_num_threads(),
                      "prompt_tokens": len(prompt), "new_tokens": new_tokens,
                      "prefill_tok_s": round(best_prefill, 1), "decode_tok_s": round(best_decode, 2)}))


if __name__ == "__main__":
    main()
