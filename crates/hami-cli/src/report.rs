//! The simulator's HTML report: summary tables and utilization charts drawn
//! as inline SVG, so it opens anywhere with no network.

use std::fmt::Write;

use hami_sched::sim::{Sample, Seconds, SimReport, Workload};

const COLORS: [&str; 6] = [
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn render(
    reports: &[SimReport],
    cluster: &str,
    workload_file: &str,
    workload: &Workload,
) -> String {
    let mut h = String::new();
    h.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>hami simulate report</title>\n<style>\nbody{font-family:system-ui,sans-serif;margin:2rem;color:#111;max-width:1100px}\ntable{border-collapse:collapse;margin:1rem 0}\ntd,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}\nth:first-child,td:first-child{text-align:left}\n.legend span{display:inline-block;margin-right:1rem}\n.sw{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:middle}\nsvg{background:#fafafa;border:1px solid #eee}\n</style></head><body>\n");
    let _ = writeln!(
        h,
        "<h1>hami simulate</h1>\n<p>cluster: <code>{}</code><br>workload: <code>{}</code>, {} groups, horizon {}</p>",
        esc(cluster),
        esc(workload_file),
        workload.groups.len(),
        workload.horizon
    );
    h.push_str("<div class=\"legend\">");
    for (i, r) in reports.iter().enumerate() {
        let _ = write!(
            h,
            "<span><i class=\"sw\" style=\"background:{}\"></i>{}</span>",
            COLORS[i % COLORS.len()],
            esc(&r.label)
        );
    }
    h.push_str("</div>\n<h2>Summary</h2>\n<table id=\"summary\"><tr><th></th>");
    for r in reports {
        let _ = write!(h, "<th>{}</th>", esc(&r.label));
    }
    h.push_str("</tr>\n");
    for (name, cells) in crate::simulate::summary_rows(reports) {
        let _ = write!(h, "<tr><td>{}</td>", esc(&name));
        for c in cells {
            let _ = write!(h, "<td>{}</td>", esc(&c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    type Series = fn(&Sample) -> f64;
    let charts: [(&str, Series, bool); 6] = [
        ("Memory allocated", |s| s.memory, true),
        ("Slots allocated", |s| s.slots, true),
        ("Compute allocated", |s| s.cores, true),
        ("Fragmentation", |s| s.fragmentation, true),
        ("Running pods", |s| f64::from(s.running), false),
        ("Pending pods", |s| f64::from(s.pending), false),
    ];
    for (title, f, ratio) in charts {
        let _ = writeln!(h, "<h2>{title}</h2>");
        h.push_str(&chart(reports, f, ratio, workload.horizon.0));
    }
    h.push_str("<h2>Per group</h2>\n<table id=\"groups\"><tr><th>group</th><th>pods</th>");
    for r in reports {
        let _ = write!(h, "<th>{} placed / never / mean wait</th>", esc(&r.label));
    }
    h.push_str("</tr>\n");
    for (gi, g) in workload.groups.iter().enumerate() {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td>", esc(&g.name), g.count);
        for r in reports {
            let o = &r.groups[gi];
            let _ = write!(
                h,
                "<td>{} / {} / {}</td>",
                o.placed,
                o.never_placed,
                Seconds(o.mean_wait_s.round() as u64)
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<p>Allocated means reserved by the scheduler, not measured use. Fragmentation is the share of free memory on cards where the workload's median request no longer fits.</p>\n</body></html>\n");
    h
}

/// One line chart, a series per report, time on x.
fn chart(reports: &[SimReport], f: fn(&Sample) -> f64, ratio: bool, horizon: u64) -> String {
    const W: f64 = 900.0;
    const H: f64 = 220.0;
    const L: f64 = 50.0;
    const B: f64 = 25.0;
    let max = if ratio {
        1.0
    } else {
        reports
            .iter()
            .flat_map(|r| r.samples.iter().map(f))
            .fold(1.0, f64::max)
    };
    const R: f64 = 30.0;
    let x = |t: u64| L + (W - L - R) * t as f64 / horizon.max(1) as f64;
    let y = |v: f64| (H - B) - (H - B - 10.0) * v / max;
    let mut s =
        format!("<svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\">\n");
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let label = if ratio {
            format!("{:.0}%", v * 100.0)
        } else {
            format!("{v:.0}")
        };
        let _ = writeln!(
            s,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{label}</text>",
            W - R,
            L - 5.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    for k in 0..=6 {
        let t = horizon * k / 6;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            x(t),
            H - 8.0,
            Seconds(t)
        );
    }
    for (i, r) in reports.iter().enumerate() {
        let points: Vec<String> = r
            .samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.time), y(f(p))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" points=\"{}\"><title>{}</title></polyline>",
            COLORS[i % COLORS.len()],
            points.join(" "),
            esc(&r.label)
        );
    }
    s.push_str("</svg>\n");
    s
}
