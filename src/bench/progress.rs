//! What a run prints while it goes: on a terminal, one line redrawn in place; in a
//! file or a pipe, a plain line every so often (10 s by default; none for a run shorter
//! than that), so logs carry no progress frames.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Off,
    /// Redrawn in place (`\r`) four times a second.
    Terminal,
    /// A new line at most this often.
    Lines(Duration),
}

impl ProgressMode {
    /// `Off` when asked to be quiet, else by whether stderr is a terminal (lines
    /// `every` so often when not).
    pub fn detect(quiet: bool, every: Duration) -> ProgressMode {
        if quiet {
            ProgressMode::Off
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Terminal
        } else {
            ProgressMode::Lines(every)
        }
    }
}

pub struct Progress {
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(mode: ProgressMode, label: &str, total: usize) -> Progress {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = (mode != ProgressMode::Off).then(|| {
            let (done, stop, label) = (done.clone(), stop.clone(), label.to_owned());
            tokio::spawn(async move {
                let start = Instant::now();
                let mut last_line = start;
                loop {
                    let n = done.load(Ordering::Relaxed);
                    let finished = n >= total || stop.load(Ordering::Relaxed);
                    let secs = start.elapsed().as_secs_f64();
                    match mode {
                        ProgressMode::Terminal => {
                            eprint!("\r  {label}: {n}/{total} requests, {secs:.1} s");
                            if finished {
                                eprintln!();
                            }
                        }
                        ProgressMode::Lines(every) if !finished && last_line.elapsed() >= every => {
                            eprintln!("bench: {label}: {n}/{total} requests done after {secs:.0} s");
                            last_line = Instant::now();
                        }
                        _ => {}
                    }
                    if finished {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        });
        Progress { done, stop, task }
    }

    /// The count each finished request adds one to.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        self.done.clone()
    }

    pub async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}
