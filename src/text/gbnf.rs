//! GBNF (llama.cpp's grammar format, what vLLM's `grammar` examples use) rewritten as the
//! Lark dialect llguidance reads: `name ::= ...` rules become `name: ...` on one line,
//! `[...]` classes and `.` become regex terminals, strings are re-quoted as JSON, and
//! rule names are mapped injectively onto Lark's lowercase names (`root` is `start`).

use std::fmt::Write;

/// Whether `source` is meant as GBNF rather than Lark: it uses GBNF's `::=` (which Lark
/// has no use for; a malformed GBNF grammar still gets GBNF's error messages).
pub fn looks_like_gbnf(source: &str) -> bool {
    source.contains("::=")
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Defines,
    /// A string literal's decoded text.
    Literal(String),
    /// A character class, as a Rust regex class with every character escaped.
    Class(String),
    Any,
    /// `( ) | * + ?` and a whole `{m,n}` repetition.
    Punct(String),
}

/// Converts a GBNF grammar to Lark, or says what is wrong with it.
pub fn gbnf_to_lark(source: &str) -> Result<String, String> {
    let tokens = tokenize(source)?;
    let mut out = String::new();
    let mut i = 0;
    let mut rules = 0;
    while i < tokens.len() {
        let (Token::Name(name), Some(Token::Defines)) = (&tokens[i], tokens.get(i + 1)) else {
            return Err(format!(
                "expected a rule definition (`name ::= ...`), found {}",
                describe(&tokens[i])
            ));
        };
        i += 2;
        let start = i;
        while i < tokens.len() && !(matches!(tokens[i], Token::Name(_)) && tokens.get(i + 1) == Some(&Token::Defines)) {
            i += 1;
        }
        if start == i {
            return Err(format!("rule `{name}` has an empty body"));
        }
        write!(out, "{}:", lark_name(name)).unwrap();
        for token in &tokens[start..i] {
            out.push(' ');
            match token {
                Token::Name(n) => out.push_str(&lark_name(n)),
                Token::Literal(text) => out.push_str(&serde_json::to_string(text).unwrap()),
                Token::Class(class) => write!(out, "/{}/", class.replace('/', "\\/")).unwrap(),
                Token::Any => out.push_str("/(?s:.)/"),
                Token::Punct(p) => out.push_str(p),
                // A rule body stops before `name ::=`; a `::=` after anything else is
                // misplaced.
                Token::Defines => return Err(format!("rule `{name}`: `::=` must follow a rule name")),
            }
        }
        out.push('\n');
        rules += 1;
    }
    if rules == 0 {
        return Err("the grammar has no rules".into());
    }
    let defined: Vec<&str> = tokens
        .windows(2)
        .filter_map(|w| match w {
            [Token::Name(n), Token::Defines] => Some(n.as_str()),
            _ => None,
        })
        .collect();
    if !defined.contains(&"root") {
        return Err("the grammar has no `root` rule".into());
    }
    if let Some(undefined) = tokens.iter().find_map(|t| match t {
        Token::Name(n) if !defined.contains(&n.as_str()) => Some(n),
        _ => None,
    }) {
        return Err(format!("rule `{undefined}` is used but never defined"));
    }
    Ok(out)
}

fn describe(token: &Token) -> String {
    match token {
        Token::Name(n) => format!("`{n}`"),
        Token::Defines => "`::=`".into(),
        Token::Literal(s) => format!("the string {s:?}"),
        Token::Class(c) => format!("`{c}`"),
        Token::Any => "`.`".into(),
        Token::Punct(p) => format!("`{p}`"),
    }
}

/// GBNF names are `[a-zA-Z0-9_-]+`; Lark rules are lowercase. `root` is Lark's `start`;
/// every other name is prefixed (so none can be `start`) and escaped one to one.
fn lark_name(name: &str) -> String {
    if name == "root" {
        return "start".into();
    }
    let mut out = String::from("r_");
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' => out.push(c),
            '_' => out.push_str("__"),
            '-' => out.push_str("_d"),
            'A'..='Z' => {
                out.push_str("_u");
                out.push(c.to_ascii_lowercase());
            }
            _ => unreachable!("names are checked by the tokenizer"),
        }
    }
    out
}

fn tokenize(source: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ':' if chars[i..].starts_with(&[':', ':', '=']) => {
                tokens.push(Token::Defines);
                i += 3;
            }
            '"' => {
                let (text, next) = literal(&chars, i + 1)?;
                tokens.push(Token::Literal(text));
                i = next;
            }
            '[' => {
                let (class, next) = class(&chars, i + 1)?;
                tokens.push(Token::Class(class));
                i = next;
            }
            '.' => {
                tokens.push(Token::Any);
                i += 1;
            }
            '(' | ')' | '|' | '*' | '+' | '?' => {
                tokens.push(Token::Punct(c.to_string()));
                i += 1;
            }
            '{' => {
                let start = i;
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                if i == chars.len() {
                    return Err("a repetition `{` is never closed".into());
                }
                i += 1;
                let body: String = chars[start + 1..i - 1].iter().filter(|c| !c.is_whitespace()).collect();
                let valid = !body.is_empty()
                    && body.split(',').count() <= 2
                    && body.chars().all(|c| c.is_ascii_digit() || c == ',')
                    && !body.starts_with(',');
                if !valid {
                    return Err(format!(
                        "`{{{body}}}` is not a repetition (`{{m}}`, `{{m,}}` or `{{m,n}}`)"
                    ));
                }
                tokens.push(Token::Punct(format!("{{{body}}}")));
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-') {
                    i += 1;
                }
                tokens.push(Token::Name(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character {other:?} in the grammar")),
        }
    }
    Ok(tokens)
}

/// A character class from just after its `[`, as a Rust regex class in which every
/// character is escaped (GBNF's `[[(]` or `[a&&b]` are plain characters, not Rust's
/// nested classes and set operations); returns it and the index after the `]`.
fn class(chars: &[char], mut i: usize) -> Result<(String, usize), String> {
    let mut out = String::from("[");
    if chars.get(i) == Some(&'^') {
        out.push('^');
        i += 1;
    }
    let mut items = 0;
    loop {
        let (c, next) = match chars.get(i) {
            None => return Err("a character class `[` is never closed".into()),
            Some(']') => break,
            Some('\\') => escaped_char(chars, i + 1)?,
            Some(&c) => (c, i + 1),
        };
        i = next;
        out.push_str(&regex_syntax::escape(&c.to_string()));
        // A range `a-z` (a `-` just before the `]` is a plain `-`).
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']') {
            let (end, next) = match chars[i + 1] {
                '\\' => escaped_char(chars, i + 2)?,
                e => (e, i + 2),
            };
            if end < c {
                return Err(format!("the class range `{c}-{end}` is out of order"));
            }
            out.push('-');
            out.push_str(&regex_syntax::escape(&end.to_string()));
            i = next;
        }
        items += 1;
    }
    if items == 0 {
        return Err("an empty character class `[]` matches nothing".into());
    }
    out.push(']');
    Ok((out, i + 1))
}

/// The character an escape stands for, from just after its `\`; returns it and the
/// index after the escape. llama.cpp's escapes.
fn escaped_char(chars: &[char], i: usize) -> Result<(char, usize), String> {
    let esc = *chars.get(i).ok_or("the grammar ends in `\\`")?;
    let hex = |n: usize| -> Result<(char, usize), String> {
        let digits: String = chars.get(i + 1..i + 1 + n).ok_or("a short escape")?.iter().collect();
        u32::from_str_radix(&digits, 16)
            .ok()
            .and_then(char::from_u32)
            .map(|c| (c, i + 1 + n))
            .ok_or_else(|| format!("`\\{esc}{digits}` is not a character"))
    };
    match esc {
        'n' => Ok(('\n', i + 1)),
        't' => Ok(('\t', i + 1)),
        'r' => Ok(('\r', i + 1)),
        'x' => hex(2),
        'u' => hex(4),
        'U' => hex(8),
        '\\' | '"' | '[' | ']' | '-' | '^' => Ok((esc, i + 1)),
        other => Err(format!("unknown escape `\\{other}`")),
    }
}

/// A string literal's text from just after its opening quote; returns it and the index
/// after the closing quote. Escapes as llama.cpp reads them.
fn literal(chars: &[char], mut i: usize) -> Result<(String, usize), String> {
    let mut text = String::new();
    loop {
        match chars.get(i) {
            None => return Err("a string literal is never closed".into()),
            Some('"') => return Ok((text, i + 1)),
            Some('\\') => {
                let (c, next) = escaped_char(chars, i + 1).map_err(|e| format!("{e} in a string literal"))?;
                text.push(c);
                i = next;
            }
            Some(&c) => {
                text.push(c);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_one_line_lark_rules() {
        let gbnf = "# a comment\nroot ::= greeting (\" \" Name-2)?\ngreeting ::= \"hi\\n\" | [a-c]+ .\nName-2 ::= [^\\]/]{1,3}\n";
        let lark = gbnf_to_lark(gbnf).unwrap();
        assert_eq!(
            lark,
            "start: r_greeting ( \" \" r__uname_d2 ) ?\nr_greeting: \"hi\\n\" | /[a-c]/ + /(?s:.)/\nr__uname_d2: /[^\\]\\/]/ {1,3}\n"
        );
        assert!(looks_like_gbnf(gbnf));
        // Class characters are characters: no nested classes or set operations.
        assert_eq!(
            gbnf_to_lark("root ::= [[(] [a&&b-] [\\x41-\\u0043]").unwrap(),
            "start: /[\\[\\(]/ /[a\\&\\&b\\-]/ /[A-C]/\n"
        );
        assert!(!looks_like_gbnf("start: \"a\" | b"));
    }

    #[test]
    fn malformed_grammars_say_what_is_wrong() {
        for (gbnf, says) in [
            ("root ::= \"a", "never closed"),
            ("root ::= [a-", "never closed"),
            ("root ::= \"a\"{x}", "not a repetition"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("x ::= \"a\"", "no `root`"),
            ("root ::=", "empty body"),
            ("\"a\" root ::= b", "expected a rule definition"),
            ("root ::= a ; b", "unexpected character"),
            ("root ::= foo", "`foo` is used but never defined"),
            ("root ::= []", "empty character class"),
            ("root ::= [z-a]", "out of order"),
            ("root ::= ::=", "`::=` must follow a rule name"),
            ("root ::= \"a\" | ::= b", "`::=` must follow a rule name"),
        ] {
            let err = gbnf_to_lark(gbnf).unwrap_err();
            assert!(err.contains(says), "{gbnf:?}: {err}");
        }
    }
}
