//! Token choice on the device (kernels/sampling.cu), behind `Backend::sample_rows`:
//! greedy argmax and the seeded inverse-CDF draw of `backend::draw`, so only ids come
//! back to the host; and whole sampled rows (`backend::sampling::sample_row`: edits, top-k / top-p / min-p, the draw
//! over the kept tokens, log-probabilities), behind `INFERD_CUDA_SAMPLING=device` until
//! the GPU suite has passed with it. CPU reference: `backend::cpu::sampling`.

use cudarc::driver::DeviceRepr;

use super::device::{cfg, ok, rows_u32};
use super::{CudaBackend, CudaTensor};
use crate::backend::{RowSampling, Sampled, TokenLogprobs};

/// Where `sample_rows` runs on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSampler {
    /// The rows come to the host and the reference samples them (the default).
    Host,
    /// `sample_rows_f32`: only ids and the log-probabilities asked for come back.
    Device,
}

impl RowSampler {
    /// `INFERD_CUDA_SAMPLING`'s values, the default first.
    pub(super) const CHOICES: &'static [(&'static str, Self)] =
        &[("host", RowSampler::Host), ("device", RowSampler::Device)];
}

impl CudaBackend {
    /// Sets where `sample_rows` runs (the GPU suite runs both).
    pub fn set_row_sampler(&self, sampler: RowSampler) {
        self.inner.row_sampler.set(sampler)
    }

    pub fn row_sampler(&self) -> RowSampler {
        self.inner.row_sampler.get()
    }
}

/// `SampleArgs` of kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleArgs {
    temperature: f32,
    top_k: i32,
    top_p: f32,
    min_p: f32,
    uniform: f64,
    edit_begin: i32,
    edit_end: i32,
    logprobs: i32,
    work_row: i32,
}

/// `LogitEditArgs` of kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct LogitEditArgs {
    token: u32,
    bias: f32,
    penalty: f32,
    subtract: f32,
    ban: i32,
}

// SAFETY: plain old data with the C layout the kernel reads.
unsafe impl DeviceRepr for SampleArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for LogitEditArgs {}

/// Most alternatives a row's log-probabilities list (OpenAI's `top_logprobs` limit is
/// 20; vLLM allows more): beyond it the rows are sampled on the host.
pub(super) const MAX_DEVICE_TOP_LOGPROBS: usize = 64;

/// Each row by the cheapest way that gives its reference token: plain rows (no edits,
/// no log-probabilities) by `argmax_rows_f32` when greedy and `draw_rows_f32` when
/// unfiltered, only ids coming back; the others by `sample_rows_f32` under
/// `INFERD_CUDA_SAMPLING=device`, else on the host.
pub(super) fn sample_rows(be: &CudaBackend, x: &CudaTensor, rows: &[usize], sampling: &[&RowSampling]) -> Vec<Sampled> {
    assert_eq!(rows.len(), sampling.len(), "sample_rows: one RowSampling per row");
    let plain = |s: &RowSampling| s.edits.is_empty() && s.logprobs.is_none();
    let which =
        |f: &dyn Fn(&RowSampling) -> bool| -> Vec<usize> { (0..rows.len()).filter(|&j| f(sampling[j])).collect() };
    let greedy = which(&|s| plain(s) && s.is_greedy());
    let draws = which(&|s| plain(s) && !s.is_greedy() && !s.is_filtered());
    let others = which(&|s| !plain(s) || (!s.is_greedy() && s.is_filtered()));
    let mut out: Vec<Option<Sampled>> = vec![None; rows.len()];
    let mut put = |picked: &[usize], tokens: Vec<Sampled>| {
        for (&j, t) in picked.iter().zip(tokens) {
            out[j] = Some(t);
        }
    };
    let of = |picked: &[usize]| -> Vec<usize> { picked.iter().map(|&j| rows[j]).collect() };
    let ids = |tokens: Vec<u32>| -> Vec<Sampled> {
        tokens
            .into_iter()
            .map(|token| Sampled { token, logprobs: None })
            .collect()
    };
    put(&greedy, ids(argmax_rows(be, x, &of(&greedy))));
    let (temperatures, uniforms): (Vec<f32>, Vec<f64>) = draws
        .iter()
        .map(|&j| (sampling[j].temperature, sampling[j].uniform))
        .unzip();
    put(&draws, ids(draw_rows(be, x, &of(&draws), &temperatures, &uniforms)));
    let rest: Vec<&RowSampling> = others.iter().map(|&j| sampling[j]).collect();
    let on_device = be.row_sampler() == RowSampler::Device
        && rest
            .iter()
            .all(|s| s.logprobs.is_none_or(|k| k <= MAX_DEVICE_TOP_LOGPROBS));
    put(
        &others,
        if on_device {
            whole_rows(be, x, &of(&others), &rest)
        } else {
            crate::backend::sample_rows_on_host(be, x, &of(&others), &rest)
        },
    );
    out.into_iter()
        .map(|s| s.expect("every row is sampled one way"))
        .collect()
}

/// `sample_rows_f32` over rows of any kind.
fn whole_rows(be: &CudaBackend, x: &CudaTensor, rows: &[usize], sampling: &[&RowSampling]) -> Vec<Sampled> {
    if rows.is_empty() {
        return Vec::new();
    }
    let n = rows.len();
    let mut edits = Vec::new();
    let mut edited_rows = 0;
    let args: Vec<SampleArgs> = sampling
        .iter()
        .map(|s| {
            let edit_begin = edits.len() as i32;
            edits.extend(s.edits.iter().map(|e| LogitEditArgs {
                token: e.token,
                bias: e.bias,
                penalty: e.penalty,
                subtract: e.subtract,
                ban: e.ban as i32,
            }));
            SampleArgs {
                temperature: s.temperature,
                top_k: s.top_k.map_or(0, |k| k.clamp(1, i32::MAX as usize) as i32),
                top_p: s.top_p,
                min_p: s.min_p,
                uniform: s.uniform,
                edit_begin,
                edit_end: edits.len() as i32,
                logprobs: s.logprobs.map_or(-1, |k| k as i32),
                work_row: if s.edits.is_empty() {
                    -1
                } else {
                    edited_rows += 1;
                    edited_rows - 1
                },
            }
        })
        .collect();
    let max_top = sampling.iter().filter_map(|s| s.logprobs).max().unwrap_or(0).max(1);
    let idx = be.row_indices(x, rows, "sample_rows");
    let args_d = be.htod(&args, "sample_rows: parameters");
    let edits_d = be.htod(&edits, "sample_rows: edits");
    let work = be.alloc::<f32>(edited_rows as usize * x.cols, "sample_rows: edited rows");
    let ids = be.alloc::<u32>(n, "sample_rows: ids");
    let own = be.alloc::<f32>(n, "sample_rows: log-probabilities");
    let top_ids = be.alloc::<u32>(n * max_top, "sample_rows: top ids");
    let top_vals = be.alloc::<f32>(n * max_top, "sample_rows: top log-probabilities");
    let (xp, ip, ap, ep, wp) = (
        be.ptr(&x.buf),
        be.ptr(&idx),
        be.ptr(&args_d),
        be.ptr(&edits_d),
        be.ptr(&work),
    );
    let (cols, mt) = (x.cols as i32, max_top as i32);
    let (op, lp, tip, tvp) = (be.ptr(&ids), be.ptr(&own), be.ptr(&top_ids), be.ptr(&top_vals));
    launch!(be, "sample_rows_f32", cfg((rows_u32(n, "sample_rows"), 1, 1), SAMPLE_THREADS);
        &xp, &ip, &ap, &ep, &wp, &cols, &mt, &op, &lp, &tip, &tvp);
    let ids = be.ids_to_host(&ids, n, "sample_rows");
    let wants_logprobs = sampling.iter().any(|s| s.logprobs.is_some());
    let (own, top_ids, top_vals) = if wants_logprobs {
        (
            ok(be.inner.stream.clone_dtoh(&own), "sample_rows: log-probabilities"),
            ok(be.inner.stream.clone_dtoh(&top_ids), "sample_rows: top ids"),
            ok(
                be.inner.stream.clone_dtoh(&top_vals),
                "sample_rows: top log-probabilities",
            ),
        )
    } else {
        Default::default()
    };
    (0..n)
        .map(|j| Sampled {
            token: ids[j],
            logprobs: sampling[j].logprobs.map(|k| {
                let k = k.min(x.cols);
                TokenLogprobs {
                    token: ids[j],
                    logprob: own[j],
                    top: (0..k)
                        .map(|t| (top_ids[j * max_top + t], top_vals[j * max_top + t]))
                        .collect(),
                }
            }),
        })
        .collect()
}

/// Threads of `sample_rows_f32` (`SAMPLE_THREADS`).
const SAMPLE_THREADS: u32 = 512;

pub(super) fn argmax_rows(be: &CudaBackend, x: &CudaTensor, rows: &[usize]) -> Vec<u32> {
    if rows.is_empty() {
        return Vec::new();
    }
    let idx = be.row_indices(x, rows, "argmax_rows");
    let out = be.alloc::<u32>(rows.len(), "argmax_rows");
    let (xp, ip, o, c) = (be.ptr(&x.buf), be.ptr(&idx), be.ptr(&out), x.cols as i32);
    launch!(be, "argmax_rows_f32", cfg((rows_u32(rows.len(), "argmax_rows"), 1, 1), 1024); &xp, &ip, &o, &c);
    be.ids_to_host(&out, rows.len(), "argmax_rows")
}

pub(super) fn draw_rows(
    be: &CudaBackend,
    x: &CudaTensor,
    rows: &[usize],
    temperatures: &[f32],
    uniforms: &[f64],
) -> Vec<u32> {
    assert!(
        rows.len() == temperatures.len() && rows.len() == uniforms.len(),
        "draw_rows: one temperature and one uniform number per row"
    );
    if rows.is_empty() {
        return Vec::new();
    }
    let idx = be.row_indices(x, rows, "draw_rows");
    let (temps, us) = (
        be.htod(temperatures, "draw_rows: temperatures"),
        be.htod(uniforms, "draw_rows: uniforms"),
    );
    let out = be.alloc::<u32>(rows.len(), "draw_rows");
    let (xp, ip, tp, up, o, c) = (
        be.ptr(&x.buf),
        be.ptr(&idx),
        be.ptr(&temps),
        be.ptr(&us),
        be.ptr(&out),
        x.cols as i32,
    );
    launch!(be, "draw_rows_f32", cfg((rows_u32(rows.len(), "draw_rows"), 1, 1), 1024); &xp, &ip, &tp, &up, &o, &c);
    be.ids_to_host(&out, rows.len(), "draw_rows")
}
