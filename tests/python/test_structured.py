"""Structured outputs through the official `openai` client against a running `inferd
serve` of Qwen2.5-Coder-0.5B-Instruct (started by scripts/test-openai-client):
`chat.completions.parse` with Pydantic models, streamed and not; 50 varied JSON schemas,
each reply validated with `jsonschema`; `json_object`; vLLM's regex, choice and grammar;
the Responses API's `text.format`; strict tools; one seed alone and in a batch of 32."""
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal, Optional

import jsonschema
import openai
from pydantic import BaseModel, Field

QWEN = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
client = openai.OpenAI(base_url=os.environ["INFERD_TOOLS_BASE_URL"], api_key="not-needed", max_retries=0)


def check(name, fn):
    fn()
    print(f"ok  {name}", flush=True)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: str = Field(max_length=30)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=130)
    role: Literal["engineer", "manager", "designer"]
    address: Address
    skills: List[str] = Field(max_length=3)


PROMPT = [{"role": "user", "content": "Describe Ada, a 36-year-old engineer from London, as JSON."}]


def parse_pydantic():
    r = client.chat.completions.parse(model=QWEN, messages=PROMPT, response_format=Person, temperature=0,
                                      max_tokens=200)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person), r
    assert r.choices[0].finish_reason == "stop", r
    with client.chat.completions.stream(model=QWEN, messages=PROMPT, response_format=Person, temperature=0,
                                        max_tokens=200) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == person, (final, person)
    # Each streamed prefix is a prefix of the final document.
    assert "".join(deltas) == r.choices[0].message.content, deltas


def schemas():
    """50 schemas over the features models are asked for."""
    out = []
    enums = [["red", "green", "blue"], ["low", "medium", "high"], ["cat", "dog"], ["north", "south", "east", "west"]]
    for i in range(10):
        out.append({"type": "object", "properties": {
            "id": {"type": "integer", "minimum": i, "maximum": 100 + i},
            "label": {"type": "string", "maxLength": 12 + i},
            "level": {"enum": enums[i % len(enums)]}},
            "required": ["id", "label", "level"], "additionalProperties": False})
    for i in range(10):
        out.append({"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "minItems": 1 + i % 3, "maxItems": 3 + i % 3},
            "total": {"type": "number", "minimum": -5, "maximum": 50}},
            "required": ["items", "total"], "additionalProperties": False})
    for i in range(10):
        out.append({"$defs": {"point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -10, "maximum": 10},
            "y": {"type": "integer", "minimum": -10, "maximum": 10}},
            "required": ["x", "y"], "additionalProperties": False}},
            "type": "object", "properties": {
                "start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"},
                "name": {"type": "string", "pattern": "^[a-z]{1,%d}$" % (4 + i)}},
            "required": ["start", "end", "name"], "additionalProperties": False})
    formats = ["date", "email", "ipv4", "uuid", "date"]
    for i in range(10):
        out.append({"type": "object", "properties": {
            "value": {"type": "string", "format": formats[i % len(formats)]},
            "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
            "count": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}]}},
            "required": ["value", "note", "count"], "additionalProperties": False})
    for i in range(10):
        out.append({"type": "object", "properties": {
            "user": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 20},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2 + i % 2},
                "active": {"type": "boolean"}},
                "required": ["name", "active"], "additionalProperties": False},
            "score": {"type": "integer", "minimum": 0, "maximum": 10 + i},
            "comment": {"type": "string", "maxLength": 15}},
            "required": ["user", "score"] + (["comment"] if i % 2 else []), "additionalProperties": False})
    assert len(out) == 50
    return out


def fifty_schemas():
    cases = schemas()

    def one(i):
        schema = cases[i]
        r = client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": f"Fill in an example #{i} of this JSON schema: "
                                                           f"{json.dumps(schema)}"}],
            response_format={"type": "json_schema", "json_schema": {"name": f"case{i}", "schema": schema,
                                                                    "strict": True}},
            temperature=0.7, seed=i, max_tokens=250)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (i, r.choices[0].finish_reason, text)
        doc = json.loads(text)
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER) \
            .validate(doc)
        return text

    with ThreadPoolExecutor(16) as pool:
        docs = list(pool.map(one, range(50)))
    assert len(set(docs)) > 40, "the schemas give different documents"


def json_object_and_vllm_fields():
    for i in range(4):
        r = client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": f"Give a JSON object describing fruit number {i}."}],
            response_format={"type": "json_object"}, temperature=0.8, seed=i, max_tokens=150)
        assert isinstance(json.loads(r.choices[0].message.content), dict), r
    r = client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Is Paris in France?"}], temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].message.content in ("yes", "no", "maybe"), r
    r = client.completions.create(model=QWEN, prompt="A US phone number:", max_tokens=20, temperature=0.5, seed=3,
                                  extra_body={"structured_outputs": {"regex": r" \(\d{3}\) \d{3}-\d{4}"}})
    assert re.fullmatch(r" \(\d{3}\) \d{3}-\d{4}", r.choices[0].text), r
    gbnf = 'root ::= "SELECT " col " FROM " tbl\ncol ::= "name" | "age"\ntbl ::= [a-z]{1,8}\n'
    r = client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Write SQL selecting a column."}], temperature=0,
        max_tokens=30, extra_body={"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"SELECT (name|age) FROM [a-z]{1,8}", r.choices[0].message.content), r
    # The older spelling still works.
    r = client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "Pick a colour."}], temperature=0,
        extra_body={"guided_choice": ["red", "blue"]})
    assert r.choices[0].message.content in ("red", "blue"), r
    # A cut document ends with `length`.
    r = client.chat.completions.create(model=QWEN, messages=PROMPT, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length", r
    try:
        client.chat.completions.create(model=QWEN, messages=PROMPT, extra_body={"structured_outputs": {"regex": "(a"}})
        raise AssertionError("bad regex accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "structured_outputs" and "regex" in e.body["message"], e.body


def responses_text_format():
    schema = Person.model_json_schema()
    r = client.responses.create(model=QWEN, input=PROMPT[0]["content"], temperature=0, max_output_tokens=200,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    Person.model_validate_json(r.output_text)
    assert r.text.format.type == "json_schema", r.text
    parsed = client.responses.parse(model=QWEN, input=PROMPT[0]["content"], temperature=0, max_output_tokens=200,
                                    text_format=Person)
    assert isinstance(parsed.output_parsed, Person), parsed


class Place(BaseModel):
    city: Literal["Paris", "London", "Rome"]
    country: str = Field(max_length=20)


class Weather(BaseModel):
    place: Place  # a nested model: the tool's schema refers to its own `$defs`
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)


def strict_tools():
    tool = openai.pydantic_function_tool(Weather, name="get_weather")
    messages = [{"role": "user", "content": "What will the weather be in Paris this week?"}]
    # One call: whether a sampled reply makes a second one is the model's choice and the
    # seed's (most seeds do here), not what this checks.
    r = client.chat.completions.parse(model=QWEN, messages=messages, tools=[tool], tool_choice="required",
                                      parallel_tool_calls=False, temperature=0.7, seed=1, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert "$defs" in json.dumps(tool), tool
    assert isinstance(call.function.parsed_arguments, Weather), call


def one_seed_alone_and_in_a_batch():
    body = dict(model=QWEN, messages=PROMPT, response_format={"type": "json_object"}, temperature=1.0, top_p=0.9,
                seed=1234, max_tokens=120)
    alone = client.chat.completions.create(**body).choices[0].message.content
    with ThreadPoolExecutor(32) as pool:
        batch = list(pool.map(lambda _: client.chat.completions.create(**body).choices[0].message.content, range(32)))
    assert all(doc == alone for doc in batch), (alone, [d for d in batch if d != alone][:2])


for name, fn in [("parse with pydantic", parse_pydantic), ("50 schemas", fifty_schemas),
                 ("json_object, regex, choice, grammar", json_object_and_vllm_fields),
                 ("responses text.format", responses_text_format), ("strict tools", strict_tools),
                 ("seed alone and in a batch of 32", one_seed_alone_and_in_a_batch)]:
    check(name, fn)
from importlib.metadata import version  # noqa: E402
print(json.dumps({"structured": "passed", "jsonschema": version("jsonschema")}))
sys.exit(0)
