//! Quantities people write in flags: durations (`500ms`, `90s`, `15m`, `12h`, `30d`).

use std::time::Duration;

/// Reads a positive duration: a number with a unit (`ms`, `s`, `m`, `h`, `d`), or a bare
/// number in `bare_unit`. Errors say what was wrong, without naming the flag.
pub fn parse_duration(text: &str, bare_unit: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, bare_unit),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (500ms, 1.5s, 15m, 12h, 30d)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("`{text}`: the unit is ms, s, m, h or d")),
    };
    let secs = value * scale;
    if !(secs > 0.0 && secs <= 1e10) {
        return Err(format!("`{text}` is not a positive duration (at most 10^10 s)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_units_or_the_bare_one() {
        assert_eq!(parse_duration("30d", "s"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("90", "s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("200", "ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1.5s", "ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 250ms ", "s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.5ms", "s"), Ok(Duration::from_micros(500)));
        for bad in ["0s", "-1s", "3w", "x", "", "1e99d"] {
            assert!(parse_duration(bad, "s").is_err(), "{bad}");
        }
    }
}
