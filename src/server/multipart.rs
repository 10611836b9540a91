//! `multipart/form-data` (RFC 7578) over a body already read into memory: the boundary
//! from the content type, then each part's `Content-Disposition` name (and filename) and
//! bytes. Malformed input is an error with a reason, never a panic; part counts and
//! header sizes are bounded.

/// One form field or file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    /// Set for file uploads.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

const MAX_PARTS: usize = 64;
const MAX_PART_HEADER_BYTES: usize = 8 * 1024;

/// The boundary of a `multipart/form-data` content type, `None` for any other type.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (key, value) = p.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        (!value.is_empty() && value.len() <= 200).then(|| value.to_owned())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > haystack.len() || needle.is_empty() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// Splits a body into its parts.
pub fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut at = find(body, delimiter, 0).ok_or("the body has no multipart boundary")? + delimiter.len();
    let mut parts = Vec::new();
    loop {
        // After a delimiter: `--` ends the body, else CRLF starts a part.
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding (spaces, tabs) may follow a delimiter.
        while matches!(body.get(at), Some(b' ' | b'\t')) {
            at += 1;
        }
        if !body[at..].starts_with(b"\r\n") {
            return Err("a multipart boundary is not followed by a line break".into());
        }
        at += 2;
        if parts.len() == MAX_PARTS {
            return Err(format!("more than {MAX_PARTS} multipart fields"));
        }
        let header_end = find(body, b"\r\n\r\n", at)
            .filter(|&e| e - at <= MAX_PART_HEADER_BYTES)
            .ok_or("a multipart part has no end to its headers (or headers over 8 KiB)")?;
        let headers = std::str::from_utf8(&body[at..header_end]).map_err(|_| "multipart part headers are not UTF-8")?;
        let mut name = None;
        let mut filename = None;
        let mut content_type = None;
        for line in headers.split("\r\n") {
            let (key, value) = line.split_once(':').ok_or("a multipart header line has no `:`")?;
            if key.trim().eq_ignore_ascii_case("content-disposition") {
                let mut items = value.split(';');
                if !items.next().is_some_and(|d| d.trim().eq_ignore_ascii_case("form-data")) {
                    return Err("a multipart part is not `form-data`".into());
                }
                for item in items {
                    let Some((k, v)) = item.split_once('=') else { continue };
                    let v = v.trim();
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                    match k.trim().to_ascii_lowercase().as_str() {
                        "name" => name = Some(v.to_owned()),
                        "filename" => filename = Some(v.to_owned()),
                        _ => {}
                    }
                }
            } else if key.trim().eq_ignore_ascii_case("content-type") {
                content_type = Some(value.trim().to_owned());
            }
        }
        let name = name.ok_or("a multipart part has no `name` in its Content-Disposition")?;
        let data_start = header_end + 4;
        let mut closing = b"\r\n".to_vec();
        closing.extend_from_slice(delimiter);
        let data_end = find(body, &closing, data_start).ok_or("the multipart body ends inside a part")?;
        parts.push(Part {
            name,
            filename,
            content_type,
            data: body[data_start..data_end].to_vec(),
        });
        at = data_end + closing.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_files() {
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--\x00\r\n--XyZ--\r\n";
        let parts = parse(body, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), parts[0].data.as_slice()),
            ("model", &b"whisper"[..])
        );
        assert_eq!(parts[1].filename.as_deref(), Some("a.wav"));
        assert_eq!(parts[1].content_type.as_deref(), Some("audio/wav"));
        assert_eq!(parts[1].data, b"RIFF\r\n--\x00");
        assert_eq!(
            boundary("multipart/form-data; boundary=\"XyZ\"").as_deref(),
            Some("XyZ")
        );
        assert_eq!(boundary("application/json"), None);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in [
            &b""[..],
            b"--b",
            b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nno end",
            b"--b\r\nno colon\r\n\r\nx\r\n--b--",
            b"--b\r\nContent-Disposition: attachment; name=\"x\"\r\n\r\nx\r\n--b--",
            b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
            b"--bXX",
        ] {
            assert!(parse(body, "b").is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&body, "b");
            let mut framed = b"--b\r\n".to_vec();
            framed.extend_from_slice(&body);
            let _ = parse(&framed, "b");
        }
    }
}
