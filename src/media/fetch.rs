//! Media that a request names by URL (`image_url.url`): `data:` URLs decoded, others
//! fetched under a policy: only `http` and `https`; no fetching at all when remote media is turned off; a size limit
//! read as the body arrives; one deadline for the whole exchange; few redirects. Every
//! address a host name resolves to (on each redirect too) is checked before any
//! connection is made: loopback, private, link-local, shared, documentation, multicast
//! and other non-global ranges are refused unless the policy allows private addresses,
//! and the connection then goes to the checked addresses, so a second lookup cannot
//! swap in another one (DNS rebinding). No proxy from the environment is used, since a
//! proxy would make the address check moot. Blocking: call it off the async reactor.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Fetch `http(s)` URLs at all.
    pub enabled: bool,
    /// Allow loopback, private and other non-global addresses.
    pub allow_private: bool,
    /// Largest body accepted, in bytes.
    pub max_bytes: u64,
    /// Deadline for the whole fetch (lookup, connection, redirects, body).
    pub timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            enabled: true,
            allow_private: false,
            max_bytes: 20 << 20,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FetchError {
    #[error("fetching remote media is turned off on this server; send the data inline as a data: URL")]
    Disabled,
    #[error("unsupported URL `{0}`: use an http(s) URL or a data: URL (file paths are never read)")]
    Scheme(String),
    // The address is not told to the client (it would map internal names); the server
    // logs it.
    #[error("`{host}` resolves to a {kind} address; such URLs are refused")]
    Refused {
        host: String,
        addr: IpAddr,
        kind: &'static str,
    },
    #[error("the URL's host could not be resolved")]
    NotFound,
    #[error("the media is larger than {0} bytes")]
    TooLarge(u64),
    #[error("fetching the media took longer than {0:?}")]
    Timeout(Duration),
    #[error("the server answered {0}")]
    Status(u16),
    #[error("fetching the media failed: {0}")]
    Failed(String),
    #[error("malformed data: URL: {0}")]
    DataUrl(String),
}

/// A `data:` URL's media type (lower case; `text/plain` when absent, as RFC 2397 says)
/// and its bytes. Base64 payloads (padding optional) and percent-encoded ones are read;
/// `max_bytes` bounds the decoded size.
pub fn parse_data_url(url: &str, max_bytes: u64) -> Result<(String, Vec<u8>), FetchError> {
    let bad = |why: &str| FetchError::DataUrl(why.to_owned());
    let rest = url
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case("data:"))
        .map(|_| &url[5..])
        .ok_or_else(|| bad("it does not start with `data:`"))?;
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| bad("no `,` between the media type and the data"))?;
    let mut params = header.split(';');
    let media_type = params.next().unwrap_or_default().trim().to_ascii_lowercase();
    let base64 = params.any(|p| p.trim().eq_ignore_ascii_case("base64"));
    let media_type = if media_type.is_empty() {
        "text/plain".to_owned()
    } else {
        media_type
    };
    let bytes = if base64 {
        // Decoded size known up front: refuse before decoding.
        if (payload.len() as u64 / 4) * 3 > max_bytes + 3 {
            return Err(FetchError::TooLarge(max_bytes));
        }
        use base64::Engine as _;
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        engine
            .decode(payload.trim())
            .map_err(|e| FetchError::DataUrl(format!("the base64 data is invalid ({e})")))?
    } else {
        percent_decode(payload).ok_or_else(|| bad("a `%` escape is not two hex digits"))?
    };
    if bytes.len() as u64 > max_bytes {
        return Err(FetchError::TooLarge(max_bytes));
    }
    Ok((media_type, bytes))
}

fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The bytes a media URL names: a `data:` URL's payload, or an `http(s)` URL fetched
/// under `policy` (its size limit applies to both). Any other URL is refused.
pub fn media_bytes(url: &str, policy: &FetchPolicy) -> Result<Vec<u8>, FetchError> {
    if url.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:")) {
        return parse_data_url(url, policy.max_bytes).map(|(_, bytes)| bytes);
    }
    fetch(url, policy)
}

/// The kind of a non-global address (`None` for a global one, which may be fetched).
pub fn non_global_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (100, 64..=127, _) => "shared (carrier-grade NAT)",
        (192, 0, 0) => "IETF protocol",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (192, 88, 99) => "6to4 relay",
        _ if ip.is_multicast() => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    // Addresses that carry an IPv4 address are judged by it.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_kind(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    Some(match segments {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        // ::a.b.c.d: deprecated IPv4-compatible addresses, never fetched.
        [0, 0, 0, 0, 0, 0, _, _] => "IPv4-compatible (deprecated)",
        // NAT64 64:ff9b::a.b.c.d reaches the IPv4 address it carries.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return v4_kind(embedded(hi, lo)),
        // 6to4 2002:a.b.c.d::/48.
        [0x2002, hi, lo, ..] => return v4_kind(embedded(hi, lo)),
        [0x64, 0xff9b, 1, ..] => "NAT64 local-use",
        [0x100, 0, 0, 0, ..] => "discard-only",
        [0x2001, 0..=0x1ff, ..] => "IETF protocol (Teredo, ORCHID, benchmarking)",
        [0x2001, 0xdb8, ..] | [0x3fff, 0..=0xfff, ..] => "documentation",
        // The rest of ::/8 (IPv4-translated ::ffff:0:a.b.c.d and other reserved space).
        [0, ..] => "reserved (::/8)",
        [s, ..] if s & 0xfe00 == 0xfc00 => "unique local (private)",
        [s, ..] if s & 0xffc0 == 0xfe80 => "link-local",
        [s, ..] if s & 0xffc0 == 0xfec0 => "site-local",
        [s, ..] if s & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

/// Fetches `url` under `policy`.
pub fn fetch(url: &str, policy: &FetchPolicy) -> Result<Vec<u8>, FetchError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        let shown: String = url.chars().take(64).collect();
        return Err(FetchError::Scheme(shown));
    }
    if !policy.enabled {
        return Err(FetchError::Disabled);
    }
    fetch_checked(url, policy)
}

#[cfg(feature = "download")]
fn fetch_checked(url: &str, policy: &FetchPolicy) -> Result<Vec<u8>, FetchError> {
    use std::io::Read;

    let config = ureq::Agent::config_builder()
        .timeout_global(Some(policy.timeout))
        .max_redirects(3)
        .proxy(None)
        .http_status_as_error(false)
        .user_agent(concat!("inferd/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        CheckedResolver {
            allow_private: policy.allow_private,
        },
    );
    let response = agent.get(url).call().map_err(|e| fetch_error(e, policy))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(FetchError::Status(status));
    }
    let mut body = response.into_body();
    if body.content_length().is_some_and(|n| n > policy.max_bytes) {
        return Err(FetchError::TooLarge(policy.max_bytes));
    }
    let mut bytes = Vec::new();
    body.as_reader()
        .take(policy.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| match e.downcast::<ureq::Error>() {
            Ok(e) => fetch_error(e, policy),
            Err(e) => FetchError::Failed(e.to_string()),
        })?;
    if bytes.len() as u64 > policy.max_bytes {
        return Err(FetchError::TooLarge(policy.max_bytes));
    }
    Ok(bytes)
}

#[cfg(not(feature = "download"))]
fn fetch_checked(_url: &str, _policy: &FetchPolicy) -> Result<Vec<u8>, FetchError> {
    Err(FetchError::Failed(
        "this build has no HTTP client (feature `download`)".into(),
    ))
}

#[cfg(feature = "download")]
fn fetch_error(e: ureq::Error, policy: &FetchPolicy) -> FetchError {
    match e {
        ureq::Error::Other(inner) => match inner.downcast::<FetchError>() {
            Ok(refused) => *refused,
            Err(other) => FetchError::Failed(other.to_string()),
        },
        ureq::Error::Timeout(_) => FetchError::Timeout(policy.timeout),
        ureq::Error::HostNotFound => FetchError::NotFound,
        ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge(policy.max_bytes),
        ureq::Error::StatusCode(status) => FetchError::Status(status),
        e => FetchError::Failed(e.to_string()),
    }
}

/// The system resolver, then the address check: a host with any refused address is
/// refused whole (the connection could go to any of them).
#[cfg(feature = "download")]
#[derive(Debug)]
struct CheckedResolver {
    allow_private: bool,
}

#[cfg(feature = "download")]
impl ureq::unversioned::resolver::Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = ureq::unversioned::resolver::DefaultResolver::default().resolve(uri, config, timeout)?;
        if !self.allow_private {
            for addr in addrs.iter() {
                if let Some(kind) = non_global_kind(addr.ip()) {
                    let host = uri.host().unwrap_or_default().to_owned();
                    return Err(ureq::Error::Other(Box::new(FetchError::Refused {
                        host,
                        addr: addr.ip(),
                        kind,
                    })));
                }
            }
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn non_global_addresses_are_told_apart() {
        let refused = [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:0:7f00:1",
            "::ffff:0:808:808",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "3fff::1",
            "100::1",
        ];
        for addr in refused {
            let ip: IpAddr = addr.parse().unwrap();
            assert!(non_global_kind(ip).is_some(), "{addr} should be refused");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "2a00:1450:4007::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ];
        for addr in allowed {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(non_global_kind(ip), None, "{addr} should be allowed");
        }
    }

    #[test]
    fn only_http_urls_and_only_when_enabled() {
        let policy = FetchPolicy::default();
        for url in [
            "file:///etc/passwd",
            "/etc/passwd",
            "../../etc/passwd",
            "ftp://example.com/a.png",
            "gopher://x",
            "",
        ] {
            assert!(matches!(fetch(url, &policy), Err(FetchError::Scheme(_))), "{url}");
        }
        let off = FetchPolicy {
            enabled: false,
            ..FetchPolicy::default()
        };
        assert_eq!(fetch("https://example.com/a.png", &off), Err(FetchError::Disabled));
    }

    #[test]
    fn data_urls_are_read_strictly() {
        let png = b"\x89PNG\r\n\x1a\n";
        assert_eq!(
            parse_data_url("data:image/png;base64,iVBORw0KGgo=", 100),
            Ok(("image/png".to_owned(), png.to_vec()))
        );
        // Padding optional, case-insensitive scheme, parameters before base64.
        assert_eq!(
            parse_data_url("DATA:Image/PNG;name=a.png;base64,iVBORw0KGgo", 100),
            Ok(("image/png".to_owned(), png.to_vec()))
        );
        assert_eq!(
            parse_data_url("data:,a%20b", 100),
            Ok(("text/plain".to_owned(), b"a b".to_vec()))
        );
        for bad in [
            "data:image/png;base64",
            "data:image/png;base64,!!!",
            "data:image/png;base64,iVBO Rw0K",
            "data:,%zz",
            "data:,%4",
            "image/png;base64,iVBORw0KGgo=",
        ] {
            assert!(matches!(parse_data_url(bad, 100), Err(FetchError::DataUrl(_))), "{bad}");
        }
        assert_eq!(
            parse_data_url("data:image/png;base64,iVBORw0KGgo=", 4),
            Err(FetchError::TooLarge(4))
        );
        let huge = format!("data:image/png;base64,{}", "A".repeat(4000));
        assert_eq!(parse_data_url(&huge, 100), Err(FetchError::TooLarge(100)));
        // media_bytes reads data: URLs even when remote fetching is off, and refuses
        // anything that is neither data: nor http(s).
        let off = FetchPolicy {
            enabled: false,
            ..FetchPolicy::default()
        };
        assert_eq!(
            media_bytes("data:image/png;base64,iVBORw0KGgo=", &off),
            Ok(png.to_vec())
        );
        assert_eq!(
            media_bytes("https://example.com/a.png", &off),
            Err(FetchError::Disabled)
        );
        assert!(matches!(media_bytes("/etc/passwd", &off), Err(FetchError::Scheme(_))));
    }

    /// URLs naming or resolving to loopback addresses are refused before any connection:
    /// the listener they name never sees one.
    #[cfg(feature = "download")]
    #[test]
    fn private_addresses_are_refused_before_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let policy = FetchPolicy::default();
        for url in [
            format!("http://127.0.0.1:{port}/a.png"),
            format!("http://localhost:{port}/a.png"),
            format!("HTTP://LOCALHOST:{port}/a.png"),
            format!("http://2130706433:{port}/a.png"),
            format!("http://0x7f000001:{port}/a.png"),
            format!("http://127.1:{port}/a.png"),
            format!("http://user:pw@127.0.0.1:{port}/a.png"),
            format!("https://127.0.0.1:{port}/a.png"),
            format!("http://[::ffff:127.0.0.1]:{port}/a.png"),
        ] {
            match fetch(&url, &policy) {
                // Every spelling of 127.0.0.1 (decimal, hex, short) resolves to it.
                Err(FetchError::Refused { kind, .. }) => assert_eq!(kind, "loopback", "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert_eq!(
            listener.accept().map(|_| ()).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock),
            "a connection was made"
        );
    }

    /// With private addresses allowed (a test server on 127.0.0.1): the body arrives, and
    /// the size limit, the deadline and error statuses hold.
    #[cfg(feature = "download")]
    #[test]
    fn allowed_fetches_keep_their_size_limit_and_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut head = [0u8; 2048];
                let n = stream.read(&mut head).unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                std::thread::spawn(move || match path.as_str() {
                    "/small" => {
                        let _ =
                            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello");
                    }
                    "/big" => {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
                        let _ = stream.write_all(&vec![b'x'; 4096]);
                    }
                    "/slow" => std::thread::sleep(Duration::from_secs(5)),
                    _ => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    }
                });
            }
        });
        let policy = FetchPolicy {
            allow_private: true,
            max_bytes: 1000,
            timeout: Duration::from_millis(500),
            ..FetchPolicy::default()
        };
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
        assert_eq!(fetch(&url("/small"), &policy), Ok(b"hello".to_vec()));
        assert_eq!(fetch(&url("/big"), &policy), Err(FetchError::TooLarge(1000)));
        assert_eq!(fetch(&url("/missing"), &policy), Err(FetchError::Status(404)));
        let start = std::time::Instant::now();
        assert_eq!(
            fetch(&url("/slow"), &policy),
            Err(FetchError::Timeout(Duration::from_millis(500)))
        );
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    }
}
