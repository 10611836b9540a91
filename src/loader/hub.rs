//! Model ids (`org/name[@revision]`) and where their files live: the Hugging Face cache
//! layout (`models--org--name/{refs,snapshots,blobs}`) or a plain local folder.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{0}` is not a model id: expected `org/name` or `org/name@revision`, or a local folder")]
    InvalidId(String),
    #[error("model `{id}` (revision `{revision}`) is not in the Hugging Face cache at {cache}; run `inferd download {id}` first")]
    NotCached {
        id: String,
        revision: String,
        cache: PathBuf,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed `org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub repo_id: String,
    pub revision: String,
}

impl ModelRef {
    pub const DEFAULT_REVISION: &'static str = "main";

    pub fn parse(s: &str) -> Result<Self, HubError> {
        let (repo_id, revision) = match s.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (s, Self::DEFAULT_REVISION),
        };
        let valid_part = |p: &str| {
            !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo_id.split('/').collect();
        // The hub also has un-namespaced legacy ids (`gpt2`); accept one or two parts.
        let ok_id = matches!(parts.len(), 1 | 2) && parts.iter().all(|p| valid_part(p));
        let ok_rev = !revision.is_empty() && revision.split('/').all(valid_part) && !revision.starts_with('/');
        if !ok_id || !ok_rev {
            return Err(HubError::InvalidId(s.to_owned()));
        }
        Ok(ModelRef {
            repo_id: repo_id.to_owned(),
            revision: revision.to_owned(),
        })
    }

    /// Folder name of this repo in the cache: `models--org--name`.
    pub fn cache_folder_name(&self) -> String {
        format!("models--{}", self.repo_id.replace('/', "--"))
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo_id, self.revision)
    }
}

/// A folder holding a model's `config.json`, tokenizer files and weights.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    /// `org/name@revision` for cache models, the folder path for local ones.
    pub display_name: String,
    /// The snapshot's commit hash for cache models.
    pub commit: Option<String>,
}

/// The hub cache folder: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache").join("huggingface").join("hub")
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves a local folder (anything that exists on disk) or a cached `org/name[@rev]`.
pub fn resolve_model(id_or_path: &str) -> Result<ModelDir, HubError> {
    let local = Path::new(id_or_path);
    if local.is_dir() {
        return Ok(ModelDir {
            path: local.to_owned(),
            display_name: id_or_path.to_owned(),
            commit: None,
        });
    }
    let model = ModelRef::parse(id_or_path)?;
    resolve_in_cache(&model, &hub_cache_dir())
}

/// `refs/<rev>` names a commit whose files are in `snapshots/<commit>`; a commit hash
/// may also be given directly.
pub fn resolve_in_cache(model: &ModelRef, cache: &Path) -> Result<ModelDir, HubError> {
    let repo_dir = cache.join(model.cache_folder_name());
    let not_cached = || HubError::NotCached {
        id: model.repo_id.clone(),
        revision: model.revision.clone(),
        cache: cache.to_owned(),
    };
    let ref_file = repo_dir.join("refs").join(&model.revision);
    let commit = if ref_file.is_file() {
        let text = std::fs::read_to_string(&ref_file).map_err(|source| HubError::Io {
            path: ref_file.clone(),
            source,
        })?;
        text.trim().to_owned()
    } else if is_commit_hash(&model.revision) {
        model.revision.clone()
    } else {
        return Err(not_cached());
    };
    if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(not_cached());
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_cached());
    }
    Ok(ModelDir {
        path: snapshot,
        display_name: model.to_string(),
        commit: Some(commit),
    })
}
