"""The official `openai` client against `inferd serve --device cuda` (scripts/gpu-check).
The GPU machine has no real checkpoint, so the server runs random weights
(`--load-format dummy`) and the checks are the API's shapes and invariants: greedy
streamed text equals the non-streamed text, seeded sampling repeats, usage adds up,
concurrent streams all finish, bad input is a 4xx. Plain asserts; each check prints.
"""
import os
import threading

import openai

client = openai.OpenAI(base_url=os.environ["INFERD_BASE_URL"], api_key="not-needed", max_retries=0)
MODEL = client.models.list().data[0].id
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def check(name, fn):
    fn()
    print(f"ok {name}", flush=True)


def chat():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop", r
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def sampling():
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.9, top_p=0.95, n=2, seed=7,
              logprobs=True, top_logprobs=3)
    r, again = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert len(r.choices) == 2
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices], "seeded runs differ"
    lp = r.choices[0].logprobs.content[0]
    assert lp.logprob <= 0 and len(lp.top_logprobs) == 3


def completions():
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 10, r
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0, stream=True))
    assert streamed == r.choices[0].text, (streamed, r.choices[0].text)


def concurrent_streams():
    done, errors = [], []

    def one(i):
        try:
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=32 + i % 17,
                temperature=0.7, seed=i, stream=True))
            done.append(chunks[-1].choices[0].finish_reason)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(done) == 64 and all(done), (errors[:3], len(done))


def errors():
    try:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
        raise AssertionError("empty messages accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "messages", e.body
    try:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=7)
        raise AssertionError("top_p 7 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "top_p", e.body


for name, fn in [("chat", chat), ("sampling", sampling), ("completions", completions),
                 ("concurrent_streams", concurrent_streams), ("errors", errors)]:
    check(name, fn)
print("openai client on the GPU: all checks passed")
