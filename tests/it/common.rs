use std::path::{Path, PathBuf};

use inferd::loader::resolve_model;

/// The checkout: `INFERD_REPO_ROOT` when set (a test binary run on another machine, as
/// scripts/gpu-check does), else where it was built.
pub fn repo_root() -> PathBuf {
    std::env::var_os("INFERD_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(rel)
}

pub fn golden(rel: &str) -> serde_json::Value {
    let path = repo_root().join("tests").join("goldens").join(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A model installed in the HF cache; a missing one is a setup error, not a skip.
pub fn installed_model(id: &str) -> PathBuf {
    match resolve_model(id) {
        Ok(dir) => dir.path,
        Err(e) => panic!("{e}\n(install the test models with scripts/fetch-test-models)"),
    }
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("array of ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// A fresh empty folder under the target dir (removed first if it exists).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = repo_root().join("target").join("test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a safetensors file from `(name, dtype, shape, raw bytes)`.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    std::fs::write(path, inferd::loader::safetensors::encode_safetensors(tensors)).unwrap();
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs one request (with its encoder input, if any) on an otherwise idle engine until
/// it ends; its tokens.
pub fn run_alone<B: inferd::backend::Backend + 'static, M: inferd::models::EngineModel<B>>(
    engine: &mut inferd::engine::Engine<B, M>,
    id: u64,
    prompt: Vec<u32>,
    params: inferd::engine::SamplingParams,
    input: Option<inferd::models::EncoderInput>,
) -> Vec<u32> {
    use inferd::engine::{EngineEvent, RequestId};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .add_request_with_input(RequestId(id), prompt, params, input, tx)
        .unwrap();
    while engine.has_work() {
        engine.step();
    }
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            EngineEvent::Token { token, .. } => out.push(token),
            EngineEvent::Finished { .. } => break,
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
    out
}

/// A folder with SmolLM2's tokenizer and chat template and a tiny Llama config (2 layers
/// of width 64, SmolLM2's vocabulary), for `--load-format dummy`: a random-weight model
/// that answers real chat requests in microseconds a token, for load and fault tests.
pub fn tiny_chat_model(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    let smol = installed_model("HuggingFaceTB/SmolLM2-135M-Instruct");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        std::fs::copy(smol.join(file), dir.join(file)).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 49152, "max_position_embeddings": 16384, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}
