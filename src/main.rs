//! The `inferd` command line: serve | chat | download | bench | generate.
//!
//! Over 800 lines, on purpose: most of it is the commands' flags (clap derive structs,
//! one documented field per flag, which is what `--help` prints), kept beside the short
//! entry function of each command so that a flag and its use read together. The work
//! itself lives in the library (`server`, `manager`, `bench`, `chat`).

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use inferd::backend::{Device, DeviceChoice, WeightDtype};
use inferd::engine::{EngineConfig, KvCacheBudget, SamplingParams};
use inferd::loader::resolve_model;
use inferd::log::Level;
use inferd::manager::{kv_budget_on, load_model, ModelFiles, ModelManager, ModelSettings, ReasoningMode};
use inferd::server::store::{ResponseStore, Retention, StoreUrl};
use inferd::server::{self, ServerOptions, ServerState};
use inferd::text::{ChatInput, IncrementalDetokenizer, StopMatcher, Tokenizer};
use inferd::units::parse_duration;

#[derive(Parser)]
#[command(
    name = "inferd",
    version,
    about = "OpenAI-compatible inference server for Llama, Qwen2 and Qwen3 models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the OpenAI-compatible HTTP server.
    Serve(Box<ServeArgs>),
    /// Chat with a model in the terminal, through an OpenAI-compatible server (a local
    /// `inferd serve` unless --url is given).
    Chat(ChatArgs),
    /// Download a model from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN) into the local
    /// cache (HF_HUB_CACHE, HF_HOME): only the files inferd needs; interrupted files resume.
    Download {
        /// `org/name[@revision]`
        model: String,
    },
    /// Benchmark an OpenAI-compatible server's throughput and latency.
    Bench(Box<BenchArgs>),
    /// Generate a reply locally (greedy), as a quick check that a model works.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The model to serve (`org/name[@revision]` or a folder); same as --force-model.
    /// Without one, models load on demand: the first request naming a model loads it.
    model: Option<String>,
    /// Load this model at start-up and serve every request with it, whatever model
    /// the request names (it is never unloaded).
    #[arg(long)]
    force_model: Option<String>,
    /// The names the served model answers to (one or more, as vLLM takes them): requests
    /// naming another model get 404, responses and /v1/models give these names.
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Unload a model after this many seconds without requests (0 or less: never).
    #[arg(long, default_value_t = 300, allow_negative_numbers = true)]
    model_timeout: i64,
    /// Keep the checkpoints of all loaded models under this many bytes: loading one
    /// more unloads the least recently used idle ones (default: only available memory
    /// limits it).
    #[arg(long)]
    models_memory: Option<u64>,
    /// `auto` (the checkpoint) or `dummy`: seeded random weights from config.json
    /// alone, for benchmarking model shapes whose weights are not at hand (replies are
    /// noise).
    #[arg(long, default_value = "auto", value_parser = ["auto", "dummy"])]
    load_format: String,
    /// Where the Responses API keeps what it stores (for `previous_response_id` and
    /// `GET /v1/responses/{id}`): `sqlite:PATH` (default: responses.sqlite3 in
    /// ~/.cache/inferd; `?synchronous=full` to wait for the disk on each commit),
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DB` (shared by replicas; no TLS), or
    /// `memory` (lost on restart). See docs/reliability.md.
    #[arg(long)]
    responses_store: Option<String>,
    /// Most stored responses, the oldest removed first (0 stores none). Default: 1024
    /// with `memory`, no count cap with a database (the byte cap applies).
    #[arg(long)]
    responses_store_size: Option<u64>,
    /// Most stored JSON (responses, input items, conversations), in MiB; the oldest go
    /// first.
    #[arg(long, default_value_t = 1024)]
    responses_store_max_mib: u64,
    /// How long stored responses are kept: seconds, or with a unit (500ms, 90s, 15m, 12h,
    /// 30d).
    #[arg(long, default_value = "30d")]
    responses_ttl: String,
    /// How often the store's sweep removes what is past its time to live or over a cap.
    #[arg(long, default_value = "60s")]
    responses_sweep_every: String,
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (or INFERD_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Answer CORS preflights and allow any origin.
    #[arg(long)]
    enable_cors: bool,
    /// Accepted for compatibility with transformers serve: batching is always continuous
    /// (with a paged KV cache), with or without this flag.
    #[arg(long)]
    continuous_batching: bool,
    /// How weights are kept: auto (as stored; bf16 stays bf16, f16 and f32 become f32),
    /// bfloat16 or float32 (torch names such as `torch.bfloat16` are accepted). On a GPU
    /// the KV cache is bf16 unless this is float32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Where the model runs: auto, cpu, or cuda[:N] (a build with `--features cuda`).
    #[arg(long, default_value = "auto")]
    device: String,
    /// error, warning, info (the default: one access-log line per request) or debug.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// transformers serve's --cb-use-cuda-graph: CUDA graphs for decode steps. The CPU
    /// backend has none; saying `true` there is refused.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    cb_use_cuda_graph: Option<bool>,
    /// Async scheduling: the forward pass runs on a thread of its own while the engine
    /// plans the next step and sends the last one's tokens (a stop is seen a step late;
    /// its extra token is dropped). Steps whose sampling needs the logits on the host
    /// (penalties, top-k/top-p/min-p, logprobs, grammars) still wait for their outputs.
    /// Default: on for the CPU; off on CUDA until the GPU suite has run with it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    async_scheduling: Option<bool>,
    #[command(flatten)]
    torch_only: TorchOnlyArgs,
    /// Largest JSON request body, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Largest transcription upload (the multipart body), in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_audio_bytes: usize,
    /// Longest audio a transcription may send, in seconds.
    #[arg(long, default_value_t = 1800.0)]
    max_audio_seconds: f64,
    /// Most images one chat request may carry.
    #[arg(long, default_value_t = 8)]
    max_images_per_request: usize,
    /// Largest image decoded, in pixels (width × height, read from the file's header
    /// before decoding).
    #[arg(long, default_value_t = 50_000_000)]
    max_image_pixels: u64,
    /// Largest image accepted, in bytes (fetched or in a data: URL).
    #[arg(long, default_value_t = 20 << 20)]
    max_image_bytes: u64,
    /// Preprocessed image data all requests in flight may hold, in bytes (4704 bytes per
    /// 14×14 patch: a 1000-token image takes 18 MiB); past it requests get 503.
    #[arg(long, default_value_t = 4 << 30)]
    max_image_memory: u64,
    /// Deadline for fetching one image URL (lookup, connection, redirects, body).
    #[arg(long, default_value_t = 10)]
    image_fetch_timeout_secs: u64,
    /// Never fetch http(s) image URLs: images come as data: URLs only.
    #[arg(long)]
    no_remote_images: bool,
    /// Allow image URLs on loopback, private and other non-global addresses (refused by
    /// default: a client could otherwise make the server reach internal services).
    #[arg(long)]
    allow_private_image_urls: bool,
    /// Seed for requests that do not send one (reproducible runs).
    #[arg(long)]
    default_seed: Option<u64>,
    /// Split `<think>` reasoning into `reasoning_content`: on, off, or auto (when the
    /// model's chat template uses `<think>`).
    #[arg(long, default_value = "auto", value_parser = ["on", "off", "auto"])]
    reasoning: String,
    /// Extra chat template variables for every request, as a JSON object.
    #[arg(long)]
    chat_template_kwargs: Option<String>,
    /// On a GPU: the share of its memory inferd may fill (weights, KV cache and
    /// activations), in (0, 1]; the KV cache gets what the weights leave. The CPU
    /// backend sizes its cache by --kv-cache-memory or --kv-cache-fraction instead.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Tokens per KV block.
    #[arg(long, alias = "cb-block-size", default_value_t = 16)]
    block_size: usize,
    /// KV blocks in the pool (default: from --kv-cache-memory or --kv-cache-fraction).
    #[arg(long, alias = "cb-num-blocks")]
    num_blocks: Option<usize>,
    /// KV cache size in bytes.
    #[arg(long)]
    kv_cache_memory: Option<usize>,
    /// KV cache size as a fraction of the memory available at start-up, in (0, 1]
    /// (transformers serve's --cb-max-memory-percent, also a fraction, is the same).
    #[arg(long, alias = "cb-max-memory-percent", default_value_t = 0.25)]
    kv_cache_fraction: f64,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 128)]
    max_num_seqs: usize,
    /// Most tokens computed in one step (the chunked-prefill budget).
    #[arg(long, alias = "cb-max-batch-tokens", default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Requests that may wait before new ones get 503.
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Seconds a client may send nothing while its request (head or body) is
    /// incomplete (then 408, or the connection closes); idle keep-alive connections
    /// close after as long.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    read_timeout_secs: u64,
    /// Seconds a client may accept no data of a reply being written to it (a stream it
    /// stopped reading): then its connection closes and its request is cancelled.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    write_timeout_secs: u64,
}

/// Flags of transformers serve that configure torch; accepted only to refuse them with a
/// reason (hidden from --help). Their `--no-…` forms ask for what inferd does anyway.
#[derive(clap::Args)]
struct TorchOnlyArgs {
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    attn_implementation: Option<String>,
    #[arg(long, hide = true)]
    compile: bool,
    #[arg(long, hide = true)]
    no_compile: bool,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    quantization: Option<String>,
    #[arg(long, hide = true)]
    trust_remote_code: bool,
    #[arg(long, hide = true)]
    no_trust_remote_code: bool,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    decision_config: Option<String>,
    #[arg(long, hide = true)]
    non_blocking: bool,
}

impl TorchOnlyArgs {
    fn refuse(&self) -> Result<(), String> {
        let why = if self.attn_implementation.is_some() {
            "--attn-implementation: inferd has one attention implementation per backend (paged attention over its KV cache)"
        } else if self.compile {
            "--compile: inferd's kernels are compiled ahead of time; there is no torch.compile step"
        } else if self.quantization.is_some() {
            "--quantization: bitsandbytes quantization is not supported; choose the weight precision with --dtype"
        } else if self.trust_remote_code {
            "--trust-remote-code: inferd never runs code from a model repository; it serves its built-in architectures (Llama, Qwen2, Qwen3)"
        } else if self.decision_config.is_some() {
            "--decision-config: it configures /v1/systemone, which inferd does not serve"
        } else if self.non_blocking {
            "--non-blocking: a transformers test hook; run inferd in the background instead"
        } else {
            return Ok(());
        };
        Err(format!("unsupported transformers serve option {why}"))
    }
}

#[derive(clap::Args)]
struct ChatArgs {
    /// `org/name[@revision]` (default: the server's loaded model).
    model: Option<String>,
    /// A running OpenAI-compatible server (default: start `inferd serve` here).
    #[arg(long)]
    url: Option<String>,
    /// Sent as `Authorization: Bearer KEY` (or INFERD_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A server's base URL (http only); repeat it to run the same workload against each
    /// server in turn, side by side (named by host:port). Default http://127.0.0.1:8000.
    #[arg(long)]
    url: Vec<String>,
    /// A named server, `NAME=URL` (repeatable, after any --url).
    #[arg(long)]
    target: Vec<String>,
    /// The model named in requests; its tokenizer, when in the local cache, makes the
    /// random prompts and counts prompt tokens (else words are counted).
    #[arg(long)]
    model: String,
    /// `completions` (prompt as given, the default) or `chat` (prompt as one user message).
    #[arg(long, value_parser = ["chat", "completions"])]
    endpoint: Option<String>,
    /// Most requests in flight; a comma-separated list runs once per value, in
    /// increasing order (default 1).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Requests arriving at this many per second; a comma-separated list runs once per
    /// rate, in increasing order (`inf`: every request at once). In-flight requests are
    /// capped by --max-concurrency.
    #[arg(long, value_delimiter = ',')]
    request_rate: Vec<f64>,
    /// A sweep of N runs (default 10): one request at a time, every request at once, and
    /// N-2 request rates evenly spaced between the two; reports the knee, the highest load
    /// before median latency leaves its floor.
    #[arg(long, num_args = 0..=1, default_missing_value = "10")]
    sweep: Option<usize>,
    /// Most requests in flight in rate, sweep and all-at-once runs (default: no limit).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// How requests arrive at a rate: `poisson` (exponential gaps, the default) or
    /// `constant`.
    #[arg(long, value_parser = ["poisson", "constant"])]
    arrival: Option<String>,
    /// Requests per run (default: --requests-per-client x concurrency, at least 16, for
    /// concurrency runs; 64 for rate and sweep runs).
    #[arg(long)]
    num_requests: Option<usize>,
    /// Requests per concurrent client in each run, when --num-requests is not given.
    #[arg(long, default_value_t = 8)]
    requests_per_client: usize,
    /// Where prompts come from: `random` tokens, `prompts` (a text file, one per line),
    /// `sharegpt` (a JSON file of conversations; replies' lengths become max_tokens), or
    /// `prefix` (--num-prefixes system prompts of --prefix-len tokens shared by all requests).
    #[arg(long, default_value = "random", value_parser = ["random", "prompts", "sharegpt", "prefix"])]
    dataset: String,
    /// The file of `--dataset prompts` or `--dataset sharegpt`.
    #[arg(long)]
    dataset_path: Option<std::path::PathBuf>,
    /// Prompts, one per line, used in turn (same as --dataset prompts --dataset-path).
    #[arg(long)]
    prompt_file: Option<std::path::PathBuf>,
    /// `--dataset prefix`: how many shared system prompts (default 4).
    #[arg(long)]
    num_prefixes: Option<usize>,
    /// `--dataset prefix`: each shared system prompt's length in tokens (default 256).
    #[arg(long)]
    prefix_len: Option<usize>,
    /// Prompt length in tokens (random prompts, and the question after a shared prefix).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Reply length in tokens (`max_tokens`, with `ignore_eos`); default 128, and for
    /// ShareGPT each conversation's own reply length unless given.
    #[arg(long)]
    output_len: Option<usize>,
    /// Draw each length uniformly within +-this fraction of the given one.
    #[arg(long, default_value_t = 0.0)]
    range_ratio: f64,
    /// Latency targets for goodput, e.g. `ttft=200ms,itl=50ms` (also tpot, latency;
    /// `ttft:p99=1s` judges the run by another percentile than p90). With --no-stream
    /// only ttft and latency (the same there) can be measured.
    #[arg(long)]
    slo: Option<String>,
    /// Requests sent before each run and not counted.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Ask for whole replies instead of server-sent events.
    #[arg(long)]
    no_stream: bool,
    /// Do not send `ignore_eos` (for servers that refuse it; replies may end early).
    #[arg(long)]
    no_ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: the smallest set of likeliest tokens holding this much of the
    /// probability (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sample among the k likeliest tokens (sent to servers as vLLM's `top_k`).
    #[arg(long)]
    top_k: Option<usize>,
    /// Sent as `Authorization: Bearer KEY` (or INFERD_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Also write the session to this file as JSON (schema in docs/bench.md).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Also write one self-contained HTML report (tables and plots) to this file.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// No progress on stderr (by default: redrawn in place on a terminal, else a line
    /// every --progress-every seconds at most).
    #[arg(long)]
    quiet: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 10.0)]
    progress_every: f64,
    /// Also draw the plots into this folder, as SVG and PNG (throughput, latency against
    /// load, and TTFT, ITL and latency distributions).
    #[arg(long)]
    plots: Option<std::path::PathBuf>,
    /// Drive an engine in this process instead of a server (no HTTP): the model loads
    /// here and prompts are random token ids of exactly --input-len.
    #[arg(long)]
    offline: bool,
    /// With --offline: `dummy` makes seeded random weights from config.json alone.
    #[arg(long, default_value = "auto", value_parser = ["auto", "dummy"])]
    load_format: String,
    /// With --offline or --kernels: weights as stored (auto), bfloat16 or float32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// With --offline: the engine's step token budget.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// With --offline: KV cache as a fraction of available memory (on the CPU).
    #[arg(long, default_value_t = 0.25)]
    kv_cache_fraction: f64,
    /// With --offline or --kernels: where the engine runs (auto, cpu, or cuda[:N]).
    #[arg(long, default_value = "auto")]
    device: String,
    /// With --offline on a GPU: the share of its memory to fill, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// With --offline: async scheduling on or off (as `inferd serve --async-scheduling`;
    /// the same default).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    async_scheduling: Option<bool>,
    /// With --offline: after each run, print where the steps' time went (the engine
    /// thread's planning, waiting and output processing, and the forward passes).
    #[arg(long)]
    profile: bool,
    /// Time each kernel family of a decoder step in --model's shapes (its config.json)
    /// on --device, against the backend's streaming bandwidth (`x += y`): per-token kernels over
    /// --max-num-batched-tokens rows, decode kernels at each --concurrency (default
    /// 1,16,64) over --input-len tokens of context.
    #[arg(long)]
    kernels: bool,
}

/// `inferd bench --kernels`.
fn bench_kernels(args: &BenchArgs) -> Result<(), Box<dyn Error>> {
    use inferd::bench::kernels::{self, KernelBench};
    if args.offline || !args.url.is_empty() || !args.target.is_empty() {
        return Err("--kernels times this machine's kernels: leave out --offline, --url and --target".into());
    }
    if args.json.is_some() || args.report.is_some() || args.plots.is_some() {
        return Err("--kernels prints a table: --json, --report and --plots are for serving runs".into());
    }
    if args.concurrency.contains(&0) || args.max_num_batched_tokens == 0 || args.input_len == 0 {
        return Err("--kernels needs --concurrency, --max-num-batched-tokens and --input-len of at least 1".into());
    }
    let weights = WeightDtype::parse(&args.dtype)?;
    let device = Device::open(&DeviceChoice::parse(&args.device)?, weights, &mut |note| {
        eprintln!("{note}")
    })?;
    let dir = resolve_model(&args.model)?;
    let mut spec = KernelBench::from_dir(&dir.path, weights)?;
    spec.tokens = args.max_num_batched_tokens;
    spec.context = args.input_len;
    if !args.concurrency.is_empty() {
        spec.batches = args.concurrency.clone();
    }
    eprintln!(
        "bench --kernels: {} shapes on {} ({} weights)",
        args.model,
        device.describe(),
        if spec.weight_bytes == 4 { "f32" } else { "bf16" }
    );
    // Where the engine runs a step's ops (on the CPU, a worker of the pool).
    let timings = match &device {
        Device::Cpu(b) => {
            <inferd::backend::cpu::CpuBackend as inferd::backend::Backend>::run_step(|| kernels::run(b, &spec))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(b) => {
            <inferd::backend::cuda::CudaBackend as inferd::backend::Backend>::run_step(|| kernels::run(b, &spec))
        }
    };
    print!("{}", kernels::table(&timings));
    Ok(())
}

/// Whether engines on `device` schedule asynchronously unless told: on the CPU, where
/// the test suite runs every engine case both ways; not on CUDA until the GPU suite has
/// passed with it on a device.
fn async_scheduling_default(device: &Device) -> bool {
    match device {
        Device::Cpu(_) => true,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => false,
    }
}

fn bench(args: BenchArgs) -> Result<(), Box<dyn Error>> {
    if args.kernels {
        return bench_kernels(&args);
    }
    use inferd::bench::session::{self, Context, Driver, Plan, SessionOptions};
    use inferd::bench::slo::Metric;
    use inferd::bench::{self, Arrival, Dataset, Endpoint, HttpSettings, Load, ProgressMode, Slo, WorkloadSpec};
    let plan = match (args.sweep, args.request_rate.is_empty(), args.concurrency.is_empty()) {
        (Some(_), false, _) | (Some(_), _, false) => {
            return Err("--sweep chooses its own loads: leave out --concurrency and --request-rate".into())
        }
        (Some(points), ..) if points < 2 => return Err("--sweep needs at least 2 runs".into()),
        (Some(points), ..) => Plan::Sweep { points },
        (None, false, false) => {
            return Err("--request-rate and --concurrency are two kinds of load: cap a rate's in-flight requests with --max-concurrency".into())
        }
        (None, false, true) => {
            if args.request_rate.iter().any(|r| r.is_nan() || *r <= 0.0) {
                return Err("--request-rate must be positive numbers (or inf)".into());
            }
            // In increasing load (the knee reads them in order), each once.
            let mut rates: Vec<f64> = args.request_rate.iter().copied().filter(|r| r.is_finite()).collect();
            rates.sort_by(f64::total_cmp);
            rates.dedup();
            let mut loads: Vec<Load> = rates.into_iter().map(Load::Rate).collect();
            if args.request_rate.iter().any(|r| r.is_infinite()) {
                loads.push(Load::Throughput);
            }
            Plan::Loads(loads)
        }
        (None, true, _) => {
            let mut list = if args.concurrency.is_empty() {
                vec![1]
            } else {
                args.concurrency.clone()
            };
            if list.contains(&0) {
                return Err("--concurrency must be at least 1".into());
            }
            list.sort_unstable();
            list.dedup();
            Plan::Loads(list.into_iter().map(Load::Concurrency).collect())
        }
    };
    let concurrency_only = matches!(&plan, Plan::Loads(l) if l.iter().all(|l| matches!(l, Load::Concurrency(_))));
    if concurrency_only && (args.max_concurrency.is_some() || args.arrival.is_some()) {
        return Err("--max-concurrency and --arrival shape rate runs (--request-rate, --sweep); --concurrency runs send each request as one ends".into());
    }
    if args.max_concurrency == Some(0) {
        return Err("--max-concurrency must be at least 1".into());
    }
    if !(0.0..1.0).contains(&args.range_ratio) {
        return Err("--range-ratio must be in [0, 1)".into());
    }
    if args.input_len == 0 || args.output_len == Some(0) {
        return Err("--input-len and --output-len must be at least 1".into());
    }
    if !(args.progress_every > 0.0 && args.progress_every < 1e6) {
        return Err("--progress-every must be a positive number of seconds".into());
    }
    if args.num_requests == Some(0) {
        return Err("--num-requests must be at least 1".into());
    }
    if args.offline && (args.no_stream || args.endpoint.is_some() || args.api_key.is_some() || args.no_ignore_eos) {
        return Err("--offline drives an engine here, streamed with ignore_eos: --no-stream, --endpoint, --api-key and --no-ignore-eos are for servers".into());
    }
    if !args.offline && (args.profile || args.async_scheduling.is_some()) {
        return Err("--profile and --async-scheduling are for --offline (a server has its own flags)".into());
    }
    let sampling = inferd::bench::BenchSampling::new(args.temperature, args.top_p, args.top_k)?;
    let slo = match &args.slo {
        Some(text) => Slo::parse(text)?,
        None => Slo::default(),
    };
    if args.no_stream {
        if let Some(t) = slo
            .targets
            .iter()
            .find(|t| matches!(t.metric, Metric::Itl | Metric::Tpot))
        {
            return Err(format!(
                "--slo {}: whole replies (--no-stream) have no time between tokens to measure",
                t.metric.name()
            )
            .into());
        }
    }
    let read = |path: &std::path::Path| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    if args.prompt_file.is_some() && (args.dataset_path.is_some() || args.dataset != "random") {
        return Err("--prompt-file is --dataset prompts --dataset-path FILE: give one or the other".into());
    }
    let dataset_path = args.dataset_path.as_ref().or(args.prompt_file.as_ref());
    let dataset_name = if args.prompt_file.is_some() {
        "prompts"
    } else {
        args.dataset.as_str()
    };
    if dataset_name != "prefix" && (args.num_prefixes.is_some() || args.prefix_len.is_some()) {
        return Err("--num-prefixes and --prefix-len shape --dataset prefix".into());
    }
    let dataset = match (dataset_name, dataset_path) {
        ("random" | "prefix", Some(_)) => {
            return Err(format!("--dataset {dataset_name} makes its prompts: leave out --dataset-path").into())
        }
        ("random", None) => Dataset::Random,
        ("prefix", None) => {
            let (num_prefixes, prefix_len) = (args.num_prefixes.unwrap_or(4), args.prefix_len.unwrap_or(256));
            if num_prefixes == 0 || prefix_len == 0 {
                return Err("--num-prefixes and --prefix-len must be at least 1".into());
            }
            Dataset::Prefix {
                num_prefixes,
                prefix_len,
            }
        }
        ("prompts", Some(path)) => {
            Dataset::prompts_file(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?
        }
        ("sharegpt", Some(path)) => Dataset::sharegpt(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?,
        (name, None) => return Err(format!("--dataset {name} needs --dataset-path").into()),
        (name, Some(_)) => return Err(format!("unknown dataset {name}").into()),
    };
    if args.offline && matches!(dataset, Dataset::ShareGpt(_) | Dataset::Prompts(_)) {
        return Err("--offline sends random token ids: use --dataset random or prefix".into());
    }
    let workload = WorkloadSpec {
        dataset,
        input_len: args.input_len,
        output_len: args.output_len.unwrap_or(128),
        fixed_output_len: args.output_len.is_some(),
        range_ratio: args.range_ratio,
    };
    // The tokenizer is optional: any server can be benchmarked from anywhere.
    let tokenizer = resolve_model(&args.model)
        .ok()
        .and_then(|dir| Tokenizer::from_dir(&dir.path).ok());
    let endpoint = if args.endpoint.as_deref() == Some("chat") {
        Endpoint::Chat
    } else {
        Endpoint::Completions
    };
    let options = SessionOptions {
        plan: plan.clone(),
        max_concurrency: args.max_concurrency,
        arrival: if args.arrival.as_deref() == Some("constant") {
            Arrival::Constant
        } else {
            Arrival::Poisson
        },
        num_requests: args.num_requests,
        requests_per_client: args.requests_per_client,
        warmup: args.warmup,
        seed: args.seed,
        stream: !args.no_stream,
        slo,
        progress: ProgressMode::detect(args.quiet, std::time::Duration::from_secs_f64(args.progress_every)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let driver = if args.offline {
        if !args.url.is_empty() || !args.target.is_empty() {
            return Err("--offline drives an engine here: leave out --url and --target".into());
        }
        // Offline: an engine here, fed token ids; the model (or its dummy) loads first.
        let dummy = args.load_format == "dummy";
        let device = Device::open(
            &DeviceChoice::parse(&args.device)?,
            WeightDtype::parse(&args.dtype)?,
            &mut |note| eprintln!("{note}"),
        )?;
        let dir = resolve_model(&args.model)?;
        let model = load_model(&device, &dir.path, dummy, &mut |_, _| {})?;
        let vocab = model
            .text_config()
            .ok_or_else(|| format!("{}: bench drives text models", args.model))?
            .vocab_size;
        let most_in_flight = match &plan {
            Plan::Loads(loads) => loads
                .iter()
                .map(|l| match l {
                    Load::Concurrency(c) => *c,
                    _ => args.max_concurrency.unwrap_or(256),
                })
                .max()
                .unwrap_or(1),
            Plan::Sweep { .. } => args.max_concurrency.unwrap_or(256),
        };
        let config = EngineConfig {
            block_size: 16,
            num_blocks: 0,
            max_num_seqs: most_in_flight.max(1),
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_waiting: usize::MAX,
            async_scheduling: args.async_scheduling.unwrap_or(async_scheduling_default(&device)),
            pad_decode_batches: false,
        };
        let budget = kv_budget_on(
            &device,
            KvCacheBudget::FractionOfAvailable(args.kv_cache_fraction),
            args.gpu_memory_utilization,
        )?;
        let config = model.engine_config(config, budget)?;
        eprintln!("bench: engine on {}", device.describe());
        Driver::Offline {
            profile: args.profile,
            engine: model.spawn(config, vec![]),
            vocab,
            device: device.describe(),
            sampling,
        }
    } else {
        let urls = if args.url.is_empty() && args.target.is_empty() {
            vec!["http://127.0.0.1:8000".to_owned()]
        } else {
            args.url.clone()
        };
        let api_key = args
            .api_key
            .clone()
            .or_else(|| std::env::var("INFERD_API_KEY").ok().filter(|k| !k.is_empty()));
        let list = session::targets(&urls, &args.target)?
            .into_iter()
            .map(|(name, target)| {
                let settings = HttpSettings {
                    target,
                    model: args.model.clone(),
                    endpoint,
                    stream: !args.no_stream,
                    ignore_eos: !args.no_ignore_eos,
                    api_key: api_key.clone(),
                    sampling,
                };
                (name, settings)
            })
            .collect();
        Driver::Http(list)
    };
    let series = runtime.block_on(session::run_session(&options, &workload, tokenizer.as_ref(), &driver))?;
    let ratios = session::compare(&series);
    if !ratios.is_empty() {
        print!("{}", session::ratios_text(&ratios));
    }
    let context = Context {
        command: redact_api_key(std::env::args()),
        model: args.model.clone(),
        endpoint: if args.offline {
            "engine".into()
        } else {
            endpoint.path().into()
        },
        ignore_eos: args.offline || !args.no_ignore_eos,
        workload: serde_json::json!({
            "dataset": workload.dataset.name(),
            "dataset_path": dataset_path,
            "input_len": workload.input_len,
            "output_len": args.output_len,
            "range_ratio": workload.range_ratio,
            "num_prefixes": match workload.dataset { Dataset::Prefix { num_prefixes, .. } => Some(num_prefixes), _ => None },
            "prefix_len": match workload.dataset { Dataset::Prefix { prefix_len, .. } => Some(prefix_len), _ => None },
            "num_requests": args.num_requests,
            "requests_per_client": args.requests_per_client,
            "sampling": sampling,
        }),
        plan: match &plan {
            Plan::Sweep { points } => serde_json::json!({"sweep": points}),
            Plan::Loads(loads) => serde_json::json!({"loads": loads}),
        },
    };
    let doc = session::document(&context, &options, &series, &ratios);
    let write = |path: &std::path::Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    if let Some(path) = &args.json {
        write(path, (serde_json::to_string_pretty(&doc)? + "\n").as_bytes())?;
    }
    let charts = if args.plots.is_some() || args.report.is_some() {
        bench::plot::charts(&series)
    } else {
        Vec::new()
    };
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for chart in &charts {
            write(&dir.join(format!("{}.svg", chart.name)), chart.svg()?.as_bytes())?;
            write(&dir.join(format!("{}.png", chart.name)), &chart.png()?)?;
        }
    }
    if let Some(path) = &args.report {
        write(path, bench::html::report(&doc, &series, &ratios, &charts)?.as_bytes())?;
    }
    // Failed requests are results (an overloaded server refuses some); a run that lost
    // every request measured nothing, and that is an error.
    let runs = series.iter().flat_map(|s| &s.runs);
    let (failed, sent) = runs.clone().fold((0, 0), |(f, n), r| (f + r.failed, n + r.requests));
    if let Some(lost) = runs.clone().find(|r| r.requests > 0 && r.failed == r.requests) {
        return Err(format!(
            "every request of the {} run failed: {}",
            lost.label,
            lost.errors.join("; ")
        )
        .into());
    }
    if failed > 0 {
        eprintln!("bench: {failed} of {sent} requests failed (see the runs above)");
    }
    Ok(())
}

/// The command line with `--api-key`'s value hidden (it is written to reports people share).
fn redact_api_key(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut hide_next = false;
    args.map(|a| {
        let hidden = if hide_next {
            "***".to_owned()
        } else if a.starts_with("--api-key=") {
            "--api-key=***".to_owned()
        } else {
            a.clone()
        };
        hide_next = a == "--api-key" && !hide_next;
        hidden
    })
    .collect()
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// `org/name[@revision]` in the Hugging Face cache, or a local folder.
    #[arg(long, short)]
    model: String,
    /// The user message (or, with --raw, the literal prompt).
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// A system message placed before the user message.
    #[arg(long)]
    system: Option<String>,
    /// Stop before this text (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Print prompt and speed statistics to stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Also print the generated token ids to stderr, as a JSON array.
    #[arg(long)]
    print_ids: bool,
    /// Where the model runs: auto, cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How weights are kept: auto, bfloat16 or float32.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(*args),
        Command::Chat(args) => inferd::chat::run(inferd::chat::ChatOptions {
            url: args.url,
            model: args.model,
            api_key: args
                .api_key
                .or_else(|| std::env::var("INFERD_API_KEY").ok().filter(|k| !k.is_empty())),
            system: args.system,
        }),
        Command::Download { model } => download(&model),
        Command::Bench(args) => bench(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "download")]
fn download(id: &str) -> Result<(), Box<dyn Error>> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use inferd::loader::download::{Download, HubClient};
    use inferd::loader::hub::hub_cache_dir;
    use inferd::loader::ModelRef;

    let model = ModelRef::parse(id)?;
    let client = HubClient::from_env();
    let plan = Download::plan(&client, &model, &hub_cache_dir())?;
    let missing = plan.missing_bytes(|_| true);
    let bars = MultiProgress::new();
    let style = ProgressStyle::default_bar()
        .template("{msg:>32} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}")?
        .progress_chars("=> ");
    let mut per_file = std::collections::HashMap::new();
    for file in &plan.files {
        let bar = bars.add(ProgressBar::new(file.size).with_style(style.clone()));
        bar.set_message(file.path.clone());
        if missing == 0 || plan.missing_bytes(|f| f.path == file.path) == 0 {
            bar.set_position(file.size);
        }
        per_file.insert(file.path.clone(), bar);
    }
    let total = bars.add(ProgressBar::new(missing).with_style(style));
    total.set_message("total");
    plan.fetch(|_| true, &mut |file, mine, done, _| {
        if let Some(bar) = per_file.get(&file.path) {
            bar.set_position(mine);
        }
        total.set_position(done);
    })?;
    let dir = plan.finish()?;
    for bar in per_file.values() {
        bar.finish();
    }
    total.finish();
    println!("{}", dir.path.display());
    Ok(())
}

#[cfg(not(feature = "download"))]
fn download(_: &str) -> Result<(), Box<dyn Error>> {
    Err("this build of inferd has no `download` feature".into())
}

fn generate(args: GenerateArgs) -> Result<(), Box<dyn Error>> {
    // The engine trusts its parameters' ranges (the server's are checked in `api`).
    if args.max_tokens == 0 {
        return Err("--max-tokens must be at least 1".into());
    }
    let load_start = std::time::Instant::now();
    let device = Device::open(
        &DeviceChoice::parse(&args.device)?,
        WeightDtype::parse(&args.dtype)?,
        &mut |note| eprintln!("{note}"),
    )?;
    let loaded = ModelFiles::load(&args.model, &device, false, &mut |_| {})?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let eos_ids = loaded.eos_ids();
    let ModelFiles {
        dir, tokenizer, model, ..
    } = loaded;
    if model.text_config().is_none() {
        return Err(format!(
            "`{}` is a speech model: transcribe with `inferd serve` and /v1/audio/transcriptions",
            args.model
        )
        .into());
    }

    let prompt_ids = if args.raw {
        tokenizer.encode(&args.prompt, true)?
    } else {
        let template = tokenizer.chat_template()?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
        let text = template.render(ChatInput {
            messages: &serde_json::Value::Array(messages),
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        })?;
        tokenizer.encode(&text, false)?
    };

    let block_size = 16;
    let config = EngineConfig {
        block_size,
        num_blocks: (prompt_ids.len() + args.max_tokens).div_ceil(block_size) + 1,
        max_num_seqs: 1,
        max_num_batched_tokens: 512,
        max_waiting: 1,
        async_scheduling: false,
        pad_decode_batches: false,
    };
    let params = SamplingParams {
        max_tokens: Some(args.max_tokens),
        ..SamplingParams::greedy()
    };
    let mut detokenizer = IncrementalDetokenizer::new(true);
    let mut stops = StopMatcher::new(args.stop.iter().cloned());
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let prompt_tokens = prompt_ids.len();
    let start = std::time::Instant::now();
    let mut first_token_at = None;
    let (tokens, _) = model.generate(config, eos_ids, prompt_ids, params, &mut |id| {
        first_token_at.get_or_insert_with(std::time::Instant::now);
        let piece = match detokenizer.push(&tokenizer, id) {
            Ok(piece) => stops.push(&piece),
            Err(e) => {
                write_error = Some(Box::<dyn Error>::from(e));
                return false;
            }
        };
        if let Err(e) = stdout.write_all(piece.text.as_bytes()).and_then(|_| stdout.flush()) {
            write_error = Some(e.into());
            return false;
        }
        // A stop string ends generation here (the engine stops on ids only).
        piece.matched.is_none()
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    if args.print_ids {
        eprintln!("{}", serde_json::to_string(&tokens)?);
    }
    let tail = stops.push(&detokenizer.flush(&tokenizer)?).text + &stops.finish();
    stdout.write_all(tail.as_bytes())?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    if args.verbose {
        let first = first_token_at.unwrap_or_else(std::time::Instant::now);
        let prefill_secs = (first - start).as_secs_f64();
        let decode_secs = first.elapsed().as_secs_f64();
        let decoded = tokens.len().saturating_sub(1);
        eprintln!(
            "model {} loaded in {load_secs:.2} s; prefill {prompt_tokens} tokens in {prefill_secs:.3} s ({:.1} tok/s); decode {decoded} tokens in {decode_secs:.3} s ({:.1} tok/s)",
            dir.display_name,
            prompt_tokens as f64 / prefill_secs.max(1e-9),
            decoded as f64 / decode_secs.max(1e-9),
        );
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), Box<dyn Error>> {
    let forced = args.force_model.clone().or(args.model.clone());
    if !args.served_model_name.is_empty() && forced.is_none() {
        return Err("--served-model-name names the served model: give the model first (`inferd serve MODEL --served-model-name NAME [ALIAS...]`; the names take every word after them)".into());
    }
    if args.served_model_name.iter().any(|n| n.trim().is_empty()) {
        return Err("--served-model-name: a name must not be empty".into());
    }
    let chat_template_kwargs = match &args.chat_template_kwargs {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text)? {
            serde_json::Value::Object(map) => Some(map),
            _ => return Err("--chat-template-kwargs must be a JSON object".into()),
        },
        None => None,
    };
    args.torch_only.refuse()?;
    let device_choice = DeviceChoice::parse(&args.device)?;
    let weights = WeightDtype::parse(&args.dtype)?;
    let level = Level::parse(&args.log_level)
        .ok_or_else(|| format!("--log-level {}: use error, warning, info or debug", args.log_level))?;
    inferd::log::set_level(level);
    let backend = Device::open(&device_choice, weights, &mut |note| eprintln!("{note}"))?;
    let cpu_kernels = match &backend {
        Device::Cpu(cpu) => Some(cpu.kernels),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => None,
    };
    if args.cb_use_cuda_graph == Some(true) {
        return Err("--cb-use-cuda-graph: inferd does not capture CUDA graphs (each step launches its kernels)".into());
    }
    if !(args.kv_cache_fraction > 0.0 && args.kv_cache_fraction <= 1.0) {
        return Err(format!(
            "--kv-cache-fraction (--cb-max-memory-percent) {} must be in (0, 1]",
            args.kv_cache_fraction
        )
        .into());
    }
    let engine = EngineConfig {
        block_size: args.block_size,
        num_blocks: args.num_blocks.unwrap_or(0),
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_waiting: args.max_waiting,
        async_scheduling: args.async_scheduling.unwrap_or(async_scheduling_default(&backend)),
        pad_decode_batches: false,
    };
    if engine.block_size == 0
        || args.num_blocks == Some(0)
        || engine.max_num_seqs == 0
        || engine.max_num_batched_tokens == 0
    {
        return Err("--block-size, --num-blocks, --max-num-seqs and --max-num-batched-tokens must be positive".into());
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("INFERD_API_KEY").ok().filter(|k| !k.is_empty()));
    let settings = ModelSettings {
        backend,
        gpu_memory_utilization: args.gpu_memory_utilization,
        engine,
        kv_budget: match args.kv_cache_memory {
            Some(bytes) => KvCacheBudget::Bytes(bytes),
            None => KvCacheBudget::FractionOfAvailable(args.kv_cache_fraction),
        },
        reasoning: match args.reasoning.as_str() {
            "on" => ReasoningMode::On,
            "off" => ReasoningMode::Off,
            _ => ReasoningMode::Auto,
        },
        // transformers serve's convention: zero or less never unloads.
        idle_timeout: (args.model_timeout > 0).then(|| std::time::Duration::from_secs(args.model_timeout as u64)),
        dummy_weights: args.load_format == "dummy",
        memory_budget: args.models_memory,
    };
    // The store first: a bad one fails before a model loads.
    let store_url = match &args.responses_store {
        Some(url) => StoreUrl::parse(url).map_err(|e| format!("--responses-store: {e}"))?,
        None => StoreUrl::default_sqlite(),
    };
    let retention = |url: &StoreUrl| -> Result<Retention, String> {
        Ok(Retention {
            ttl: parse_duration(&args.responses_ttl, "s").map_err(|e| format!("--responses-ttl: {e}"))?,
            max_count: args.responses_store_size.or((*url == StoreUrl::Memory).then_some(1024)),
            max_bytes: args.responses_store_max_mib.saturating_mul(1 << 20),
            sweep_every: parse_duration(&args.responses_sweep_every, "s")
                .map_err(|e| format!("--responses-sweep-every: {e}"))?,
        })
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let opened = runtime.block_on(ResponseStore::open(store_url.clone(), retention(&store_url)?));
    let responses = match opened {
        Ok(store) => store,
        // The default file cannot be made (no home, a read-only one): the server still
        // runs, keeping responses in memory, and says so.
        Err(e) if args.responses_store.is_none() => {
            inferd::warn!(
                "responses store: {} cannot be used ({e}); keeping stored responses in memory instead (--responses-store sets where)",
                store_url.describe()
            );
            runtime
                .block_on(ResponseStore::open(StoreUrl::Memory, retention(&StoreUrl::Memory)?))
                .map_err(|e| format!("--responses-store: {e}"))?
        }
        Err(e) => return Err(format!("--responses-store: {e}").into()),
    };
    let responses = std::sync::Arc::new(responses);
    runtime.block_on(async { responses.spawn_sweeper() });
    inferd::info!("responses store: {}", responses.describe());
    let models = match &forced {
        Some(id) => ModelManager::with_forced(settings, id, args.served_model_name.clone())?,
        None => ModelManager::new(settings),
    };
    let state = std::sync::Arc::new(ServerState {
        models,
        default_seed: args.default_seed,
        chat_template_kwargs,
        api_key,
        enable_cors: args.enable_cors,
        max_body_bytes: args.max_body_bytes,
        read_timeout: std::time::Duration::from_secs(args.read_timeout_secs),
        write_timeout: std::time::Duration::from_secs(args.write_timeout_secs),
        max_audio_seconds: args.max_audio_seconds,
        max_audio_bytes: args.max_audio_bytes,
        images: inferd::server::images::ImageLimits::new(
            inferd::media::fetch::FetchPolicy {
                enabled: !args.no_remote_images,
                allow_private: args.allow_private_image_urls,
                max_bytes: args.max_image_bytes,
                timeout: std::time::Duration::from_secs(args.image_fetch_timeout_secs),
            },
            args.max_images_per_request,
            args.max_image_pixels,
            args.max_image_memory,
        ),
        metrics: Default::default(),
        next_request: Default::default(),
        responses,
        stopping: tokio::sync::watch::Sender::new(false),
    });
    let host = if args.host == "localhost" {
        "127.0.0.1"
    } else {
        args.host.as_str()
    };
    let addr: std::net::SocketAddr = format!("{host}:{}", args.port)
        .parse()
        .or_else(|_| format!("[{host}]:{}", args.port).parse())
        .map_err(|_| format!("--host `{}` is not an IP address", args.host))?;
    if let Some(kernels) = cpu_kernels {
        inferd::info!("{}", kernels.describe());
    }
    runtime.block_on(server::serve(
        state,
        ServerOptions {
            addr,
            shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_secs),
        },
    ))?;
    Ok(())
}
