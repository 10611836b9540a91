//! SVG plots of bench reports, drawn by hand (no plotting dependency): throughput
//! against concurrency, and the distribution (CDF) of request latency and TTFT per run.

use std::fmt::Write as _;

use super::Report;

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn frame(title: &str, x_label: &str, y_label: &str, x_max: f64, y_max: f64, x_ticks: &[(f64, String)]) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>"#,
        W / 2.0
    );
    let (x0, y0, x1, y1) = (LEFT, H - BOTTOM, W - RIGHT, TOP);
    let _ = writeln!(svg, r#"<path d="M{x0} {y1} V{y0} H{x1}" stroke="black" fill="none"/>"#);
    for k in 0..=4 {
        let v = y_max * k as f64 / 4.0;
        let y = y0 - (y0 - y1) * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" x2="{x1}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            y + 4.0,
            short(v)
        );
    }
    for (v, label) in x_ticks {
        let x = x0 + (x1 - x0) * v / x_max.max(1e-9);
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" text-anchor="middle">{label}</text>"#,
            y0 + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        (x0 + x1) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{y_label}</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    svg
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn point(x: f64, y: f64, x_max: f64, y_max: f64) -> (f64, f64) {
    (
        LEFT + (W - RIGHT - LEFT) * x / x_max.max(1e-9),
        H - BOTTOM - (H - BOTTOM - TOP) * y / y_max.max(1e-9),
    )
}

/// Output tokens/s (and requests/s on the same scale's labels) per concurrency level.
pub fn throughput_svg(reports: &[Report]) -> String {
    let n = reports.len().max(1) as f64;
    let y_max = reports.iter().map(|r| r.output_tokens_per_s).fold(0.0, f64::max) * 1.1;
    let ticks: Vec<(f64, String)> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| (i as f64 + 0.5, r.concurrency.to_string()))
        .collect();
    let mut svg = frame("Output throughput", "concurrency", "output tokens/s", n, y_max, &ticks);
    let points: Vec<(f64, f64)> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| point(i as f64 + 0.5, r.output_tokens_per_s, n, y_max))
        .collect();
    let path: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
        path.join(" "),
        COLORS[0]
    );
    for ((x, y), r) in points.iter().zip(reports) {
        let _ = writeln!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            COLORS[0],
            y - 9.0,
            short(r.output_tokens_per_s)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The cumulative distribution of one per-request measure (ms), one line per run.
pub fn cdf_svg(title: &str, reports: &[Report], values: impl Fn(&Report) -> &[f64]) -> String {
    let x_max = reports
        .iter()
        .flat_map(|r| values(r).iter().copied())
        .fold(0.0, f64::max)
        * 1.05;
    let ticks: Vec<(f64, String)> = (0..=4)
        .map(|k| (x_max * k as f64 / 4.0, short(x_max * k as f64 / 4.0)))
        .collect();
    let mut svg = frame(title, "milliseconds", "fraction of requests", x_max, 1.0, &ticks);
    for (i, report) in reports.iter().enumerate() {
        let mut v = values(report).to_vec();
        v.sort_by(f64::total_cmp);
        let color = COLORS[i % COLORS.len()];
        let steps: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(k, &x)| {
                let (px, py) = point(x, (k + 1) as f64 / v.len() as f64, x_max, 1.0);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            steps.join(" ")
        );
        let y = TOP + 16.0 * i as f64 + 8.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">concurrency {}</text>"#,
            W - RIGHT - 130.0,
            y - 3.0,
            W - RIGHT - 114.0,
            y + 1.0,
            report.concurrency
        );
    }
    svg.push_str("</svg>\n");
    svg
}
