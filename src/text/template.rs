//! Chat templates rendered with minijinja the way transformers' `apply_chat_template`
//! renders them with Jinja2: `trim_blocks` and `lstrip_blocks`, loop controls, Python
//! string/dict methods (minijinja-contrib pycompat), `raise_exception`, `strftime_now`,
//! a `tojson` that prints like Python's `json.dumps(ensure_ascii=False)`, and Python's
//! spelling of `True`, `False` and `None` when printed.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use super::TextError;

const TEMPLATE_NAME: &str = "chat_template";

/// Special token strings the chat template may refer to.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: SpecialTokens,
    source: String,
}

/// What to render: the conversation and its options, as OpenAI / HF JSON values.
#[derive(Debug, Clone, Copy)]
pub struct ChatInput<'a> {
    /// The list of messages (`role`, `content`, `tool_calls`, ...).
    pub messages: &'a serde_json::Value,
    /// Tool definitions, or `None`.
    pub tools: Option<&'a serde_json::Value>,
    pub add_generation_prompt: bool,
    /// Extra template variables (`enable_thinking`, ...); they override special tokens.
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// Templates are code from a model's files: a render may execute at most this many
/// template instructions (Qwen2.5's template over 10 000 messages takes 315 000; a
/// runaway loop stopped here after 1.4 s on the 2-core test machine).
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// ... and write at most this many bytes (four times the largest JSON body a request
/// may send by default).
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// The render's output, refusing to grow past `MAX_RENDERED_BYTES`.
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
    exceeded: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    pub fn new(source: String, special_tokens: SpecialTokens) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TextError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            special_tokens,
            source,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, input: ChatInput<'_>) -> Result<String, TextError> {
        let mut ctx = serde_json::Map::new();
        let tokens = &self.special_tokens;
        for (name, value) in [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
            ("pad_token", &tokens.pad_token),
            ("unk_token", &tokens.unk_token),
        ] {
            if let Some(v) = value {
                ctx.insert(name.to_owned(), serde_json::Value::String(v.clone()));
            }
        }
        if let Some(kwargs) = input.kwargs {
            for (k, v) in kwargs {
                ctx.insert(k.clone(), v.clone());
            }
        }
        ctx.insert("messages".into(), input.messages.clone());
        ctx.insert("tools".into(), input.tools.cloned().unwrap_or(serde_json::Value::Null));
        ctx.insert("add_generation_prompt".into(), input.add_generation_prompt.into());
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TextError::Template(describe(&e)))?;
        let mut out = BoundedOutput::default();
        // minijinja 2.24 panics on some inputs (reverse-slicing an empty string,
        // `""[::-1]`): a template bug, answered as one.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            template.render_captured_to(Value::from_serialize(&ctx), &mut out)
        }));
        let Ok(rendered) = rendered else {
            return Err(TextError::Template(
                "the chat template failed inside the template engine (minijinja panicked)".into(),
            ));
        };
        match rendered {
            Ok(_) => String::from_utf8(out.bytes).map_err(|e| TextError::Template(e.to_string())),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(TextError::Template(format!(
                "the chat template ran too long (over {TEMPLATE_FUEL} instructions)"
            ))),
            Err(_) if out.exceeded => Err(TextError::Template(format!(
                "the chat template's output is over {} MiB",
                MAX_RENDERED_BYTES >> 20
            ))),
            Err(e) => Err(TextError::Template(describe(&e))),
        }
    }
}

/// The error and its cause chain on one line (minijinja puts details in sources).
fn describe(e: &Error) -> String {
    let mut msg = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_owned(),
        _ => e.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    msg
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Jinja2 prints values with Python's `str()`: `True`, `False`, `None`, floats as
/// `repr(float)`, and lists and dicts as their Python repr (`['a', 1]`, `{'k': None}`).
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            python_repr(&mut text, value)?;
            out.write_str(&text).map_err(Error::from)
        }
        ValueKind::Number if !value.is_integer() => {
            let f = f64::try_from(value.clone())?;
            out.write_str(&python_float_repr(f)).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr()` of a JSON-like value.
fn python_repr(out: &mut String, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
        ValueKind::String => python_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &item)?;
            }
            out.push(']');
        }
        ValueKind::Map | ValueKind::Plain => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &key)?;
                out.push_str(": ");
                python_repr(out, &value.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// `repr(str)`: single quotes unless the text has a single quote and no double quote.
fn python_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, with Python's defaults (`", "` and
/// `": "`, or `","` between items when indenting).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let options = JsonOptions {
        indent,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        separators: match kwargs.get::<Option<Vec<String>>>("separators")? {
            Some(seps) => match <[String; 2]>::try_from(seps) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ))
                }
            },
            None if indent.is_some() => (",".into(), ": ".into()),
            None => (", ".into(), ": ".into()),
        },
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, &options, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOptions {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    /// (between items, between key and value)
    separators: (String, String),
}

fn write_json(out: &mut String, value: &Value, opts: &JsonOptions, depth: usize) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = opts.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => out.push_str(&python_float_repr(f64::try_from(value.clone())?)),
        ValueKind::String => write_json_string(out, value.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.separators.0);
                }
                newline(out, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map | ValueKind::Plain => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.separators.0);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(s) => write_json_string(out, s, opts.ensure_ascii),
                    None => write_json_string(out, &key.to_string(), opts.ensure_ascii),
                }
                out.push_str(&opts.separators.1);
                write_json(out, &value.get_item(key)?, opts, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("cannot serialize {} to JSON", value.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's `json.dumps` string escaping; with `ensure_ascii`, non-ASCII as `\uXXXX`
/// (UTF-16 surrogate pairs above U+FFFF).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `repr(float)` in Python: shortest round-trip digits, `.0` on integral values,
/// exponent form below 1e-4 or from 1e16 on, with at least two exponent digits.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{f:e}"); // e.g. 1e-5, 1.5e20
        let (mantissa, exp) = s.split_once('e').expect("exponent form");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date.
fn strftime_now(format: String) -> Result<String, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(strftime(&format, secs as i64))
}

pub(crate) fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('H') => write!(out, "{:02}", secs_of_day / 3600),
            Some('M') => write!(out, "{:02}", secs_of_day / 60 % 60),
            Some('S') => write!(out, "{:02}", secs_of_day % 60),
            Some('B') => write!(out, "{}", MONTHS[month as usize - 1]),
            Some('b') => write!(out, "{}", &MONTHS[month as usize - 1][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %A %B %%", 1_721_999_109),
            "26 Jul 2024 13:05:09 Friday July %"
        );
    }

    #[test]
    fn a_panic_inside_minijinja_is_a_template_error() {
        let template = ChatTemplate::new("{{ (x | string)[::-1] }}".into(), SpecialTokens::default()).unwrap();
        let messages = serde_json::json!([]);
        let result = template.render(ChatInput {
            messages: &messages,
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        });
        assert!(
            matches!(&result, Err(TextError::Template(m)) if m.contains("panicked")),
            "{result:?}"
        );
    }

    #[test]
    fn floats_print_like_python_repr() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.5), "0.5");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(1.5e20), "1.5e+20");
        assert_eq!(python_float_repr(-2.25), "-2.25");
    }
}
