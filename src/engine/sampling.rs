//! Choosing the next token from logits. Greedy for now; the full sampler (temperature,
//! top-k/p, min-p, penalties, seeds) lives here too once the engine needs it.

/// Index of the largest logit; the lowest index wins a tie, as `torch.argmax` does.
/// NaN logits are never chosen.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_the_first_of_equal_maxima_and_skips_nan() {
        assert_eq!(argmax(&[0.5, 2.0, f32::NAN, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -3.0]), 1);
    }
}
