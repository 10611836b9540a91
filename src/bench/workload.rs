//! What a benchmark sends: random-token prompts (as vLLM's random dataset), prompts from
//! a file, conversations from a ShareGPT-style JSON file, or a prefix-sharing workload
//! (a few long system prompts shared by many requests, which a prefix cache serves).
//! Every workload is a function of its seed, so two servers, or two runs, get the same
//! requests.

use serde_json::Value;

use crate::engine::sampling::Rng;
use crate::text::Tokenizer;

/// One request of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRequest {
    /// Sent as a system message on the chat route, or before the prompt on completions.
    pub system: Option<String>,
    pub prompt: String,
    /// The prompt's length (system part included) by the benchmark's own count (the
    /// server's `usage` wins).
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// The prefix workload's shared system prompt: (which one, its length in tokens).
    pub shared_prefix: Option<(usize, usize)>,
}

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    /// Random vocabulary tokens, `input_len` long (+- range_ratio).
    Random,
    /// One prompt per line of a text file, used in turn.
    Prompts(Vec<String>),
    /// The first human turn of each conversation, and the length of the reply that
    /// followed it as `max_tokens` (unless an output length is forced).
    ShareGpt(Vec<(String, String)>),
    /// `num_prefixes` random system prompts of `prefix_len` tokens, each request one
    /// of them (in turn) and a random question of `input_len` tokens.
    Prefix { num_prefixes: usize, prefix_len: usize },
}

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub dataset: Dataset,
    pub input_len: usize,
    pub output_len: usize,
    /// ShareGPT: use `output_len` rather than each reply's own length.
    pub fixed_output_len: bool,
    pub range_ratio: f64,
}

impl Dataset {
    pub fn name(&self) -> &'static str {
        match self {
            Dataset::Random => "random",
            Dataset::Prompts(_) => "prompts",
            Dataset::ShareGpt(_) => "sharegpt",
            Dataset::Prefix { .. } => "prefix",
        }
    }

    /// A text file, one prompt per non-blank line.
    pub fn prompts_file(text: &str) -> Result<Dataset, String> {
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        if lines.is_empty() {
            return Err("no prompts".into());
        }
        Ok(Dataset::Prompts(lines))
    }

    /// A ShareGPT-style file: a JSON array of `{"conversations": [{"from": "human",
    /// "value": ...}, {"from": "gpt", "value": ...}, ...]}` (`messages` with `role` and
    /// `content` reads too). Conversations with fewer than two turns, or whose first turn
    /// is not the user's, are skipped.
    pub fn sharegpt(json: &str) -> Result<Dataset, String> {
        let doc: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let items = doc.as_array().ok_or("not a JSON array of conversations")?;
        let text = |turn: &Value, keys: [&str; 2]| -> Option<String> {
            keys.iter()
                .find_map(|k| turn.get(*k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let pairs: Vec<(String, String)> = items
            .iter()
            .filter_map(|item| {
                let turns = item.get("conversations").or_else(|| item.get("messages"))?.as_array()?;
                let (first, second) = (turns.first()?, turns.get(1)?);
                let who = text(first, ["from", "role"])?;
                if !matches!(who.as_str(), "human" | "user") {
                    return None;
                }
                let prompt = text(first, ["value", "content"])?;
                let reply = text(second, ["value", "content"])?;
                (!prompt.trim().is_empty() && !reply.trim().is_empty()).then_some((prompt, reply))
            })
            .collect();
        if pairs.is_empty() {
            return Err("no conversation with a user turn and a reply".into());
        }
        Ok(Dataset::ShareGpt(pairs))
    }
}

impl WorkloadSpec {
    /// `count` requests, the same ones for the same seed.
    pub fn requests(&self, tokenizer: Option<&Tokenizer>, count: usize, seed: u64) -> Vec<BenchRequest> {
        let mut rng = Rng::seeded(seed);
        let count_tokens = |text: &str| -> usize {
            tokenizer
                .and_then(|t| t.encode(text, false).ok())
                .map_or_else(|| text.split_whitespace().count().max(1), |ids| ids.len())
        };
        match &self.dataset {
            Dataset::Random => {
                let lens: Vec<(usize, usize)> = (0..count)
                    .map(|_| {
                        (
                            self.spread(self.input_len, &mut rng),
                            self.spread(self.output_len, &mut rng),
                        )
                    })
                    .collect();
                lens.into_iter()
                    .enumerate()
                    .map(|(i, (input, output))| BenchRequest {
                        system: None,
                        prompt: random_prompt(tokenizer, i, input, &mut rng),
                        prompt_tokens: input,
                        max_tokens: output,
                        shared_prefix: None,
                    })
                    .collect()
            }
            Dataset::Prompts(lines) => (0..count)
                .map(|i| {
                    let prompt = lines[i % lines.len()].clone();
                    BenchRequest {
                        system: None,
                        prompt_tokens: count_tokens(&prompt),
                        prompt,
                        max_tokens: self.output_len,
                        shared_prefix: None,
                    }
                })
                .collect(),
            Dataset::ShareGpt(pairs) => {
                // A seeded shuffle, then in turn (again from the start when count is larger).
                let mut order: Vec<usize> = (0..pairs.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                (0..count)
                    .map(|i| {
                        let (prompt, reply) = &pairs[order[i % order.len()]];
                        let max_tokens = if self.fixed_output_len {
                            self.output_len
                        } else {
                            count_tokens(reply).max(1)
                        };
                        BenchRequest {
                            system: None,
                            prompt: prompt.clone(),
                            prompt_tokens: count_tokens(prompt),
                            max_tokens,
                            shared_prefix: None,
                        }
                    })
                    .collect()
            }
            Dataset::Prefix {
                num_prefixes,
                prefix_len,
            } => {
                let prefixes: Vec<String> = (0..*num_prefixes)
                    .map(|i| random_prompt(tokenizer, usize::MAX - i, *prefix_len, &mut rng))
                    .collect();
                (0..count)
                    .map(|i| {
                        let input = self.spread(self.input_len, &mut rng);
                        BenchRequest {
                            system: Some(prefixes[i % prefixes.len()].clone()),
                            prompt: random_prompt(tokenizer, i, input, &mut rng),
                            prompt_tokens: prefix_len + input,
                            max_tokens: self.spread(self.output_len, &mut rng),
                            shared_prefix: Some((i % prefixes.len(), *prefix_len)),
                        }
                    })
                    .collect()
            }
        }
    }

    /// `len`, drawn uniformly within +-range_ratio of it.
    fn spread(&self, len: usize, rng: &mut Rng) -> usize {
        let spread = (len as f64 * self.range_ratio).round() as i64;
        let offset = if spread > 0 {
            (rng.next_u64() % (2 * spread as u64 + 1)) as i64 - spread
        } else {
            0
        };
        (len as i64 + offset).max(1) as usize
    }
}

/// About `len` tokens of text: random vocabulary tokens decoded (no special or added
/// tokens) when a tokenizer is at hand, else a sentence repeated after a random number
/// and the index, which keep prompts (of other runs and seeds too) from sharing a
/// cached prefix.
fn random_prompt(tokenizer: Option<&Tokenizer>, index: usize, len: usize, rng: &mut Rng) -> String {
    match tokenizer {
        Some(t) => {
            let vocab = t.base_vocab_size() as u64;
            let ids: Vec<u32> = (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect();
            t.decode(&ids, true).unwrap_or_default()
        }
        None => format!(
            "{:08x} {index} {}",
            rng.next_u64() as u32,
            "hello world ".repeat(len.saturating_sub(2).div_ceil(2))
        ),
    }
}

/// Random prompts of exactly each request's `prompt_tokens` token ids below `vocab`,
/// for driving an engine directly (no tokenizer needed); requests that share a prefix
/// start with the same ids.
pub fn random_prompt_ids(vocab: usize, requests: &[BenchRequest], seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::seeded(seed ^ 0x006f_6666_6c69_6e65);
    let mut prefixes: std::collections::HashMap<usize, Vec<u32>> = Default::default();
    requests
        .iter()
        .map(|r| {
            let mut ids = match r.shared_prefix {
                Some((which, len)) => prefixes
                    .entry(which)
                    .or_insert_with(|| {
                        let mut own =
                            Rng::seeded(seed ^ 0x7072_6566_6978 ^ (which as u64 + 1).wrapping_mul(0x9e37_79b9));
                        (0..len).map(|_| (own.next_u64() % vocab as u64) as u32).collect()
                    })
                    .clone(),
                None => Vec::new(),
            };
            let rest = r.prompt_tokens.saturating_sub(ids.len());
            ids.extend((0..rest).map(|_| (rng.next_u64() % vocab as u64) as u32));
            ids
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dataset: Dataset) -> WorkloadSpec {
        WorkloadSpec {
            dataset,
            input_len: 8,
            output_len: 5,
            fixed_output_len: false,
            range_ratio: 0.0,
        }
    }

    #[test]
    fn sharegpt_takes_first_user_turns_and_reply_lengths() {
        let json = r#"[
            {"id": "a", "conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "a b c d e f"}]},
            {"id": "b", "conversations": [{"from": "gpt", "value": "no user first"}, {"from": "human", "value": "x"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "lonely"}]},
            {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
        ]"#;
        let data = Dataset::sharegpt(json).unwrap();
        let Dataset::ShareGpt(pairs) = &data else { panic!() };
        assert_eq!(pairs.len(), 2);
        let requests = spec(data.clone()).requests(None, 4, 7);
        // Seeded: the same requests again; each pair used twice.
        assert_eq!(requests, spec(data.clone()).requests(None, 4, 7));
        let mut by_prompt: Vec<(String, usize)> = requests.iter().map(|r| (r.prompt.clone(), r.max_tokens)).collect();
        by_prompt.sort();
        assert_eq!(
            by_prompt,
            vec![
                ("hi there".into(), 1),
                ("hi there".into(), 1),
                ("one two three".into(), 6),
                ("one two three".into(), 6),
            ]
        );
        let fixed = WorkloadSpec {
            fixed_output_len: true,
            ..spec(data)
        };
        assert!(fixed.requests(None, 3, 1).iter().all(|r| r.max_tokens == 5));
        assert!(Dataset::sharegpt("{}").is_err());
        assert!(Dataset::sharegpt("[{\"conversations\": []}]").is_err());
    }

    #[test]
    fn prefix_workload_shares_system_prompts_in_turn() {
        let data = Dataset::Prefix {
            num_prefixes: 3,
            prefix_len: 40,
        };
        let requests = spec(data).requests(None, 9, 1);
        let systems: Vec<&str> = requests.iter().map(|r| r.system.as_deref().unwrap()).collect();
        assert_eq!(systems[0], systems[3]);
        assert_eq!(systems[1], systems[7]);
        assert_ne!(systems[0], systems[1]);
        assert_ne!(systems[1], systems[2]);
        // The questions all differ, and the count includes the shared part.
        let mut prompts: Vec<&str> = requests.iter().map(|r| r.prompt.as_str()).collect();
        prompts.sort();
        prompts.dedup();
        assert_eq!(prompts.len(), 9);
        assert!(requests.iter().all(|r| r.prompt_tokens == 48));
        // Driving an engine: token ids, the shared ones first.
        let ids = random_prompt_ids(1000, &requests, 3);
        assert!(ids.iter().all(|p| p.len() == 48));
        assert_eq!(ids[0][..40], ids[3][..40]);
        assert_ne!(ids[0][..40], ids[1][..40]);
        assert_ne!(ids[0][40..], ids[3][40..]);
    }
}
