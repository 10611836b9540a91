//! Bad models and bad files: one typed error naming the file and tensor, never a panic.

use std::path::Path;
use std::process::Command;

use inferd::backend::cpu::CpuBackend;
use inferd::loader::{resolve_model, Checkpoint};
use inferd::models::{load_decoder, ModelError};

use crate::common::{f32_bytes, installed_model, scratch_dir, write_safetensors};

type Tensors = Vec<(String, String, Vec<usize>, Vec<u8>)>;

/// The tiny Qwen3 checkpoint's tensors as owned (name, dtype, shape, bytes).
fn tiny_tensors() -> Tensors {
    let dir = installed_model("inferd-test/tiny-qwen3");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let config = inferd::models::DecoderConfig::from_dir(&dir).unwrap();
    inferd::models::DecoderModel::<CpuBackend>::tensor_names(&config)
        .into_iter()
        .map(|name| {
            let t = ckpt.tensor(&name).unwrap();
            (
                name.clone(),
                "F32".to_owned(),
                t.shape.to_vec(),
                f32_bytes(&t.to_f32_vec()),
            )
        })
        .collect()
}

/// A model folder with the tiny Qwen3 config and the given tensors.
fn model_dir(name: &str, tensors: &Tensors) -> std::path::PathBuf {
    let dir = scratch_dir(name);
    std::fs::copy(
        installed_model("inferd-test/tiny-qwen3").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), d.as_str(), s.clone(), b.clone()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &refs);
    dir
}

fn load_err(dir: &Path) -> String {
    match load_decoder(&CpuBackend::default(), dir, &mut |_, _| {}) {
        Ok(_) => panic!("{}: loaded a bad model", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_well_formed_rewritten_checkpoint_loads() {
    // Guards the helpers below: without corruption the same files load.
    let dir = model_dir("errors-control", &tiny_tensors());
    load_decoder(&CpuBackend::default(), &dir, &mut |_, _| {}).unwrap();
}

#[test]
fn a_truncated_safetensors_file_names_the_file_and_the_cut_tensor() {
    let dir = model_dir("errors-truncated", &tiny_tensors());
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated") && msg.contains("`lm_head.weight`"),
        "{msg}"
    );
}

#[test]
fn a_garbage_header_is_reported_as_not_safetensors() {
    let dir = model_dir("errors-garbage", &tiny_tensors());
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    )
    .unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("not a valid safetensors file") && msg.contains("header"),
        "{msg}"
    );
    std::fs::write(dir.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("runs past the end of the file"), "{msg}");
}

#[test]
fn an_unsupported_dtype_names_the_tensor_and_dtype() {
    let mut tensors = tiny_tensors();
    let norm = tensors.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
    norm.1 = "I32".into();
    let msg = load_err(&model_dir("errors-dtype", &tensors));
    assert!(msg.contains("`model.norm.weight` has dtype I32"), "{msg}");
}

#[test]
fn a_missing_tensor_is_named() {
    let mut tensors = tiny_tensors();
    tensors.retain(|t| t.0 != "model.layers.1.self_attn.k_norm.weight");
    let msg = load_err(&model_dir("errors-missing", &tensors));
    assert!(
        msg.contains("tensor `model.layers.1.self_attn.k_norm.weight` is missing"),
        "{msg}"
    );
}

#[test]
fn a_tensor_with_the_wrong_shape_is_named_with_both_shapes() {
    let mut tensors = tiny_tensors();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "model.layers.0.mlp.down_proj.weight")
        .unwrap();
    t.2 = vec![t.2[1], t.2[0]]; // transposed: same byte count, wrong shape
    let msg = load_err(&model_dir("errors-shape", &tensors));
    assert!(
        msg.contains("`model.layers.0.mlp.down_proj.weight` has shape [80, 48], expected [48, 80]"),
        "{msg}"
    );
}

#[test]
fn a_byte_count_that_disagrees_with_the_shape_is_rejected() {
    let mut tensors = tiny_tensors();
    let t = tensors.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
    t.2 = vec![t.2[0] + 1];
    let msg = load_err(&model_dir("errors-size", &tensors));
    assert!(
        msg.contains("`model.norm.weight` holds 192 bytes, but shape [49] of F32 needs 196"),
        "{msg}"
    );
}

#[test]
fn a_folder_without_config_json_says_so() {
    let dir = scratch_dir("errors-no-config");
    match load_decoder(&CpuBackend::default(), &dir, &mut |_, _| {}) {
        Err(ModelError::Config(e)) => assert!(e.to_string().contains("config.json is missing"), "{e}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded without config"),
    }
}

#[test]
fn an_unsupported_architecture_is_named() {
    let dir = scratch_dir("errors-arch");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba", "hidden_size": 8}"#).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model_type `mamba` is not supported"), "{msg}");
}

#[test]
fn an_unknown_model_id_says_it_is_not_cached_and_how_to_get_it() {
    let err = resolve_model("nobody/does-not-exist@main").unwrap_err().to_string();
    assert!(
        err.contains("`nobody/does-not-exist`") && err.contains("inferd download"),
        "{err}"
    );
    let err = resolve_model("a/b/c").unwrap_err().to_string();
    assert!(err.contains("is not a model id"), "{err}");
}

/// The CLI turns each failure into one `error:` line and exit status 1.
#[test]
fn generate_cli_reports_bad_models_in_one_line_without_panicking() {
    let corrupt = model_dir("errors-cli-corrupt", &tiny_tensors());
    let path = corrupt.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    // The corrupt folder needs a tokenizer to get as far as the weights.
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            crate::common::fixture("models/qwen2.5-coder-0.5b").join(f),
            corrupt.join(f),
        )
        .unwrap();
    }
    let no_config = scratch_dir("errors-cli-no-config");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(crate::common::fixture("models/smollm2-135m").join(f), no_config.join(f)).unwrap();
    }
    let cases = [
        // Not cached, and (offline) not fetched either.
        ("nobody/does-not-exist", "is not in the Hugging Face cache"),
        (no_config.to_str().unwrap(), "config.json is missing"),
        (corrupt.to_str().unwrap(), "file is truncated"),
    ];
    for (model, expected) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["generate", "--model", model, "hello"])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{model}: {stderr}");
        assert!(!stderr.contains("panicked"), "{model}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{model}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{model}: {stderr}"
        );
    }
    // Parameters out of range are refused before any load.
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args([
            "generate",
            "--model",
            "nobody/does-not-exist",
            "--max-tokens",
            "0",
            "hello",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim(), "error: --max-tokens must be at least 1");
}
