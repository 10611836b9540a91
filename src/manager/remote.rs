//! Hub downloads for loads, or (built without the `download` feature) their absence.

#[cfg(feature = "download")]
mod hub {
    use crate::loader::download::{Download, DownloadError, HubClient};
    use crate::loader::hub::{hub_cache_dir, ModelDir, ModelRef};
    use crate::manager::LoadError;

    impl From<DownloadError> for LoadError {
        fn from(e: DownloadError) -> Self {
            match e {
                DownloadError::Offline { .. }
                | DownloadError::NotFound { .. }
                | DownloadError::Unauthorized { .. }
                | DownloadError::NotAModel { .. } => LoadError::NotFound(e.to_string()),
                DownloadError::Http { .. } => LoadError::HubUnavailable(e.to_string()),
                DownloadError::Io { .. } => LoadError::Failed(e.to_string()),
            }
        }
    }

    pub fn plan(model: &ModelRef) -> Result<Download, LoadError> {
        Ok(Download::plan(&HubClient::from_env(), model, &hub_cache_dir())?)
    }

    /// The weights (`weights: true`) or everything else.
    pub fn fetch(download: &Download, weights: bool, progress: &mut dyn FnMut(u64, u64)) -> Result<(), LoadError> {
        Ok(download.fetch(|f| f.is_weights() == weights, &mut |_, _, done, total| {
            progress(done, total)
        })?)
    }

    pub fn snapshot(download: &Download) -> ModelDir {
        ModelDir {
            path: download.snapshot_dir(),
            display_name: String::new(),
            commit: Some(download.commit.clone()),
        }
    }

    pub fn finish(download: &Download) -> Result<ModelDir, LoadError> {
        Ok(download.finish()?)
    }
}

#[cfg(not(feature = "download"))]
mod hub {
    use crate::loader::hub::{ModelDir, ModelRef};
    use crate::manager::LoadError;

    pub enum Download {}

    pub fn plan(model: &ModelRef) -> Result<Download, LoadError> {
        Err(LoadError::NotFound(format!(
            "`{model}` is not cached, and this build of inferd cannot download (no `download` feature)"
        )))
    }

    pub fn fetch(download: &Download, _: bool, _: &mut dyn FnMut(u64, u64)) -> Result<(), LoadError> {
        match *download {}
    }

    pub fn snapshot(download: &Download) -> ModelDir {
        match *download {}
    }

    pub fn finish(download: &Download) -> Result<ModelDir, LoadError> {
        match *download {}
    }
}

pub(super) use hub::*;
