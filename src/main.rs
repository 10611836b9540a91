//! The `inferd` command line: serve | chat | download | bench | generate.

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use inferd::backend::cpu::CpuBackend;
use inferd::engine::{self, Engine, EngineConfig, SamplingParams};
use inferd::loader::resolve_model;
use inferd::models::{load_decoder, GenerationConfig};
use inferd::text::{ChatInput, IncrementalDetokenizer, StopMatcher, Tokenizer};

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
    Serve {
        /// Model to serve for every request (same as --force-model).
        model: Option<String>,
    },
    /// Chat with a model in the terminal, through a running server.
    Chat,
    /// Download a model from the Hugging Face hub into the local cache.
    Download { model: String },
    /// Benchmark a server's throughput and latency.
    Bench,
    /// Generate a reply locally (greedy), as a quick check that a model works.
    Generate(GenerateArgs),
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Serve { .. } => not_yet("serve", "the HTTP server (OpenAI routes)"),
        Command::Chat => not_yet("chat", "the model manager and chat client"),
        Command::Download { .. } => not_yet("download", "hub downloads"),
        Command::Bench => not_yet("bench", "the serving benchmark"),
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

fn not_yet(command: &str, what: &str) -> Result<(), Box<dyn Error>> {
    Err(format!("`inferd {command}` is not yet available in this build: {what} has not landed yet").into())
}

fn generate(args: GenerateArgs) -> Result<(), Box<dyn Error>> {
    let dir = resolve_model(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&dir.path)?;
    let generation_config = GenerationConfig::from_dir(&dir.path)?;
    let backend = CpuBackend;
    let load_start = std::time::Instant::now();
    let model = load_decoder(&backend, &dir.path, &mut |_, _| {})?;
    let load_secs = load_start.elapsed().as_secs_f64();

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

    let mut eos_ids = generation_config.eos_token_ids();
    eos_ids.extend(&model.config.eos_token_ids);
    if let Some(id) = tokenizer
        .special_tokens
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
    {
        eos_ids.push(id);
    }
    let block_size = 16;
    let config = EngineConfig {
        block_size,
        num_blocks: (prompt_ids.len() + args.max_tokens).div_ceil(block_size) + 1,
        max_num_seqs: 1,
        max_num_batched_tokens: 512,
        max_waiting: 1,
    };
    let mut engine = Engine::new(backend, model, config, eos_ids);
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
    let (tokens, _) = engine::generate(&mut engine, prompt_ids, params, &mut |id| {
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
