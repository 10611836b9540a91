//! A stand-in for the Hugging Face Hub on 127.0.0.1, serving repositories from local
//! folders through the hub's file API: `GET /api/models/{repo}/revision/{rev}` (commit
//! and file list), `HEAD|GET /{repo}/resolve/{rev}/{file}` (regular files answer
//! directly with an ETag; safetensors answer like LFS files, a redirect carrying
//! X-Linked-Etag / X-Linked-Size), and the redirect target, with Range support.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct HubRepo {
    pub id: String,
    pub commit: String,
    pub dir: PathBuf,
    /// Listed and described (HEAD), but a GET answers 404: a file lost mid-download.
    pub gone: Vec<String>,
}

struct Served {
    repos: Vec<HubRepo>,
    etags: HashMap<(String, String), String>,
    log: Mutex<Vec<String>>,
}

pub struct FakeHub {
    pub url: String,
    served: Arc<Served>,
}

/// FNV-1a of the contents, as hex: a stable, unique-enough blob name for tests.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in bytes.chunks(8) {
        for &b in chunk {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}{:016x}", bytes.len())
}

impl FakeHub {
    pub fn start(repos: Vec<HubRepo>) -> FakeHub {
        let mut etags = HashMap::new();
        for repo in &repos {
            for entry in std::fs::read_dir(&repo.dir).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    etags.insert((repo.id.clone(), name), etag(&std::fs::read(entry.path()).unwrap()));
                }
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(Served {
            repos,
            etags,
            log: Mutex::new(Vec::new()),
        });
        let shared = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let served = shared.clone();
                std::thread::spawn(move || {
                    let _ = handle(&served, stream);
                });
            }
        });
        FakeHub { url, served }
    }

    /// The blob name a file will have in the cache.
    pub fn etag(&self, repo: &str, file: &str) -> String {
        self.served.etags[&(repo.to_owned(), file.to_owned())].clone()
    }

    /// `METHOD path [range]` of every request so far.
    pub fn log(&self) -> Vec<String> {
        self.served.log.lock().unwrap().clone()
    }
}

fn handle(served: &Served, mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut range_from = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((k, v)) = header.trim_end().split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range_from = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|r| r.trim_end_matches('-').parse::<u64>().ok());
            }
        }
    }
    served.log.lock().unwrap().push(match range_from {
        Some(r) => format!("{method} {path} bytes={r}-"),
        None => format!("{method} {path}"),
    });
    let respond = |stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !headers.iter().any(|(k, _)| *k == "content-length") {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        if method != "HEAD" {
            stream.write_all(body)?;
        }
        Ok::<_, std::io::Error>(())
    };
    let not_found =
        |stream: &mut TcpStream| respond(stream, "404 Not Found", &[], b"{\"error\":\"Repository not found\"}");
    let find = |id: &str| served.repos.iter().find(|r| r.id == id);

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((id, rev)) = rest.split_once("/revision/") else {
            return not_found(&mut stream);
        };
        let Some(repo) = find(id).filter(|r| rev == "main" || rev == r.commit) else {
            return not_found(&mut stream);
        };
        let mut files: Vec<String> = served
            .etags
            .keys()
            .filter(|(r, _)| *r == repo.id)
            .map(|(_, f)| f.clone())
            .collect();
        files.sort();
        let siblings: Vec<serde_json::Value> = files.iter().map(|f| serde_json::json!({"rfilename": f})).collect();
        let body = serde_json::json!({"id": repo.id, "sha": repo.commit, "siblings": siblings}).to_string();
        return respond(
            &mut stream,
            "200 OK",
            &[("content-type", "application/json".into())],
            body.as_bytes(),
        );
    }
    // /{org}/{name}/resolve/{rev}/{file} and the LFS redirect target /lfs/{org}/{name}/{file}
    let (id, file, lfs_target) = if let Some(rest) = path.strip_prefix("/lfs/") {
        let (id, file) = rest.rsplit_once('/').unwrap_or(("", ""));
        (id.to_owned(), file.to_owned(), true)
    } else if let Some((id, rest)) = path[1..].split_once("/resolve/") {
        let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
        (id.to_owned(), file.to_owned(), false)
    } else {
        return not_found(&mut stream);
    };
    let Some(repo) = find(&id) else {
        return not_found(&mut stream);
    };
    let Some(tag) = served.etags.get(&(id.clone(), file.clone())) else {
        return not_found(&mut stream);
    };
    let source = repo.dir.join(&file);
    let size = std::fs::metadata(&source)?.len();
    let commit = ("x-repo-commit", repo.commit.clone());
    if file.ends_with(".safetensors") && !lfs_target {
        let headers = [
            ("location", format!("/lfs/{id}/{file}")),
            ("x-linked-etag", format!("\"{tag}\"")),
            ("x-linked-size", size.to_string()),
            commit,
        ];
        return respond(&mut stream, "302 Found", &headers, b"");
    }
    if method == "GET" && repo.gone.contains(&file) {
        return not_found(&mut stream);
    }
    let from = range_from.unwrap_or(0).min(size);
    let mut body = Vec::new();
    if method == "GET" {
        let mut f = std::fs::File::open(&source)?;
        f.seek(SeekFrom::Start(from))?;
        f.read_to_end(&mut body)?;
    }
    let mut headers = vec![
        ("etag", format!("\"{tag}\"")),
        commit,
        ("content-length", (size - from).to_string()),
    ];
    let status = if range_from.is_some() {
        headers.push((
            "content-range",
            format!("bytes {from}-{}/{size}", size.saturating_sub(1)),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    respond(&mut stream, status, &headers, &body)
}
