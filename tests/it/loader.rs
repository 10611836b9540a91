//! Hugging Face cache resolution and sharded checkpoints.

use std::path::Path;
use std::process::Command;

use inferd::backend::cpu::CpuBackend;
use inferd::backend::{Backend, ForwardBatch};
use inferd::loader::hub::resolve_in_cache;
use inferd::loader::{Checkpoint, ModelRef};
use inferd::models::{load_decoder, EngineModel, LogitsFor};

use crate::common::{f32_bytes, installed_model, scratch_dir, write_safetensors};

const COMMIT_A: &str = "0123456789abcdef0123456789abcdef01234567";
const COMMIT_B: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// A cache with `org/name` at two commits: `main` -> A, tag `v1` -> B.
fn fake_cache(name: &str) -> std::path::PathBuf {
    let cache = scratch_dir(name);
    let repo = cache.join("models--org--name");
    for commit in [COMMIT_A, COMMIT_B] {
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo.join("snapshots").join(commit).join("config.json"), commit).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT_A).unwrap();
    std::fs::write(repo.join("refs/v1"), format!("{COMMIT_B}\n")).unwrap();
    cache
}

#[test]
fn revisions_resolve_through_refs_or_as_commit_hashes() {
    let cache = fake_cache("hub-revisions");
    let resolve = |id: &str| resolve_in_cache(&ModelRef::parse(id).unwrap(), &cache);
    let main = resolve("org/name").unwrap();
    assert_eq!(main.commit.as_deref(), Some(COMMIT_A));
    assert_eq!(main.display_name, "org/name@main");
    assert_eq!(
        std::fs::read_to_string(main.path.join("config.json")).unwrap(),
        COMMIT_A
    );
    assert_eq!(resolve("org/name@v1").unwrap().commit.as_deref(), Some(COMMIT_B));
    assert_eq!(
        resolve(&format!("org/name@{COMMIT_B}")).unwrap().path,
        cache.join("models--org--name/snapshots").join(COMMIT_B)
    );
    let err = resolve("org/name@v2").unwrap_err().to_string();
    assert!(err.contains("revision `v2`"), "{err}");
    assert!(resolve("org/other").is_err());
}

#[test]
fn model_ids_are_validated() {
    assert_eq!(
        ModelRef::parse("Qwen/Qwen3-0.6B").unwrap().to_string(),
        "Qwen/Qwen3-0.6B@main"
    );
    assert_eq!(ModelRef::parse("gpt2@refs/pr/1").unwrap().revision, "refs/pr/1");
    for bad in [
        "",
        "a/b/c",
        "../etc",
        "org/..",
        "org/name@",
        "org/na me",
        "org/name@../../x",
    ] {
        assert!(ModelRef::parse(bad).is_err(), "{bad:?} should be rejected");
    }
}

/// Installs SmolLM2's files as `test/smol` in a fresh cache under `cache_dir`.
fn cache_with_smollm2(cache_dir: &Path) {
    let src = installed_model("HuggingFaceTB/SmolLM2-135M-Instruct");
    let snap = cache_dir.join("models--test--smol/snapshots").join(COMMIT_A);
    std::fs::create_dir_all(&snap).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(
            std::fs::canonicalize(entry.path()).unwrap(),
            snap.join(entry.file_name()),
        )
        .unwrap();
    }
    std::fs::create_dir_all(cache_dir.join("models--test--smol/refs")).unwrap();
    std::fs::write(cache_dir.join("models--test--smol/refs/main"), COMMIT_A).unwrap();
}

#[test]
fn the_cache_is_found_through_hf_hub_cache_then_hf_home() {
    let root = scratch_dir("hub-env");
    cache_with_smollm2(&root.join("direct"));
    cache_with_smollm2(&root.join("home/hub"));
    let run = |envs: &[(&str, &Path)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferd"));
        cmd.args([
            "generate",
            "--model",
            "test/smol",
            "--max-tokens",
            "8",
            "What is the capital of France?",
        ]);
        cmd.env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env("HF_HUB_OFFLINE", "1");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    for envs in [
        vec![("HF_HUB_CACHE", root.join("direct"))],
        vec![("HF_HOME", root.join("home"))],
        vec![("HF_HUB_CACHE", root.join("direct")), ("HF_HOME", root.join("nowhere"))],
    ] {
        let envs: Vec<(&str, &Path)> = envs.iter().map(|(k, v)| (*k, v.as_path())).collect();
        let out = run(&envs);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("Paris"),
            "{envs:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&[("HF_HOME", &root.join("nowhere"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere/hub"));
}

#[test]
fn a_sharded_checkpoint_loads_the_same_weights_as_a_single_file() {
    let src = installed_model("inferd-test/tiny-llama");
    let ckpt = Checkpoint::open(&src).unwrap();
    let config = inferd::models::DecoderConfig::from_dir(&src).unwrap();
    let names = inferd::models::DecoderModel::<CpuBackend>::tensor_names(&config);
    let dir = scratch_dir("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let tensors: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|n| {
                let t = ckpt.tensor(n).unwrap();
                weight_map.insert(n.clone(), file.into());
                (n.as_str(), "F32", t.shape.to_vec(), f32_bytes(&t.to_f32_vec()))
            })
            .collect();
        write_safetensors(&dir.join(file), &tensors);
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();

    let logits = |model_dir: &Path| {
        let model = load_decoder(&CpuBackend::default(), model_dir, &mut |_, _| {}).unwrap();
        let prompt = [5u32, 77, 300, 12, 9];
        let mut cache = CpuBackend::default().alloc_kv_cache(model.kv_cache_shape(1, 16));
        let batch = ForwardBatch::single(&prompt, 0, &[0], 16);
        CpuBackend::default()
            .to_host(
                model
                    .forward(&CpuBackend::default(), &batch, &mut cache, LogitsFor::AllTokens)
                    .unwrap(),
            )
            .0
    };
    assert_eq!(logits(&dir), logits(&src));
}

/// fetch-test-models' Whisper conversion: every tensor HF's WhisperForConditionalGeneration
/// reads, in fp16, with shapes implied by its config.
#[test]
fn the_installed_whisper_tiny_en_checkpoint_has_every_tensor_in_fp16() {
    let dir = installed_model("openai/whisper-tiny.en");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let d = config["d_model"].as_u64().unwrap() as usize;
    let ffn = config["encoder_ffn_dim"].as_u64().unwrap() as usize;
    let ckpt = Checkpoint::open(&dir).unwrap();
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("model.encoder.conv1.weight".into(), vec![d, 80, 3]),
        ("model.encoder.conv2.weight".into(), vec![d, d, 3]),
        ("model.encoder.embed_positions.weight".into(), vec![1500, d]),
        ("model.decoder.embed_tokens.weight".into(), vec![51864, d]),
        ("model.decoder.embed_positions.weight".into(), vec![448, d]),
    ];
    for side in ["encoder", "decoder"] {
        for l in 0..4 {
            let p = format!("model.{side}.layers.{l}");
            let mut attns = vec!["self_attn"];
            if side == "decoder" {
                attns.push("encoder_attn");
            }
            for attn in attns {
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    expected.push((format!("{p}.{attn}.{proj}.weight"), vec![d, d]));
                    if proj != "k_proj" {
                        expected.push((format!("{p}.{attn}.{proj}.bias"), vec![d]));
                    }
                }
            }
            expected.push((format!("{p}.fc1.weight"), vec![ffn, d]));
            expected.push((format!("{p}.fc2.weight"), vec![d, ffn]));
        }
    }
    for (name, shape) in &expected {
        let t = ckpt.tensor(name).unwrap();
        assert_eq!(t.shape, shape.as_slice(), "{name}");
        assert_eq!(t.dtype, inferd::loader::Dtype::F16, "{name}");
    }
    assert_eq!(ckpt.num_tensors(), 167);
}

fn parse_config(name: &str, json: serde_json::Value) -> inferd::models::DecoderConfig {
    let dir = scratch_dir(name);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    inferd::models::DecoderConfig::from_dir(&dir).unwrap()
}

#[test]
fn configs_follow_transformers_defaults_and_both_rope_spellings() {
    use inferd::models::{Architecture, RopeScaling};
    let base = serde_json::json!({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "vocab_size": 10});
    let with = |extra: serde_json::Value| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };
    // A re-saved legacy config carries both `type` and `rope_type`.
    let llama = parse_config(
        "config-llama",
        with(serde_json::json!({"model_type": "llama", "eos_token_id": [5, 7],
                                "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 4.0}})),
    );
    assert_eq!(llama.architecture, Architecture::Llama);
    assert_eq!(llama.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    assert_eq!(
        (llama.head_dim, llama.num_key_value_heads, llama.max_position_embeddings),
        (16, 4, 2048)
    );
    assert_eq!(llama.eos_token_ids, vec![5, 7]);
    assert_eq!(llama.rope_theta, 10000.0);
    // transformers >= 5: rope_theta inside rope_parameters; Qwen3's default head_dim is 128.
    let qwen3 = parse_config(
        "config-qwen3",
        with(serde_json::json!({"model_type": "qwen3", "num_key_value_heads": 2,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}})),
    );
    assert_eq!(
        (qwen3.head_dim, qwen3.max_position_embeddings, qwen3.rope_theta),
        (128, 32768, 1e6)
    );
    assert!(qwen3.qk_norm && !qwen3.qkv_bias && !qwen3.o_proj_bias);
    let qwen2 = parse_config(
        "config-qwen2",
        with(serde_json::json!({"model_type": "qwen2", "attention_bias": true})),
    );
    assert!(qwen2.qkv_bias && !qwen2.o_proj_bias && !qwen2.mlp_bias);
}
