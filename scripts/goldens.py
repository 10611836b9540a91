#!/usr/bin/env python3
"""Write inferd's golden files from Hugging Face transformers on CPU (float32 compute).

Run through scripts/gen-goldens, which makes the pinned venv. Outputs (small JSON,
committed) under tests/goldens/:
  models/<name>.json  prompt ids, top-k logits at several positions, 32 greedy tokens
  templates.json      chat templates rendered by apply_chat_template for a set of
                      conversations
The models must already be installed by scripts/fetch-test-models.
"""
import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "goldens")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOP_K = 8
GREEDY_TOKENS = 32


def greedy(model, ids, n):
    """Plain argmax continuation without stopping at EOS (what the Rust test runs)."""
    out = []
    past = None
    inp = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(torch.argmax(res.logits[0, -1]))
            out.append(nxt)
            inp = torch.tensor([[nxt]])
    return out


def model_golden(repo, prompts):
    model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cases = []
    for name, ids in prompts:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        positions = sorted({0, len(ids) // 2, len(ids) - 1})
        top = []
        for p in positions:
            values, idx = torch.topk(logits[p], TOP_K)
            top.append({"position": p, "ids": idx.tolist(), "logits": [round(float(v), 6) for v in values]})
        cases.append({"name": name, "prompt_ids": ids, "top_logits": top, "greedy_ids": greedy(model, ids, GREEDY_TOKENS)})
    return {"model": repo, "dtype": "float32", "top_k": TOP_K, "cases": cases}


def random_ids(seed, n, vocab):
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}", file=sys.stderr)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "number", "minimum": 0.0, "maximum": 14, "default": 1.5},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time (UTC) — ISO 8601",
                                              "parameters": {"type": "object", "properties": {}}}}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_and_turns": [
        {"role": "system", "content": "You are terse.\nAnswer in one line."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello. ünïcödé ✓"},
        {"role": "user", "content": "Say \"quote\" and a \\ backslash."},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": {}}},
        ]},
        {"role": "tool", "content": "{\"temperature\": 21.5}"},
        {"role": "tool", "content": "12:00Z"},
    ],
    "thinking_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "reasoning_content_field": [
        {"role": "user", "content": "Pick a number."},
        {"role": "assistant", "content": "7", "reasoning_content": "Any number works."},
        {"role": "user", "content": "Why?"},
    ],
}

# (case name, tokenizer fixture, template file or None for the tokenizer's own,
#  conversation, tools, add_generation_prompt, kwargs)
TEMPLATE_CASES = [
    ("smollm2_single", "smollm2-135m", None, "single_user", None, True, {}),
    ("smollm2_turns", "smollm2-135m", None, "system_and_turns", None, False, {}),
    ("qwen25_single", "qwen2.5-coder-0.5b", None, "single_user", None, True, {}),
    ("qwen25_turns", "qwen2.5-coder-0.5b", None, "system_and_turns", None, True, {}),
    ("qwen25_tools", "qwen2.5-coder-0.5b", None, "single_user", [WEATHER_TOOL, TIME_TOOL], True, {}),
    ("qwen25_tool_round_trip", "qwen2.5-coder-0.5b", None, "tool_round_trip", [WEATHER_TOOL, TIME_TOOL], True, {}),
    ("qwen25_7b_tools_system", "qwen2.5-coder-0.5b", "Qwen-Qwen2.5-7B-Instruct.jinja", "system_and_turns", [WEATHER_TOOL], True, {}),
    ("qwen3_thinking_on", "qwen2.5-coder-0.5b", "Qwen-Qwen3-0.6B.jinja", "thinking_history", None, True, {}),
    ("qwen3_thinking_off", "qwen2.5-coder-0.5b", "Qwen-Qwen3-0.6B.jinja", "thinking_history", None, True, {"enable_thinking": False}),
    ("qwen3_reasoning_content", "qwen2.5-coder-0.5b", "Qwen-Qwen3-0.6B.jinja", "reasoning_content_field", None, True, {}),
    ("qwen3_tool_responses", "qwen2.5-coder-0.5b", "Qwen-Qwen3-0.6B.jinja", "tool_round_trip", [WEATHER_TOOL, TIME_TOOL], True, {}),
    ("qwen3_tools_no_prompt", "qwen2.5-coder-0.5b", "Qwen-Qwen3-0.6B.jinja", "system_and_turns", [TIME_TOOL], False, {}),
]


def template_goldens():
    cases = []
    for name, tok_dir, template_file, conv, tools, add_gen, kwargs in TEMPLATE_CASES:
        tok = AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "models", tok_dir))
        template = None
        if template_file:
            with open(os.path.join(FIXTURES, "templates", template_file), encoding="utf-8") as f:
                template = f.read()
        rendered = tok.apply_chat_template(CONVERSATIONS[conv], tools=tools, add_generation_prompt=add_gen,
                                           tokenize=False, chat_template=template, **kwargs)
        ids = tok.apply_chat_template(CONVERSATIONS[conv], tools=tools, add_generation_prompt=add_gen,
                                      tokenize=True, chat_template=template, return_dict=True, **kwargs)["input_ids"]
        cases.append({"name": name, "tokenizer": tok_dir, "template_file": template_file,
                      "messages": CONVERSATIONS[conv], "tools": tools, "add_generation_prompt": add_gen,
                      "kwargs": kwargs, "rendered": rendered, "ids": list(ids)})
    return {"transformers": transformers.__version__, "cases": cases}


def main():
    torch.manual_seed(0)
    write(os.path.join(OUT, "templates.json"), template_goldens())

    for repo, file, code in [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m",
         "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
        ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b", "def quicksort(items):\n"),
    ]:
        tok = AutoTokenizer.from_pretrained(repo)
        chat_ids = list(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        raw_ids = tok(code, add_special_tokens=False)["input_ids"]
        write(os.path.join(OUT, "models", f"{file}.json"),
              model_golden(repo, [("chat_capital_of_france", chat_ids), ("raw_code", raw_ids)]))

    for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3"):
        repo = f"inferd-test/{name}"
        prompts = [("short", random_ids(11, 7, 384)), ("three_blocks", random_ids(12, 41, 384))]
        write(os.path.join(OUT, "models", f"{name}.json"), model_golden(repo, prompts))


if __name__ == "__main__":
    main()
