//! The session as one self-contained HTML file: what ran (command, date, versions,
//! host, workload, targets), the headline per target (peak throughput, knee, best
//! goodput), the side-by-side ratios, every plot (SVG inlined as data URIs, so the file
//! opens offline), and a table of every run. A small script marks `<body>` with the
//! number of plots the browser decoded (`data-plots-loaded`), for tests and for
//! anyone checking a copied report.

use base64::Engine as _;
use serde_json::Value;

use super::plot::Chart;
use super::session::{Ratio, Series};
use super::Distribution;

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A ratio: `2.11x`, or `—` for none.
fn times(v: f64) -> String {
    if v.is_finite() {
        format!("{}x", num(v))
    } else {
        "—".into()
    }
}

fn dist(d: &Distribution) -> [String; 3] {
    [num(d.p50), num(d.p90), num(d.p99)]
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222}\
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:8px 0;font-size:13px}\
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}\
img{display:block;margin:12px 0;max-width:100%;border:1px solid #eee}\
code{background:#f4f4f4;padding:1px 4px;white-space:pre-wrap;word-break:break-word}";

/// The report for `doc` (the session's JSON document), its series, ratios and charts.
pub fn report(doc: &Value, series: &[Series], ratios: &[Ratio], charts: &[Chart]) -> Result<String, String> {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str("<title>inferd bench report</title><style>");
    h.push_str(STYLE);
    h.push_str("</style></head>\n<body>\n<h1>inferd bench report</h1>\n");

    // What ran.
    let field = |k: &str| doc.get(k).cloned().unwrap_or(Value::Null);
    let text = |v: Value| match v {
        Value::String(s) => s,
        Value::Null => "—".into(),
        other => other.to_string(),
    };
    let command = field("command")
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let host = field("host");
    let rows = [
        ("date", text(field("created"))),
        ("command", command),
        ("inferd", text(field("inferd_version"))),
        ("model", text(field("model"))),
        ("endpoint", text(field("endpoint"))),
        ("plan", text(field("plan"))),
        ("workload", text(field("workload"))),
        ("SLO", text(field("slo"))),
        (
            "host",
            format!(
                "{}, {} CPUs, {} GiB, {} {}",
                text(host["cpu"].clone()),
                text(host["cpus"].clone()),
                host["memory_bytes"]
                    .as_f64()
                    .map_or("—".into(), |b| format!("{:.0}", b / f64::from(1u32 << 30))),
                text(host["os"].clone()),
                text(host["arch"].clone())
            ),
        ),
    ];
    h.push_str("<table>\n");
    for (k, v) in rows {
        h.push_str(&format!(
            "<tr><th class=\"l\">{}</th><td class=\"l\"><code>{}</code></td></tr>\n",
            esc(k),
            esc(&v)
        ));
    }
    h.push_str("</table>\n");

    // Headlines.
    h.push_str(
        "<h2>Targets</h2>\n<table>\n<tr><th class=\"l\">target</th><th class=\"l\">URL</th>\
        <th class=\"l\">version</th><th>peak output tok/s</th><th class=\"l\">knee</th><th>knee req/s</th><th>best goodput req/s</th></tr>\n",
    );
    for s in series {
        let (knee, knee_rps) = match &s.knee {
            Some(k) => (k.label.clone(), num(k.requests_per_s)),
            None => ("none found".into(), "—".into()),
        };
        let goodput = s
            .best_goodput
            .and_then(|i| {
                s.runs[i]
                    .goodput
                    .as_ref()
                    .map(|g| format!("{} ({})", num(g.requests_per_s), s.runs[i].label))
            })
            .unwrap_or_else(|| "—".into());
        h.push_str(&format!(
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&s.name),
            esc(&s.url),
            esc(s.server_version.as_deref().unwrap_or("—")),
            num(s.peak_output_tokens_per_s()),
            esc(&knee),
            knee_rps,
            esc(&goodput)
        ));
    }
    h.push_str("</table>\n");

    if !ratios.is_empty() {
        h.push_str(
            "<h2>Side by side</h2>\n<p>Each target against the first (above 1 is more for throughput, \
            slower for latency).</p>\n<table>\n<tr><th class=\"l\">target / baseline</th><th class=\"l\">run</th>\
            <th>output tok/s</th><th>req/s</th><th>TTFT p50</th><th>ITL p50</th><th>goodput</th></tr>\n",
        );
        for r in ratios {
            h.push_str(&format!(
                "<tr><td class=\"l\">{} / {}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&r.target),
                esc(&r.baseline),
                esc(&r.run),
                times(r.output_tokens_per_s),
                times(r.requests_per_s),
                times(r.ttft_p50),
                times(r.itl_p50),
                r.goodput_requests_per_s.map_or("—".into(), times)
            ));
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Plots</h2>\n");
    for chart in charts {
        let svg = chart.svg()?;
        let data = base64::engine::general_purpose::STANDARD.encode(svg.as_bytes());
        h.push_str(&format!(
            "<img class=\"plot\" alt=\"{}\" width=\"960\" height=\"480\" src=\"data:image/svg+xml;base64,{data}\">\n",
            esc(&chart.title)
        ));
    }

    for s in series {
        h.push_str(&format!("<h2>Runs: {}</h2>\n<table>\n", esc(&s.name)));
        h.push_str(
            "<tr><th class=\"l\">run</th><th>requests</th><th>failed</th><th>req/s</th><th>output tok/s</th>\
            <th>goodput req/s</th><th>TTFT p50</th><th>p90</th><th>p99</th><th>ITL p50</th><th>p90</th><th>p99</th>\
            <th>latency p50</th><th>p90</th><th>p99</th></tr>\n",
        );
        for r in &s.runs {
            let goodput = r.goodput.as_ref().map_or("—".into(), |g| num(g.requests_per_s));
            let cells: Vec<String> = [dist(&r.ttft_ms), dist(&r.itl_ms), dist(&r.latency_ms)]
                .concat()
                .into_iter()
                .map(|c| format!("<td>{c}</td>"))
                .collect();
            h.push_str(&format!(
                "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}</tr>\n",
                esc(&r.label),
                r.requests,
                r.failed,
                num(r.requests_per_s),
                num(r.output_tokens_per_s),
                goodput,
                cells.concat()
            ));
        }
        h.push_str("</table>\n<p>Latencies in milliseconds.</p>\n");
    }

    h.push_str(
        "<script>\nwindow.addEventListener('load', function () {\n  \
         var imgs = document.querySelectorAll('img.plot'), n = 0;\n  \
         imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) n++; });\n  \
         document.body.setAttribute('data-plots', imgs.length);\n  \
         document.body.setAttribute('data-plots-loaded', n);\n});\n</script>\n",
    );
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(num(1234.5), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(f64::NAN), "—");
    }
}
