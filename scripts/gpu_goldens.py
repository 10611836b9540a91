#!/usr/bin/env python3
"""Goldens of the GPU suite's bf16 test (tests/gpu), made on the GPU machine by
scripts/gpu-check: logits of every prompt position of the seeded tiny checkpoints, from
transformers on the GPU

  - `torch_bf16`: the model loaded in bfloat16, as transformers runs it (activations bf16);
  - `torch_f32`: the model in float32 with its matrices rounded to bfloat16 and vectors
    (norms, biases) kept, which is what inferd's bf16 mode stores.

  gpu_goldens.py OUT.json      (models from the HF cache: scripts/fetch-test-models --only tiny)
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(repo):
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    d = os.path.join(hub, "models--" + repo.replace("/", "--"))
    return os.path.join(d, "snapshots", open(os.path.join(d, "refs", "main")).read().strip())


def logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids], device="cuda")).logits[0]
    return [[round(float(x), 6) for x in row] for row in out.float().cpu()]


def main():
    cases = []
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]:
        repo = f"inferd-test/{name}"
        path = snapshot(repo)
        golden = json.load(open(os.path.join(ROOT, "tests", "goldens", "models", f"{name}.json")))
        bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
        f32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
        with torch.no_grad():
            for p in f32.parameters():
                if p.dim() == 2:
                    p.copy_(p.to(torch.bfloat16).float())
        for case in golden["cases"]:
            ids = case["prompt_ids"]
            cases.append({"model": repo, "case": case["name"], "prompt_ids": ids,
                          "torch_bf16": logits(bf16, ids), "torch_f32": logits(f32, ids)})
    json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "cases": cases},
              open(sys.argv[1], "w"))
    print(f"gpu_goldens: {len(cases)} cases on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
