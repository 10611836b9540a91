use inferd::text::{IncrementalDetokenizer, Tokenizer};

use crate::common::fixture;

fn qwen_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixture("models/qwen2.5-coder-0.5b")).unwrap()
}

/// llama.cpp's test-tokenizer-0 vectors: strings separated by `__ggml_vocab_test__`
/// lines, expected ids one line per string.
fn vectors() -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(fixture("ggml-vocab-qwen2.inp")).unwrap();
    let out = std::fs::read_to_string(fixture("ggml-vocab-qwen2.out")).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<Vec<u32>> = out
        .split('\n')
        .map(|line| line.split_whitespace().map(|id| id.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), expected.len(), "inp/out vector counts differ");
    assert_eq!(texts.len(), 47);
    texts.into_iter().map(str::to_owned).zip(expected).collect()
}

#[test]
fn qwen2_tokenizer_encodes_every_llama_cpp_vector_exactly() {
    let tok = qwen_tokenizer();
    let mut failures = Vec::new();
    for (text, want) in vectors() {
        let got = tok.encode(&text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn qwen2_tokenizer_decode_round_trips_every_vector() {
    let tok = qwen_tokenizer();
    for (text, ids) in vectors() {
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn incremental_detokenizer_emits_the_full_text_one_token_at_a_time_without_broken_utf8() {
    let tok = qwen_tokenizer();
    for (text, ids) in vectors() {
        let mut detok = IncrementalDetokenizer::new(false);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = detok.push(&tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}') || text.contains('\u{FFFD}'),
                "{text:?}: piece {piece:?}"
            );
            streamed.push_str(&piece);
        }
        streamed.push_str(&detok.flush(&tok).unwrap());
        assert_eq!(streamed, text);
    }
}

#[test]
fn incremental_detokenizer_holds_back_a_character_split_across_byte_tokens() {
    let tok = qwen_tokenizer();
    // "🦙" is four UTF-8 bytes; byte-level BPE can spell it with four byte tokens.
    let byte_ids: Vec<u32> = "🦙"
        .bytes()
        .map(|b| {
            // GPT-2 byte-to-unicode: bytes 0x80..=0xA0 and 0xAD map above U+00FF.
            let ch = gpt2_byte_char(b);
            tok.token_to_id(&ch.to_string()).expect("byte token")
        })
        .collect();
    let mut detok = IncrementalDetokenizer::new(false);
    assert_eq!(detok.push(&tok, tok.encode("a", false).unwrap()[0]).unwrap(), "a");
    for &id in &byte_ids[..3] {
        assert_eq!(
            detok.push(&tok, id).unwrap(),
            "",
            "a partial character must not be emitted"
        );
    }
    assert_eq!(detok.push(&tok, byte_ids[3]).unwrap(), "🦙");
}

fn gpt2_byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let mut n = 0u32;
    for x in 0..=255u8 {
        if !printable(x) {
            if x == b {
                return char::from_u32(256 + n).unwrap();
            }
            n += 1;
        }
    }
    unreachable!()
}
