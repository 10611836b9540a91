"""inferd as a worker of NVIDIA Dynamo.

One command per worker (``inferd-dynamo --model ORG/NAME``): it starts ``inferd serve``
on a loopback port as its child and registers it with the Dynamo deployment through
Dynamo's Python backend contract (``dynamo.common.backend.LLMEngine``). The Dynamo
frontend does HTTP, the chat template, tokenization, detokenization and stop strings;
inferd's engine does the rest (continuous batching, paged KV cache with prefix
caching, its sampler) behind two routes:

- ``POST /inferd/v1/generate``: Dynamo's token request as it is, token chunks back
  (newline-delimited JSON), so the mapping of Dynamo's fields lives in one place, in
  inferd (``src/api/tokens.rs``), and this file only carries bytes;
- ``GET /inferd/v1/kv_events``: the engine's prefix-cache events, which this worker
  hands to Dynamo's KV publisher so that the KV router sends a request to the worker
  that holds its prefix.

Life: the child dies with this process (``PR_SET_PDEATHSIG``); if the child dies, this
process leaves the deployment and exits non-zero. SIGTERM is the Dynamo runtime's:
it unregisters the worker, lets its streams finish, then calls ``cleanup``, which
stops inferd.
"""

from .engine import InferdEngine, main

__all__ = ["InferdEngine", "main"]
