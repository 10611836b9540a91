"""inferd as NVIDIA Dynamo workers, end to end on loopback (scripts/test-dynamo runs it
in the Dynamo venv, scripts/dynamo-venv): two `inferd-dynamo` workers (SmolLM2-135M)
behind two Dynamo frontends on one file-discovery folder, one frontend routing
round-robin and one routing by KV-cache overlap, and `inferd serve` alone as the
reference. Plain asserts; each check prints its name; the first failure exits non-zero
and prints the logs.

1. 40 chat requests (20 streamed, 20 not, 4 at a time) through Dynamo: the same
   greedy text as inferd alone, and both workers served some.
2. KV-aware routing: 10 requests sharing a long prefix all go to one worker, and hit
   its prefix cache (its inferd's metrics count the hits).
3. Cancellation: a client that drops a stream at the frontend frees the worker's
   blocks.
4. Sampling options, stop ids, max_tokens, seeds and logprobs carry through.
5. SIGKILL of a worker mid-run: the run completes on the other (the frontend migrates
   the cut streams), and the dead worker's engine died with it.
6. SIGTERM: the worker leaves discovery, finishes its streams, exits 0.
7. A worker whose inferd dies leaves discovery and exits 1.
"""

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFERD = os.environ.get("INFERD_BIN") or os.path.join(ROOT, "target", "release", "inferd")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PY = sys.executable
SCRATCH = tempfile.mkdtemp(prefix="inferd-dynamo.")
ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    DYN_DISCOVERY_BACKEND="file",
    DYN_FILE_KV=os.path.join(SCRATCH, "discovery"),
    DYN_TCP_RPC_HOST="127.0.0.1",
    DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
    DYN_EVENT_PLANE_HOST="127.0.0.1",
    DYN_SYSTEM_HOST="127.0.0.1",
    DYN_LOG="warn",
    PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    INFERD_BIN=INFERD,
)
procs = {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name, argv):
    log = open(os.path.join(SCRATCH, f"{name}.log"), "wb")
    procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    return procs[name]


def log_of(name):
    with open(os.path.join(SCRATCH, f"{name}.log"), "rb") as f:
        return f.read().decode("utf-8", "replace")


def wait_for(what, condition, within=180):
    deadline = time.time() + within
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def http(base, method, path, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def chat(base, messages, stream=False, **extra):
    """(text, finish_reason, usage, logprobs) of one chat request."""
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    status, text = http(base, "POST", "/v1/chat/completions", body)
    assert status == 200, (status, text)
    if not stream:
        r = json.loads(text)
        c = r["choices"][0]
        return c["message"]["content"] or "", c["finish_reason"], r.get("usage"), c.get("logprobs")
    out, finish, usage = "", None, None
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices", []):
            out += (c.get("delta") or {}).get("content") or ""
            finish = c.get("finish_reason") or finish
    return out, finish, usage, None


def inferd_serve():
    """The reference: inferd serving alone."""
    p = start("alone", [INFERD, "serve", MODEL, "--port", "0", "--num-blocks", "256", "--responses-store", "memory"])
    line = wait_for("inferd alone", lambda: re.search(r"serving .* on (http://[0-9.:]+)", log_of("alone")))
    return p, line.group(1)


def worker(name):
    start(name, [PY, "-m", "inferd_dynamo", "--model", MODEL, "--", "--num-blocks", "256", "--responses-store", "memory"])


def worker_inferd(name):
    """The base URL and pid of a worker's inferd child."""
    m = wait_for(f"{name}'s inferd", lambda: re.search(r"inferd: serving .* on (http://[0-9.:]+)", log_of(name)))
    return m.group(1), child_pid(procs[name].pid)


def child_pid(parent):
    """The pid of `parent`'s child process (the worker's inferd)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                return int(entry)
    raise AssertionError(f"process {parent} has no child")


def served_by(name):
    return log_of(name).count("POST /inferd/v1/generate 200")


def metric(base, name):
    _, text = http(base, "GET", "/metrics")
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{base}/metrics has no {name}"
    return float(m.group(1))


def registered():
    folder = os.path.join(ENV["DYN_FILE_KV"], "v1", "instances")
    try:
        return [f for f in os.listdir(folder) if "inferd%2Fgenerate" in f]
    except FileNotFoundError:
        return []


def check(name, fn):
    fn()
    print(f"ok  {name}", flush=True)


QUESTIONS = [
    "What is the capital of France?",
    "Name a color.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What is the largest planet?",
    "Give me a fruit.",
    "What language is spoken in Brazil?",
    "Name an ocean.",
    "What is water made of?",
    "Who wrote Hamlet?",
]


def main():
    alone, alone_url = inferd_serve()
    worker("w1")
    worker("w2")
    rr_port, kv_port = free_port(), free_port()
    start("frontend-rr", [PY, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(rr_port),
                          "--router-mode", "round-robin", "--migration-limit", "3"])
    start("frontend-kv", [PY, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(kv_port),
                          "--router-mode", "kv"])
    rr, kv = f"http://127.0.0.1:{rr_port}", f"http://127.0.0.1:{kv_port}"
    wait_for("two registered workers", lambda: len(registered()) == 2)
    for base in (rr, kv):
        wait_for(f"{base} to list the model",
                 lambda: http(base, "GET", "/v1/models")[0] == 200 and MODEL in http(base, "GET", "/v1/models")[1])
    w1_url, w1_pid = worker_inferd("w1")
    w2_url, w2_pid = worker_inferd("w2")
    jobs = [([{"role": "user", "content": QUESTIONS[i % 10] + (" Briefly." if i >= 10 else "")}], i % 2 == 1)
            for i in range(40)]

    def same_text_as_inferd_alone():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            want = list(pool.map(lambda j: chat(alone_url, j[0], j[1]), jobs))
            got = list(pool.map(lambda j: chat(rr, j[0], j[1]), jobs))
        for (messages, stream), w, g in zip(jobs, want, got):
            assert w[0] == g[0], (messages, stream, w[0], g[0])
            assert w[1] == g[1], (messages, stream, w[1], g[1])
            assert w[2]["prompt_tokens"] == g[2]["prompt_tokens"], (w[2], g[2])
            assert w[2]["completion_tokens"] == g[2]["completion_tokens"], (w[2], g[2])
        assert served_by("w1") > 0 and served_by("w2") > 0, (served_by("w1"), served_by("w2"))

    def kv_routing_follows_the_prefix():
        long = ("You are the support assistant of the Acme rocket company. Answer in one short sentence. " * 12)
        before = {w: served_by(w) for w in ("w1", "w2")}
        hits_before = {w: metric(u, "inferd_prefix_cache_hits_total") for w, u in (("w1", w1_url), ("w2", w2_url))}
        cached = []
        for i in range(10):
            _, _, usage, _ = chat(kv, [{"role": "system", "content": long},
                                       {"role": "user", "content": f"Customer {i} asks: when is launch?"}], max_tokens=4)
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        took = {w: served_by(w) - before[w] for w in ("w1", "w2")}
        assert sorted(took.values()) == [0, 10], took
        busy = max(took, key=took.get)
        url = w1_url if busy == "w1" else w2_url
        hits = metric(url, "inferd_prefix_cache_hits_total") - hits_before[busy]
        assert all(c >= 16 * 10 for c in cached[1:]), cached
        assert hits >= 9 * 10, hits

    def cancel_frees_the_blocks():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}
        with socket.create_connection(("127.0.0.1", rr_port)) as s:
            data = json.dumps(body).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      + f"content-length: {len(data)}\r\n\r\n".encode() + data)
            got = b""
            while got.count(b"data: ") < 5:
                more = s.recv(4096)
                assert more, f"the stream ended early: {got!r}"
                got += more
            running = lambda: sum(metric(u, "inferd:num_requests_running") for u in (w1_url, w2_url))
            wait_for("the stream to run", lambda: running() >= 1, within=30)
        wait_for("the cancelled request to leave its worker",
                 lambda: running() == 0 and all(metric(u, "inferd:kv_cache_usage_perc") == 0 for u in (w1_url, w2_url)),
                 within=30)

    def options_carry_through():
        q = [{"role": "user", "content": "Tell me a story."}]
        for extra in ({"temperature": 0.9, "seed": 11, "top_p": 0.9, "top_k": 20, "max_tokens": 12},
                      {"temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 2},
                      {"temperature": 0, "max_tokens": 30, "stop_token_ids": [30]},
                      {"temperature": 0, "max_tokens": 7, "frequency_penalty": 1.0}):
            want = chat(alone_url, q, **extra)
            got = chat(rr, q, **extra)
            assert want[0] == got[0], (extra, want[0], got[0])
            assert want[1] == got[1], (extra, want[1], got[1])
            if "logprobs" in extra:
                w = [(t["token"], round(t["logprob"], 3), [a["token"] for a in t["top_logprobs"]])
                     for t in want[3]["content"]]
                g = [(t["token"], round(t["logprob"], 3), [a["token"] for a in t["top_logprobs"]])
                     for t in got[3]["content"]]
                assert w == g, (w, g)
        status, text = http(rr, "POST", "/v1/chat/completions",
                            {"model": MODEL, "messages": q, "max_tokens": 4, "n": 2, "temperature": 0.5})
        assert status == 400 and "one choice per request" in text, (status, text)

    def sigkill_mid_run():
        q = [[{"role": "user", "content": f"Count from {i} to {i + 40}."}] for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(chat, rr, m, False, max_tokens=48) for m in q]
            wait_for("w2 to be busy", lambda: metric(w2_url, "inferd:num_requests_running") >= 1, within=30)
            procs["w2"].send_signal(signal.SIGKILL)
            results = [f.result() for f in futures]
        # Every request finished, those cut on w2 resumed on w1 (greedy: the same text).
        want = [chat(alone_url, m, False, max_tokens=48) for m in q]
        assert [r[:2] for r in results] == [w[:2] for w in want], (results, want)
        wait_for("w2's engine to die with it", lambda: not os.path.exists(f"/proc/{w2_pid}"), within=10)
        # Discovery drops the dead worker (its lease runs out).
        wait_for("discovery to drop w2", lambda: len(registered()) == 1, within=60)
        # The run goes on: new requests reach the live worker.
        for m in q[:4]:
            assert chat(rr, m, max_tokens=4)[1] in ("length", "stop")

    def sigterm_leaves_then_drains():
        messages = [{"role": "user", "content": "Write a poem about the sea."}]
        result = {}
        t = threading.Thread(target=lambda: result.update(r=chat(rr, messages, True, max_tokens=400, ignore_eos=True)))
        t.start()
        wait_for("the stream to run", lambda: metric(w1_url, "inferd:num_requests_running") >= 1, within=30)
        procs["w1"].send_signal(signal.SIGTERM)
        # It leaves first (no new requests reach it), while its stream still runs.
        wait_for("w1 to leave discovery", lambda: not registered(), within=30)
        assert t.is_alive(), "the stream ended before the worker left discovery"
        t.join(120)
        text, finish, usage, _ = result["r"]
        assert finish == "length" and usage["completion_tokens"] == 400, (finish, usage)
        code = procs["w1"].wait(120)
        assert code == 0, code
        wait_for("w1's engine to stop", lambda: not os.path.exists(f"/proc/{w1_pid}"), within=30)

    def engine_death_takes_the_worker_out():
        worker("w3")
        wait_for("w3 to register", lambda: len(registered()) == 1)
        _, w3_pid = worker_inferd("w3")
        os.kill(w3_pid, signal.SIGKILL)
        code = procs["w3"].wait(120)
        assert code == 1, code
        wait_for("w3 to leave discovery", lambda: not registered(), within=60)

    checks = [("same text as inferd alone, both workers", same_text_as_inferd_alone),
              ("KV-aware routing follows the prefix", kv_routing_follows_the_prefix),
              ("a dropped stream frees the worker's blocks", cancel_frees_the_blocks),
              ("sampling options, stop ids, seeds, logprobs carry through", options_carry_through),
              ("SIGKILL mid-run: the run completes on the other worker", sigkill_mid_run),
              ("SIGTERM: unregisters, finishes its stream, exits 0", sigterm_leaves_then_drains),
              ("an engine that dies takes its worker out, exit 1", engine_death_takes_the_worker_out)]
    for name, fn in checks:
        check(name, fn)
    print(json.dumps({"dynamo": "1.6.1", "passed": len(checks)}))
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        for name in procs:
            print(f"===== {name} log (last 60 lines) =====", file=sys.stderr)
            print("\n".join(log_of(name).splitlines()[-60:]), file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
