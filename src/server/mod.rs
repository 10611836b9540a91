//! The OpenAI-compatible HTTP server (hyper 1): the accept loop with graceful shutdown,
//! the shared state, and the routes. Requests become engine submissions in `generate`;
//! the engine itself never sees HTTP.

pub mod choice;
pub mod error;
pub mod generate;
pub mod http;
pub mod images;
pub mod load_events;
pub mod metrics;
pub mod multipart;
pub mod responses;
pub mod routes;
pub mod store;
pub mod tokens;
pub mod transcribe;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Map, Value};
use tokio::net::TcpListener;

use crate::api::SamplingDefaults;
use crate::manager::{ModelManager, ServedModel};
use http::WriteDeadline;
use metrics::ServerMetrics;

/// Everything the routes share.
pub struct ServerState {
    /// The models: loaded on demand, or one forced model answering every request.
    pub models: Arc<ModelManager>,
    /// `--default-seed`, for requests that send none.
    pub default_seed: Option<u64>,
    /// `--chat-template-kwargs`, under each request's own.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub api_key: Option<String>,
    pub enable_cors: bool,
    pub max_body_bytes: usize,
    /// How long a client may send nothing while its request (head or body) is
    /// incomplete, and how long an idle keep-alive connection stays open.
    pub read_timeout: Duration,
    /// How long a client may accept nothing while a reply is being written to it.
    pub write_timeout: Duration,
    /// Longest audio a transcription may send, in seconds.
    pub max_audio_seconds: f64,
    /// Largest transcription upload (the whole multipart body), in bytes.
    pub max_audio_bytes: usize,
    /// How chat images are fetched, and how many and how large they may be.
    pub images: images::ImageLimits,
    pub metrics: ServerMetrics,
    pub next_request: AtomicU64,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
    pub responses: Arc<store::ResponseStore>,
    /// Becomes true when shutdown starts: streams that never end by themselves (KV
    /// events) end then, so that the drain waits only for replies.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

/// Media decoded at once, server-wide (audio files, images): one per core. A burst of
/// uploads waits its turn here instead of filling memory with decoded samples and pixels.
pub fn media_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

impl ServerState {
    /// A request's sampling defaults: its model's generation_config.json and the seed.
    pub fn defaults(&self, model: &ServedModel) -> SamplingDefaults {
        SamplingDefaults {
            generation_config: model.generation_config.clone(),
            seed: self.default_seed,
        }
    }
}

pub struct ServerOptions {
    pub addr: SocketAddr,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
}

/// Serves until SIGINT or SIGTERM, then stops accepting, lets open connections finish
/// within the grace period, and returns.
pub async fn serve(state: Arc<ServerState>, options: ServerOptions) -> std::io::Result<()> {
    match raise_open_files_limit() {
        Ok(n) if n < 4096 => crate::warn!("at most {n} open files (ulimit -n): about as many connections at once"),
        Ok(n) => crate::debug!("at most {n} open files"),
        Err(e) => crate::warn!("could not read the open-files limit: {e}"),
    }
    let listener = TcpListener::bind(options.addr).await?;
    let local = listener.local_addr()?;
    // Tests and scripts read the port from this line (useful with --port 0): it is
    // printed whatever the log level.
    let serving = match state.models.forced() {
        Some(model) => model.name.clone(),
        None => "models on demand".to_owned(),
    };
    eprintln!("inferd: serving {serving} on http://{local}");
    // Idle models are unloaded by a background task (engines stop off the reactor).
    let unloader = {
        let models = state.models.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let models = models.clone();
                let _ = tokio::task::spawn_blocking(move || models.unload_idle()).await;
            }
        })
    };
    let graceful = GracefulShutdown::new();
    let open_connections = Arc::new(AtomicUsize::new(0));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        crate::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let service_state = state.clone();
                let service = service_fn(move |req| routes::handle(service_state.clone(), req));
                // A connection that sends no complete request head in time is closed; hyper
                // restarts that timer when a keep-alive connection goes idle, so idle
                // connections close too. Writes that make no progress fail (WriteDeadline).
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(state.read_timeout)
                    .serve_connection(TokioIo::new(WriteDeadline::new(stream, state.write_timeout)), service);
                let conn = graceful.watch(conn);
                let open = OpenConnection::new(&open_connections);
                tokio::spawn(async move {
                    let _open = open;
                    if let Err(e) = conn.await {
                        // A write deadline is worth a line (a client stalled a reply);
                        // resets and half-closed sockets are routine.
                        let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
                        if let Some(io) = io.filter(|io| io.kind() == std::io::ErrorKind::TimedOut) {
                            crate::warn!("connection closed: {e}: {io}");
                        } else {
                            crate::debug!("connection ended: {e}");
                        }
                    }
                });
            }
            _ = &mut shutdown => {
                crate::info!("shutting down");
                state.stopping.send_replace(true);
                break;
            }
        }
    }
    drop(listener);
    unloader.abort();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(options.shutdown_grace) => {
            let open = open_connections.load(Ordering::SeqCst);
            crate::warn!("grace period over: closing {open} connections still open (their requests are cancelled)");
        }
    }
    Ok(())
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Raises this process's soft limit on open files to its hard limit (each connection
/// takes a descriptor; distributions often default to 1024 soft) and returns the limit
/// in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read or write the one struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
        Ok(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        Ok(u64::MAX)
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
