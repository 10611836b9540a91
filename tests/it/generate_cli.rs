use std::process::Command;

#[test]
fn generate_answers_the_capital_of_france_with_paris() {
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args([
            "generate",
            "--model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "What is the capital of France?",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // transformers' greedy answer for this checkpoint and template.
    assert_eq!(stdout, "The capital of France is Paris.\n");
}

#[test]
fn generate_stops_before_a_stop_string() {
    let out = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args([
            "generate",
            "--model",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--stop",
            " Paris",
            "What is the capital of France?",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "The capital of France is\n");
}
