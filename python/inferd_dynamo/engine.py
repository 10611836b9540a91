"""The Dynamo engine class over an inferd child process (see ``__init__``)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any, AsyncGenerator, Optional

import aiohttp

from dynamo.common.backend import EngineConfig, LLMEngine, WorkerConfig
from dynamo.common.backend.engine import LlmRegistration
from dynamo.common.backend.publisher import ComponentSnapshot, PushSource
from dynamo.common.backend.run import run
from dynamo.llm.exceptions import EngineShutdown, InvalidArgument, Unknown

logger = logging.getLogger("inferd_dynamo")

# Set when the inferd child died under us: the worker then exits non-zero.
_child_failed = False

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent (this worker) dies, so a
    worker killed with SIGKILL leaves no engine behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, extra = (argv, [])
    if "--" in argv:
        i = argv.index("--")
        ours, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="inferd-dynamo",
        description="Serve a model with inferd as a worker of an NVIDIA Dynamo deployment. "
        "Arguments after `--` go to `inferd serve` (e.g. -- --num-blocks 512 --dtype bf16).",
    )
    env = os.environ.get
    p.add_argument("--model", required=True, help="ORG/NAME[@REV] (Hugging Face cache) or a model folder")
    p.add_argument(
        "--served-model-name",
        help="the name clients use (default: the model as given)",
    )
    p.add_argument(
        "--inferd",
        default=env("INFERD_BIN") or shutil.which("inferd") or "inferd",
        help="the inferd binary (default: $INFERD_BIN, else `inferd` on PATH)",
    )
    p.add_argument("--namespace", default=env("DYN_NAMESPACE", "dynamo"))
    p.add_argument("--component", default="inferd")
    p.add_argument("--endpoint", default="generate")
    p.add_argument(
        "--discovery-backend",
        default=env("DYN_DISCOVERY_BACKEND", "etcd"),
        help="etcd, kubernetes, file (DYN_FILE_KV names its folder) or mem",
    )
    p.add_argument("--request-plane", default=env("DYN_REQUEST_PLANE", "tcp"))
    p.add_argument("--event-plane", default=env("DYN_EVENT_PLANE"))
    p.add_argument(
        "--disable-kv-routing",
        action="store_true",
        help="publish no KV events or load metrics (the router then balances blind)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds a stopping worker waits for its streams to finish (Dynamo's own grace "
        "period, DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS, is a fixed wait before this)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds inferd may take to load the model",
    )
    args = p.parse_args(ours)
    if not args.served_model_name:
        args.served_model_name = args.model
    return args, extra


class InferdEngine(LLMEngine):
    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args = args
        self.extra = extra
        self.proc: Optional[subprocess.Popen] = None
        self.base: Optional[str] = None
        self.session: Optional[aiohttp.ClientSession] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.tasks: list[asyncio.Future] = []
        self.stopping = False
        self.snapshots: Any = None
        self.responses: dict[str, aiohttp.ClientResponse] = {}
        self.aborted: set[str] = set()
        self.in_flight = 0

    @classmethod
    async def from_args(cls, argv: list[str] | None = None):
        args, extra = _parse(sys.argv[1:] if argv is None else argv)
        worker = WorkerConfig(
            namespace=args.namespace,
            component=args.component,
            endpoint=args.endpoint,
            model_name=args.served_model_name,
            served_model_name=args.served_model_name,
            discovery_backend=args.discovery_backend,
            request_plane=args.request_plane,
            event_plane=args.event_plane,
            enable_kv_routing=not args.disable_kv_routing,
        )
        return cls(args, extra), worker

    # -- life ------------------------------------------------------------------------

    async def start(self, worker_id: int) -> EngineConfig:
        del worker_id
        self.loop = asyncio.get_running_loop()
        command = [
            self.args.inferd,
            "serve",
            self.args.model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--served-model-name",
            self.args.served_model_name,
            *self.extra,
        ]
        logger.info("starting %s", " ".join(command))
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
            # Its own session: a Ctrl-C at the terminal reaches this worker (which leaves
            # the deployment and drains first), not inferd directly.
            start_new_session=True,
        )
        address: asyncio.Future = self.loop.create_future()
        threading.Thread(target=self._relay_stderr, args=(address,), daemon=True, name="inferd-stderr").start()
        try:
            self.base = await asyncio.wait_for(address, self.args.start_timeout)
        except asyncio.TimeoutError:
            raise EngineShutdown(f"inferd did not start within {self.args.start_timeout} s")
        # Unlimited connections: one per request in flight.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        info = await self._worker_info()
        self.tasks.append(self.loop.create_task(self._watch_child()))
        logger.info("inferd serves %s at %s: %s", self.args.served_model_name, self.base, info)
        return EngineConfig(
            # The folder: the frontend reads the tokenizer and chat template from it.
            model=info["folder"],
            served_model_name=self.args.served_model_name,
            llm=LlmRegistration(
                context_length=info["context_length"],
                kv_cache_block_size=info["kv_cache_block_size"],
                total_kv_blocks=info["total_kv_blocks"],
                max_num_seqs=info["max_num_seqs"],
                max_num_batched_tokens=info["max_num_batched_tokens"],
            ),
        )

    def _relay_stderr(self, address: asyncio.Future) -> None:
        """Copies inferd's log to ours, and reads its address from its start line."""
        assert self.proc is not None and self.proc.stderr is not None and self.loop is not None
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace")
            sys.stderr.write(text)
            marker = text.find(" on http://")
            if text.startswith("inferd: serving ") and marker >= 0 and not address.done():
                url = text[marker + 4 :].strip()
                self.loop.call_soon_threadsafe(lambda u=url: address.done() or address.set_result(u))
        self.loop.call_soon_threadsafe(
            lambda: address.done() or address.set_exception(EngineShutdown("inferd exited before it served"))
        )

    async def _watch_child(self) -> None:
        """A child that dies takes this worker out of the deployment."""
        global _child_failed
        assert self.proc is not None
        code = await asyncio.to_thread(self.proc.wait)
        if not self.stopping:
            _child_failed = True
            logger.error("inferd exited (status %s): leaving the deployment", code)
            os.kill(os.getpid(), signal.SIGTERM)

    async def cleanup(self) -> None:
        # Dynamo has taken this worker out of discovery and waited its grace period;
        # streams still running finish first (up to --drain-timeout), then inferd
        # stops (it drains what is left on SIGTERM itself), then the connections close.
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + self.args.drain_timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.in_flight:
            logger.warning("stopping with %d streams still running", self.in_flight)
        for task in self.tasks:
            task.cancel()
        # Publishing stops before cleanup returns (Dynamo's PushSource contract).
        waits = [t if isinstance(t, asyncio.Future) else asyncio.wrap_future(t) for t in self.tasks]
        await asyncio.gather(*waits, return_exceptions=True)
        self.tasks.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _worker_info(self) -> dict[str, Any]:
        assert self.session is not None
        async with self.session.get(f"{self.base}/inferd/v1/worker") as r:
            if r.status != 200:
                raise EngineShutdown(f"inferd /inferd/v1/worker: {r.status} {await r.text()}")
            return await r.json()

    # -- requests --------------------------------------------------------------------

    async def generate(self, request: dict, context) -> AsyncGenerator[dict, None]:
        if self.session is None:
            raise EngineShutdown("the worker is stopping")
        n = (request.get("sampling_options") or {}).get("n") or 1
        if n > 1:
            # Dynamo's token pipeline (1.6.1) ends a stream at its first finished
            # choice, so the others would come back cut short: refused, not mangled.
            raise InvalidArgument(
                f"n={n}: this deployment returns one choice per request; send {n} requests"
            )
        body = json.dumps(request, default=str)
        key = context.id()
        self.in_flight += 1
        try:
            async for chunk in self._stream(body, key):
                yield chunk
        finally:
            self.in_flight -= 1

    async def _stream(self, body: str, key: str) -> AsyncGenerator[dict, None]:
        assert self.session is not None
        async with self.session.post(
            f"{self.base}/inferd/v1/generate",
            data=body,
            headers={"content-type": "application/json"},
        ) as r:
            if r.status != 200:
                text = await r.text()
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text
                if 400 <= r.status < 500:
                    raise InvalidArgument(message)
                raise Unknown(f"inferd answered {r.status}: {message}")
            self.responses[key] = r
            try:
                async for line in r.content:
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:
                        raise Unknown(chunk["error"].get("message", "inferd failed"))
                    yield chunk
            except aiohttp.ClientError as e:
                if key in self.aborted:
                    return  # cancelled: abort() closed the connection
                raise EngineShutdown(f"the stream from inferd broke: {e}") from e
            finally:
                self.responses.pop(key, None)
                self.aborted.discard(key)

    async def abort(self, context) -> None:
        # Closing the connection cancels the request in inferd and frees its blocks.
        key = context.id()
        r = self.responses.pop(key, None)
        if r is not None:
            self.aborted.add(key)
            r.close()

    # -- KV-aware routing --------------------------------------------------------------

    async def kv_event_sources(self):
        return [PushSource(on_ready=self._on_kv_publisher, dp_rank=0)]

    def _on_kv_publisher(self, publisher) -> None:
        self._background(self._relay_kv_events(publisher), "KV event relay")

    def _background(self, coroutine, what: str) -> None:
        """Runs `coroutine` on the engine's loop (from any thread); a failure is logged,
        never lost."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)

        def done(f) -> None:
            if not f.cancelled() and f.exception() is not None and not self.stopping:
                logger.error("%s failed: %r", what, f.exception())

        future.add_done_callback(done)
        self.tasks.append(future)

    async def _relay_kv_events(self, publisher) -> None:
        """inferd's prefix-cache events, into Dynamo's KV publisher. If the stream
        breaks, what the router was told is taken back and the stream reopened (its
        first events are the cache's whole contents again)."""
        known: set[int] = set()
        while not self.stopping:
            try:
                assert self.session is not None
                async with self.session.get(f"{self.base}/inferd/v1/kv_events") as r:
                    async for line in r.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind = event.get("type")
                        if kind == "stored":
                            publisher.publish_stored(
                                token_ids=event["token_ids"],
                                num_block_tokens=event["num_block_tokens"],
                                block_hashes=event["block_hashes"],
                                parent_hash=event["parent_hash"],
                            )
                            known.update(event["block_hashes"])
                        elif kind == "removed":
                            publisher.publish_removed(block_hashes=event["block_hashes"])
                            known.difference_update(event["block_hashes"])
                        elif kind == "cleared" and known:
                            publisher.publish_removed(block_hashes=sorted(known))
                            known.clear()
            except (aiohttp.ClientError, ValueError, KeyError) as e:
                logger.warning("KV events from inferd: %r; reopening", e)
            if known and not self.stopping:
                publisher.publish_removed(block_hashes=sorted(known))
                known.clear()
            await asyncio.sleep(1.0)

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher) -> None:
        self.snapshots = publisher
        self._background(self._publish_load(), "load snapshots")

    async def _publish_load(self) -> None:
        """The worker's load, for the router's cost function (4 times a second)."""
        while not self.stopping:
            try:
                info = await self._worker_info()
                total = max(1, info["total_kv_blocks"])
                queries = info["prefix_cache_queries"]
                self.snapshots.publish(
                    0,
                    ComponentSnapshot(
                        kv_used_blocks=info["kv_blocks_used"],
                        kv_total_blocks=info["total_kv_blocks"],
                        gpu_cache_usage=info["kv_blocks_used"] / total,
                        kv_cache_hit_rate=(info["prefix_cache_hits"] / queries) if queries else None,
                        dp_rank=0,
                    ),
                )
            except (aiohttp.ClientError, KeyError, ValueError) as e:
                logger.debug("load snapshot skipped: %s", e)
            await asyncio.sleep(0.25)


def main() -> None:
    run(InferdEngine)
    if _child_failed:
        sys.exit(1)
