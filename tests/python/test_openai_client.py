"""The official `openai` client against a running `inferd serve` (started by
scripts/test-openai-client). Plain asserts, no test framework: each check prints its
name, and the first failure exits non-zero."""
import base64
import json
import os
import sys

import openai

BASE = os.environ["INFERD_BASE_URL"]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
client = openai.OpenAI(base_url=BASE, api_key="not-needed", max_retries=0)


def check(name, fn):
    fn()
    print(f"ok  {name}", flush=True)


def chat_nonstream():
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "The capital of France is Paris.", r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 37 and r.usage.completion_tokens == 8


def chat_stream():
    text, finish, usage = "", None, None
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == "The capital of France is Paris.", text
    assert finish == "stop" and usage.completion_tokens == 8


def chat_sampling_params():
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], temperature=0.8, top_p=0.9,
        seed=7, max_completion_tokens=12, n=2, presence_penalty=0.5, frequency_penalty=0.2, logprobs=True,
        top_logprobs=3, stop=["\n\n"], extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert len(r.choices) == 2
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], temperature=0.8, top_p=0.9,
        seed=7, max_completion_tokens=12, n=2, presence_penalty=0.5, frequency_penalty=0.2, logprobs=True,
        top_logprobs=3, stop=["\n\n"], extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices], "seeded runs differ"
    lp = r.choices[0].logprobs.content[0]
    assert lp.logprob <= 0 and len(lp.top_logprobs) == 3


def completions():
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text, (streamed, r.choices[0].text)


def models():
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids, ids
    assert client.models.retrieve(MODEL).id == MODEL


def errors():
    try:
        client.chat.completions.create(model=MODEL, messages=[], temperature=0)
        raise AssertionError("empty messages accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "messages", e.body
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=3)
        raise AssertionError("top_p 3 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "top_p"
    try:
        client.models.retrieve("nobody/nothing")
        raise AssertionError("unknown model found")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 5000}])
        raise AssertionError("overlong prompt accepted")
    except openai.UnprocessableEntityError as e:
        assert e.body["code"] == "context_length_exceeded", e.body
    bad_key = openai.OpenAI(base_url=os.environ["INFERD_KEYED_BASE_URL"], api_key="wrong", max_retries=0)
    try:
        bad_key.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass
    good_key = openai.OpenAI(base_url=os.environ["INFERD_KEYED_BASE_URL"], api_key="sekret", max_retries=0)
    assert good_key.models.list().data


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
QWEN = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
tools_client = openai.OpenAI(base_url=os.environ["INFERD_TOOLS_BASE_URL"], api_key="not-needed", max_retries=0)


def tool_calls():
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = tools_client.chat.completions.create(model=QWEN, messages=messages, tools=TOOLS, tool_choice="required",
                                             temperature=0, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather", r
    assert json.loads(call.function.arguments)["city"] == "Paris", call
    # Streamed: reassemble the deltas by index, as clients do.
    calls, finish, fragments = {}, None, 0
    for chunk in tools_client.chat.completions.create(model=QWEN, messages=messages, tools=TOOLS,
                                                      tool_choice="required", temperature=0, max_tokens=60,
                                                      stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content, c.delta
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
                fragments += 1
    assert finish == "tool_calls" and list(calls) == [0], (finish, calls)
    assert calls[0]["id"] == call.id.replace(r.id, chunk.id) and calls[0]["name"] == "get_weather", calls
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments), calls
    assert fragments > 3, fragments
    named = tools_client.chat.completions.create(
        model=QWEN, messages=messages, tools=TOOLS, temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"], named
    try:
        tools_client.chat.completions.create(model=QWEN, messages=messages, tools=TOOLS,
                                             tool_choice={"type": "function", "function": {"name": "nope"}})
        raise AssertionError("unknown tool accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tool_choice", e.body


def responses():
    r = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0)
    assert r.status == "completed" and r.output_text == "The capital of France is Paris.", r
    kinds, text, final = [], "", None
    with client.responses.stream(model=MODEL, input="What is the capital of France?", temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert text == final.output_text == r.output_text, (text, final.output_text)
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    follow = client.responses.create(model=MODEL, input="And of Germany?", temperature=0, previous_response_id=r.id)
    assert follow.output_text == "The capital of Germany is Berlin.", follow.output_text
    client.responses.delete(r.id)
    try:
        client.responses.retrieve(r.id)
        raise AssertionError("deleted response found")
    except openai.NotFoundError:
        pass
    try:
        client.responses.create(model=MODEL, input=[{"type": "function_call_output", "call_id": "x", "output": "y"}])
        raise AssertionError("orphan function_call_output accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "input[0].call_id", e.body
    # Tools (the flat Responses shape), forced, against the Qwen checkpoint.
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    r = tools_client.responses.create(model=QWEN, input="What is the weather like in Paris today?", tools=tools,
                                      tool_choice="required", temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    assert json.loads(calls[0].arguments)["city"] == "Paris", calls[0].arguments


SPEECH = "openai/whisper-tiny.en"
JFK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "audio", "jfk.wav")
JFK_TEXT = "And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."
speech_client = openai.OpenAI(base_url=os.environ["INFERD_SPEECH_BASE_URL"], api_key="not-needed", max_retries=0)


def transcriptions():
    with open(JFK, "rb") as f:
        r = speech_client.audio.transcriptions.create(model=SPEECH, file=f)
    assert r.text == JFK_TEXT, r.text
    with open(JFK, "rb") as f:
        text = speech_client.audio.transcriptions.create(model=SPEECH, file=f, response_format="text")
    assert text.strip() == JFK_TEXT, text
    with open(JFK, "rb") as f:
        v = speech_client.audio.transcriptions.create(model=SPEECH, file=f, response_format="verbose_json",
                                                      timestamp_granularities=["segment"])
    assert v.language == "english" and v.duration == 11.0, v
    assert [(s.start, s.end) for s in v.segments] == [(0.0, 8.0), (8.0, 11.0)], v.segments
    with open(JFK, "rb") as f:
        srt = speech_client.audio.transcriptions.create(model=SPEECH, file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:08,000\n"), srt
    deltas, done = "", None
    with open(JFK, "rb") as f:
        for event in speech_client.audio.transcriptions.create(model=SPEECH, file=f, stream=True):
            if event.type == "transcript.text.delta":
                deltas += event.delta
            elif event.type == "transcript.text.done":
                done = event.text
    assert deltas == JFK_TEXT and done == JFK_TEXT, (deltas, done)
    try:
        with open(JFK, "rb") as f:
            speech_client.audio.transcriptions.create(model=SPEECH, file=f, response_format="xml")
        raise AssertionError("bad response_format accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format", e.body


vision_client = openai.OpenAI(base_url=os.environ["INFERD_VISION_BASE_URL"], api_key="not-needed", max_retries=0)
VISION = "inferd-test/tiny-qwen2.5-vl"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def image_chat_stream():
    # The random-weight Qwen2.5-VL: a streamed reply to an image sent as a data: URL,
    # token for token what transformers generates (tests/goldens, scripts/vl_goldens.py).
    with open(os.path.join(ROOT, "tests", "goldens", "models", "tiny-qwen2.5-vl-chat.json")) as f:
        case = json.load(f)["cases"]["one_image"]
    with open(os.path.join(ROOT, "tests", "fixtures", "images", "chelsea.png"), "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture? "},
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
    ]}]
    assert case["messages"][0]["content"][0] == messages[0]["content"][0]
    tokens, usage, finish = [], None, None
    stream = vision_client.chat.completions.create(
        model=VISION, messages=messages, max_tokens=16, temperature=0, logprobs=True, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            tokens += [t.token for t in (c.logprobs.content if c.logprobs else None) or []]
            finish = c.finish_reason or finish
    assert tokens == case["tokens"], (tokens, case["tokens"])
    assert usage.prompt_tokens == case["prompt_tokens"] and usage.completion_tokens == 16, usage
    assert finish == "length", finish
    try:
        vision_client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])
        raise AssertionError("bytes that are no image accepted")
    except openai.BadRequestError as e:
        assert e.body["code"] == "invalid_image_format", e.body


for name, fn in [("chat", chat_nonstream), ("chat stream", chat_stream), ("sampling parameters", chat_sampling_params),
                 ("completions", completions), ("models", models), ("errors", errors), ("tool calls", tool_calls),
                 ("responses", responses), ("transcriptions", transcriptions),
                 ("image chat stream", image_chat_stream)]:
    check(name, fn)
print(json.dumps({"openai": openai.__version__, "passed": 10}))
