//! Fetching a model from the Hugging Face Hub (`HF_ENDPOINT`, default the public hub;
//! `HF_TOKEN`; `HF_HUB_OFFLINE=1` turns it off) into the cache layout huggingface_hub
//! writes and reads: `blobs/<etag>`, `snapshots/<commit>/<file>` as relative symlinks to
//! them, and `refs/<revision>`, written last, so a model is only "cached" once complete.
//! Only the files a model needs are fetched; an interrupted file resumes with a Range
//! request from its `.incomplete` blob.
//!
//! A small client of our own over `ureq` (blocking: it runs on the loader thread): the
//! hub API is three requests (the file list, a HEAD per file for its size and etag, the
//! GET), and owning them gives byte progress into `/load_model` events, resumption, and
//! typed errors naming the file, without a second HTTP stack.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::hub::{ModelDir, ModelRef};

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("`{model}` is not in the Hugging Face cache at {cache}, and downloads are off (HF_HUB_OFFLINE)")]
    Offline { model: String, cache: PathBuf },
    #[error("`{model}` was not found on the hub at {endpoint} (no such repository or revision)")]
    NotFound { model: String, endpoint: String },
    #[error("`{model}` is gated or private on the hub: set HF_TOKEN to a token that can read it")]
    Unauthorized { model: String },
    #[error("`{model}` has no config.json and no safetensors weights on the hub: not a model inferd can serve")]
    NotAModel { model: String },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file of the model on the hub.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    /// Path inside the repository.
    pub path: String,
    /// Blob name in the cache: the LFS sha256, or the git blob id.
    pub etag: String,
    pub size: u64,
}

impl RemoteFile {
    /// Weights: the large part, fetched in the `download` stage.
    pub fn is_weights(&self) -> bool {
        self.path.ends_with(".safetensors")
    }
}

/// Whether a repository file is one a model needs (top-level configs, tokenizer and
/// template files, safetensors weights; no other weight formats, no subfolders).
pub fn is_needed(path: &str) -> bool {
    !path.contains('/')
        && (path.ends_with(".json")
            || path.ends_with(".safetensors")
            || path.ends_with(".jinja")
            || matches!(path, "merges.txt" | "vocab.txt" | "tokenizer.model"))
}

/// The hub endpoint, token and offline switch from the environment.
#[derive(Debug, Clone)]
pub struct HubClient {
    pub endpoint: String,
    token: Option<String>,
    offline: bool,
    /// Does not follow redirects: a HEAD's own headers carry the LFS size and etag.
    head: ureq::Agent,
    get: ureq::Agent,
}

impl HubClient {
    pub fn from_env() -> HubClient {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let offline = env("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let agent = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(redirects > 0)
                .timeout_connect(Some(Duration::from_secs(30)))
                .user_agent(concat!("inferd/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        HubClient {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_owned(),
            token: env("HF_TOKEN"),
            offline,
            head: agent(0),
            get: agent(10),
        }
    }

    fn request(
        &self,
        agent: &ureq::Agent,
        method: &str,
        url: &str,
        range_from: u64,
    ) -> Result<Response, DownloadError> {
        let http = |message: String| DownloadError::Http {
            url: url.to_owned(),
            message,
        };
        let mut request = match method {
            "HEAD" => agent.head(url),
            _ => agent.get(url),
        };
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if range_from > 0 {
            request = request.header("range", format!("bytes={range_from}-"));
        }
        request.call().map_err(|e| http(e.to_string()))
    }
}

type Response = ureq::http::Response<ureq::Body>;

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"').to_owned())
}

/// What a model's download consists of; `fetch` brings files into the cache, `finish`
/// marks the revision complete.
#[derive(Debug)]
pub struct Download {
    client: HubClient,
    model: ModelRef,
    pub commit: String,
    pub files: Vec<RemoteFile>,
    repo_dir: PathBuf,
}

impl Download {
    /// Asks the hub for the revision's commit and files, and each needed file's size
    /// and etag.
    pub fn plan(client: &HubClient, model: &ModelRef, cache: &Path) -> Result<Download, DownloadError> {
        if client.offline {
            return Err(DownloadError::Offline {
                model: model.to_string(),
                cache: cache.to_owned(),
            });
        }
        let url = format!(
            "{}/api/models/{}/revision/{}",
            client.endpoint,
            model.repo_id,
            percent_encode(&model.revision)
        );
        let mut response = client.request(&client.get, "GET", &url, 0)?;
        check_status(&response, model, &client.endpoint, &url)?;
        let text = response.body_mut().read_to_string().map_err(|e| DownloadError::Http {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let info: serde_json::Value = serde_json::from_str(&text).map_err(|e| DownloadError::Http {
            url: url.clone(),
            message: format!("not the hub's JSON: {e}"),
        })?;
        let commit = info["sha"].as_str().unwrap_or_default().to_owned();
        if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(DownloadError::Http {
                url,
                message: "the answer names no commit".into(),
            });
        }
        let mut paths: Vec<String> = info["siblings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["rfilename"].as_str())
            .filter(|p| is_needed(p))
            .map(str::to_owned)
            .collect();
        paths.sort();
        if !paths.iter().any(|p| p == "config.json") || !paths.iter().any(|p| p.ends_with(".safetensors")) {
            return Err(DownloadError::NotAModel {
                model: model.to_string(),
            });
        }
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let url = resolve_url(&client.endpoint, &model.repo_id, &commit, &path);
            let response = client.request(&client.head, "HEAD", &url, 0)?;
            check_status(&response, model, &client.endpoint, &url)?;
            // LFS files answer with a redirect whose X-Linked-* headers describe the blob.
            let etag = header(&response, "x-linked-etag").or_else(|| header(&response, "etag"));
            let size = header(&response, "x-linked-size")
                .or_else(|| header(&response, "content-length"))
                .and_then(|s| s.parse().ok());
            let (Some(etag), Some(size)) = (etag, size) else {
                return Err(DownloadError::Http {
                    url,
                    message: "no ETag or size in the answer".into(),
                });
            };
            if etag.is_empty() || !etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(DownloadError::Http {
                    url,
                    message: format!("unusable ETag `{etag}`"),
                });
            }
            files.push(RemoteFile { path, etag, size });
        }
        Ok(Download {
            client: client.clone(),
            model: model.clone(),
            commit,
            files,
            repo_dir: cache.join(model.cache_folder_name()),
        })
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.repo_dir.join("snapshots").join(&self.commit)
    }

    fn blob(&self, file: &RemoteFile) -> PathBuf {
        self.repo_dir.join("blobs").join(&file.etag)
    }

    /// Bytes still to fetch for the files `which` selects.
    pub fn missing_bytes(&self, which: impl Fn(&RemoteFile) -> bool) -> u64 {
        self.files
            .iter()
            .filter(|f| which(f) && !self.blob(f).is_file())
            .map(|f| f.size)
            .sum()
    }

    /// Fetches the selected files not yet in the cache (resuming partial ones) and
    /// links them into the snapshot. `progress(file, file_bytes, bytes, total)`: bytes
    /// of this file so far, and of every download of this call so far and in all.
    pub fn fetch(
        &self,
        which: impl Fn(&RemoteFile) -> bool,
        progress: &mut dyn FnMut(&RemoteFile, u64, u64, u64),
    ) -> Result<(), DownloadError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DownloadError::Io { path, source }
        };
        let blobs = self.repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        let snapshot = self.snapshot_dir();
        std::fs::create_dir_all(&snapshot).map_err(io(&snapshot))?;
        let total = self.missing_bytes(&which);
        let mut done = 0u64;
        for file in self.files.iter().filter(|f| which(f)) {
            let blob = self.blob(file);
            if !blob.is_file() {
                let mut mine = 0;
                self.fetch_blob(file, &blob, &mut |n| {
                    mine += n;
                    done += n;
                    progress(file, mine, done, total);
                })?;
            }
            let link = snapshot.join(&file.path);
            if std::fs::symlink_metadata(&link).is_err() {
                let target = Path::new("../../blobs").join(&file.etag);
                link_or_copy(&target, &blob, &link).map_err(io(&link))?;
            }
        }
        Ok(())
    }

    fn fetch_blob(&self, file: &RemoteFile, blob: &Path, counted: &mut dyn FnMut(u64)) -> Result<(), DownloadError> {
        let partial = blob.with_extension("incomplete");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DownloadError::Io { path, source }
        };
        let mut have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if have > file.size {
            have = 0;
        }
        let url = resolve_url(&self.client.endpoint, &self.model.repo_id, &self.commit, &file.path);
        let response = self.client.request(&self.client.get, "GET", &url, have)?;
        check_status(&response, &self.model, &self.client.endpoint, &url)?;
        // A server that ignores the range sends the whole file: start over.
        if have > 0 && response.status().as_u16() != 206 {
            have = 0;
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(have > 0)
            .write(true)
            .truncate(have == 0)
            .open(&partial)
            .map_err(io(&partial))?;
        counted(have);
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = have;
        loop {
            let n = reader.read(&mut buf).map_err(|e| DownloadError::Http {
                url: url.clone(),
                message: format!("reading `{}`: {e}", file.path),
            })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(io(&partial))?;
            got += n as u64;
            counted(n as u64);
        }
        out.flush().map_err(io(&partial))?;
        if got != file.size {
            return Err(DownloadError::Http {
                url,
                message: format!("`{}` ended after {got} of {} bytes", file.path, file.size),
            });
        }
        std::fs::rename(&partial, blob).map_err(io(blob))
    }

    /// Writes `refs/<revision>`: from now on the model resolves from the cache.
    pub fn finish(&self) -> Result<ModelDir, DownloadError> {
        if self.model.revision != self.commit {
            let refs = self.repo_dir.join("refs");
            let path = refs.join(&self.model.revision);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| DownloadError::Io {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            std::fs::write(&path, &self.commit).map_err(|source| DownloadError::Io { path, source })?;
        }
        Ok(ModelDir {
            path: self.snapshot_dir(),
            display_name: self.model.to_string(),
            commit: Some(self.commit.clone()),
        })
    }
}

fn check_status(response: &Response, model: &ModelRef, endpoint: &str, url: &str) -> Result<(), DownloadError> {
    match response.status().as_u16() {
        200..=399 => Ok(()),
        401 | 403 => Err(DownloadError::Unauthorized {
            model: model.to_string(),
        }),
        404 if url.contains("/api/models/") => Err(DownloadError::NotFound {
            model: model.to_string(),
            endpoint: endpoint.to_owned(),
        }),
        status => Err(DownloadError::Http {
            url: url.to_owned(),
            message: format!("HTTP {status}"),
        }),
    }
}

fn resolve_url(endpoint: &str, repo: &str, commit: &str, path: &str) -> String {
    format!("{endpoint}/{repo}/resolve/{commit}/{}", percent_encode(path))
}

/// Percent-encodes what may not appear raw in a URL path segment (revisions such as
/// `refs/pr/1` keep their slashes encoded, as the hub expects).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A relative symlink as huggingface_hub makes; a copy where links are not possible.
fn link_or_copy(target: &Path, blob: &Path, link: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        if std::os::unix::fs::symlink(target, link).is_ok() {
            return Ok(());
        }
    }
    let _ = target;
    std::fs::copy(blob, link).map(|_| ())
}
