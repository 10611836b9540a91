//! Plots of a bench session, drawn with `plotters` as SVG and as PNG (an in-memory
//! bitmap encoded by `image`; text from an embedded DejaVu Sans, so no font library is
//! needed): throughput and goodput against load, latency against load, and the
//! distributions (CDFs) of TTFT, ITL and request latency. Ticks come from plotters'
//! round key points; the legend has a column of its own, clear of the data.

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::session::Series;
use super::sweep::{load_axis, load_x, Knee};
use super::Report;

const SIZE: (u32, u32) = (960, 480);
const LEGEND_W: u32 = 250;
const FONT: &str = "sans-serif";
/// Tableau 10.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Distribution plots draw at most this many runs per target.
const CDF_RUNS_PER_TARGET: usize = 4;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: usize,
    pub dashed: bool,
    pub markers: bool,
}

/// A chart: lines on linear axes from 0, and labelled points (knees) ringed.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The file stem (`throughput` for throughput.svg and throughput.png).
    pub name: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    pub rings: Vec<(String, (f64, f64), usize)>,
    /// A fixed top for the y axis (1 for a CDF), else the data's top plus a margin.
    pub y_top: Option<f64>,
    /// A logarithmic y axis (latencies that span from a floor to a queue).
    pub y_log: bool,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; failing to parse it would be a build defect.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

impl Chart {
    pub fn new(name: &str, title: &str, x_label: &str, y_label: &str) -> Chart {
        Chart {
            name: name.into(),
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            lines: Vec::new(),
            rings: Vec::new(),
            y_top: None,
            y_log: false,
        }
    }

    pub fn svg(&self) -> Result<String, String> {
        register_font();
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
            self.draw(&root).map_err(|e| format!("{}: {e}", self.name))?;
            root.present().map_err(|e| format!("{}: {e}", self.name))?;
        }
        Ok(out)
    }

    pub fn png(&self) -> Result<Vec<u8>, String> {
        use image::ImageEncoder;
        register_font();
        let mut pixels = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
            self.draw(&root).map_err(|e| format!("{}: {e}", self.name))?;
            root.present().map_err(|e| format!("{}: {e}", self.name))?;
        }
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&pixels, SIZE.0, SIZE.1, image::ExtendedColorType::Rgb8)
            .map_err(|e| format!("{}: {e}", self.name))?;
        Ok(png)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let (plot, legend) = root.split_horizontally(SIZE.0 - LEGEND_W);
        let all = self.lines.iter().flat_map(|l| l.points.iter());
        let x_max = nice_top(all.clone().map(|p| p.0).fold(0.0, f64::max));
        let y_top = all.clone().map(|p| p.1).fold(0.0, f64::max);
        let mut builder = ChartBuilder::on(&plot);
        builder
            .caption(&self.title, (FONT, 22))
            .margin(14)
            .x_label_area_size(46)
            .y_label_area_size(70);
        if self.y_log {
            // Powers of ten around the data (which must be above zero to be drawn).
            let y_min = all.map(|p| p.1).filter(|y| *y > 0.0).fold(f64::INFINITY, f64::min);
            let (lo, hi) = if y_min.is_finite() {
                (
                    10f64.powf(y_min.log10().floor()),
                    10f64.powf(y_top.log10().ceil()).max(y_min * 10.0),
                )
            } else {
                (1.0, 10.0)
            };
            let chart = builder.build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
            self.plot_into(chart, &legend)
        } else {
            let y_max = self.y_top.unwrap_or_else(|| nice_top(y_top * 1.08));
            let chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
            self.plot_into(chart, &legend)
        }
    }

    /// The mesh, the lines, the rings and the legend, on either kind of y axis.
    fn plot_into<DB: DrawingBackend, Y>(
        &self,
        mut chart: ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
        legend: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
    where
        Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(RGBColor(245, 245, 245))
            .draw()?;
        for line in &self.lines {
            let color = COLORS[line.color % COLORS.len()];
            let style = color.stroke_width(2);
            if line.dashed {
                chart.draw_series(DashedLineSeries::new(line.points.iter().copied(), 8, 5, style))?;
            } else {
                chart.draw_series(LineSeries::new(line.points.iter().copied(), style))?;
            }
            if line.markers {
                chart.draw_series(line.points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
            }
        }
        for (_, point, color) in &self.rings {
            let color = COLORS[color % COLORS.len()];
            chart.draw_series(std::iter::once(Circle::new(*point, 10, color.stroke_width(3))))?;
        }
        // The legend: its own column, one row per line and ring.
        let mut y = 60;
        for line in &self.lines {
            let color = COLORS[line.color % COLORS.len()];
            let style = color.stroke_width(2);
            if line.dashed {
                legend.draw(&PathElement::new(vec![(8, y), (18, y)], style))?;
                legend.draw(&PathElement::new(vec![(24, y), (34, y)], style))?;
            } else {
                legend.draw(&PathElement::new(vec![(8, y), (34, y)], style))?;
            }
            legend.draw(&Text::new(short(&line.name), (42, y - 8), (FONT, 14)))?;
            y += 24;
        }
        for (name, _, color) in &self.rings {
            let color = COLORS[color % COLORS.len()];
            legend.draw(&Circle::new((21, y), 7, color.stroke_width(3)))?;
            legend.draw(&Text::new(short(name), (42, y - 8), (FONT, 14)))?;
            y += 24;
        }
        Ok(())
    }
}

fn short(name: &str) -> String {
    const MOST: usize = 28;
    if name.chars().count() <= MOST {
        name.to_owned()
    } else {
        let head: String = name.chars().take(MOST - 1).collect();
        format!("{head}…")
    }
}

/// The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of
/// ten) at or above `x`; 1 for nothing.
fn nice_top(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return 1.0;
    }
    let power = 10f64.powf(x.log10().floor());
    [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|&v| v >= x * (1.0 - 1e-12))
        .unwrap_or(10.0 * power)
}

/// A tick label without float noise: `1500`, `2.5`, `0.25`.
fn tick(v: f64) -> String {
    let r = super::sweep::round_sig(v, 6);
    if r == r.trunc() {
        format!("{r:.0}")
    } else {
        let s = format!("{r:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// One measure of a run against load (None: nothing to draw for that run).
type Measure = fn(&Report) -> Option<f64>;

/// A chart against load: for each target, a line per `(name, measure, dashed)` (its runs
/// marked; lines with nothing to draw left out) in the target's colour, and its knee
/// ringed at `knee_y`.
fn load_chart(
    (name, title, y_label): (&str, &str, &str),
    series: &[Series],
    lines: &[(&str, Measure, bool)],
    knee_y: fn(&Knee) -> f64,
) -> Chart {
    let many = series.len() > 1;
    let name_of = |s: &Series, what: &str| {
        if many {
            format!("{} {what}", s.name)
        } else {
            what.to_owned()
        }
    };
    let axis = load_axis(series.iter().flat_map(|s| &s.runs));
    let mut chart = Chart::new(name, title, axis, y_label);
    for (i, s) in series.iter().enumerate() {
        for (what, measure, dashed) in lines {
            let mut points: Vec<(f64, f64)> = s.runs.iter().filter_map(|r| Some((load_x(r), measure(r)?))).collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            if !points.is_empty() {
                chart.lines.push(Line {
                    name: name_of(s, what),
                    points,
                    color: i,
                    dashed: *dashed,
                    markers: true,
                });
            }
        }
        if let Some(k) = &s.knee {
            chart.rings.push((name_of(s, "knee"), (k.load_x, knee_y(k)), i));
        }
    }
    chart
}

/// Every chart of a session: throughput (and goodput), latency against load (when a
/// series has several runs), and the three distributions.
pub fn charts(series: &[Series]) -> Vec<Chart> {
    let many = series.len() > 1;
    // (A run that lost every request has no latency to draw; no SLO, no goodput.)
    let mut charts = vec![load_chart(
        ("throughput", "Output throughput against load", "output tokens/s"),
        series,
        &[
            ("output tok/s", |r| Some(r.output_tokens_per_s), false),
            (
                "goodput tok/s",
                |r| r.goodput.as_ref().map(|g| g.output_tokens_per_s),
                true,
            ),
        ],
        |k| k.output_tokens_per_s,
    )];
    if series.iter().any(|s| s.runs.len() > 1) {
        let mut latency = load_chart(
            ("latency_vs_load", "Latency against load", "milliseconds (log scale)"),
            series,
            &[
                (
                    "latency p50",
                    |r| (r.requests > r.failed).then_some(r.latency_ms.p50),
                    false,
                ),
                ("TTFT p90", |r| (r.requests > r.failed).then_some(r.ttft_ms.p90), true),
            ],
            |k| k.latency_p50_ms,
        );
        latency.y_log = true;
        charts.push(latency);
    }
    type Values = fn(&Report) -> Vec<f64>;
    let cdfs: [(&str, &str, Values); 3] = [
        ("ttft", "Time to first token", |r| {
            r.samples.iter().map(|s| s.ttft_ms).collect()
        }),
        ("itl", "Inter-token latency", |r| r.itls.clone()),
        ("latency", "Request latency", |r| {
            r.samples.iter().map(|s| s.latency_ms).collect()
        }),
    ];
    for (name, title, values) in cdfs {
        let y_label = if name == "itl" {
            "fraction of token gaps"
        } else {
            "fraction of requests"
        };
        let mut chart = Chart::new(name, &format!("{title}: distribution"), "milliseconds", y_label);
        chart.y_top = Some(1.0);
        let mut color = 0;
        for s in series {
            for r in pick_runs(&s.runs, CDF_RUNS_PER_TARGET) {
                let mut v = values(r);
                if v.is_empty() {
                    continue;
                }
                v.sort_by(f64::total_cmp);
                let points = cdf_steps(&v);
                chart.lines.push(Line {
                    name: if many {
                        format!("{}, {}", s.name, r.label)
                    } else {
                        r.label.clone()
                    },
                    points,
                    color,
                    dashed: false,
                    markers: false,
                });
                color += 1;
            }
        }
        if !chart.lines.is_empty() {
            charts.push(chart);
        }
    }
    charts
}

/// Most steps a distribution line draws (thousands of token gaps would bloat the SVG
/// without showing more).
const CDF_STEPS: usize = 400;

/// The step curve of sorted values: each value rises from the fraction below it to its
/// own; beyond [`CDF_STEPS`] values, every k-th one (and the last).
fn cdf_steps(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let stride = n.div_ceil(CDF_STEPS).max(1);
    let mut points = Vec::with_capacity(2 * CDF_STEPS + 2);
    let mut below = 0.0;
    for k in (stride - 1..n)
        .step_by(stride)
        .chain((!n.is_multiple_of(stride)).then_some(n - 1))
    {
        let x = sorted[k];
        points.push((x, below));
        below = (k + 1) as f64 / n as f64;
        points.push((x, below));
    }
    points
}

/// At most `most` runs, evenly spread and always with the first and last.
fn pick_runs<T>(runs: &[T], most: usize) -> Vec<&T> {
    if runs.len() <= most {
        return runs.iter().collect();
    }
    let mut picked: Vec<usize> = (0..most)
        .map(|k| (k * (runs.len() - 1) + (most - 1) / 2) / (most - 1))
        .collect();
    picked.dedup();
    picked.into_iter().map(|i| &runs[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_and_ticks_are_round() {
        assert_eq!(nice_top(5366.0), 6000.0);
        assert_eq!(nice_top(34.2), 40.0);
        assert_eq!(nice_top(11.66), 12.0);
        assert_eq!(nice_top(2.1), 2.5);
        assert_eq!(nice_top(0.0), 1.0);
        assert_eq!(tick(1500.0), "1500");
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(2.5), "2.5");
    }

    #[test]
    fn charts_draw_as_svg_and_png() {
        let chart = Chart {
            name: "t".into(),
            title: "Test".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            lines: vec![Line {
                name: "a line with a rather long name that gets cut".into(),
                points: vec![(1.0, 10.0), (2.0, 30.0), (4.0, 35.0)],
                color: 0,
                dashed: true,
                markers: true,
            }],
            rings: vec![("knee".into(), (2.0, 30.0), 0)],
            y_top: None,
            y_log: false,
        };
        let svg = chart.svg().unwrap();
        // Round ticks: the y axis (data to 35, 8% headroom) goes to 40 by tens.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(svg.starts_with("<svg") && texts.contains(&"Test"), "{svg}");
        assert!(["0", "10", "20", "30", "40"].iter().all(|t| texts.contains(t)), "{svg}");
        assert!(!texts.contains(&"50"), "{svg}");
        let png = chart.png().unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SIZE);
        // The line's blue is drawn, and text (dark pixels) too.
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(blue > 100 && dark > 100, "{blue} {dark}");
    }

    #[test]
    fn distribution_steps_are_bounded_and_end_at_one() {
        assert_eq!(
            cdf_steps(&[1.0, 2.0]),
            vec![(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (2.0, 1.0)]
        );
        let many: Vec<f64> = (0..10_001).map(f64::from).collect();
        let steps = cdf_steps(&many);
        assert!(steps.len() <= 2 * CDF_STEPS + 2, "{}", steps.len());
        assert_eq!(steps.last(), Some(&(10_000.0, 1.0)));
        assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn distribution_plots_keep_the_first_and_last_runs() {
        let runs: Vec<usize> = (0..10).collect();
        assert_eq!(pick_runs(&runs, 4), vec![&0, &3, &6, &9]);
        assert_eq!(pick_runs(&runs[..3], 4).len(), 3);
        assert_eq!(pick_runs(&runs[..5], 4), vec![&0, &1, &3, &4]);
    }
}
