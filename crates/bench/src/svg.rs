//! `docs/bench.svg`, written by hand: deliveries/s by room size (flat out, plain and batch
//! members, beside the sendto ceiling) and p99 latency at half that rate.

use std::fmt::Write as _;

use crate::matrix::Results;
use crate::report::{micros, si};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 420.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 280.0;
const TOP: f64 = 80.0;
const COLORS: [&str; 3] = ["#9e9e9e", "#1f77b4", "#ff7f0e"];

/// A rounded-up axis maximum: 1, 2 or 5 × 10^k.
fn nice_max(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let k = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * k)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * k)
}

/// One grouped-bar panel at `left`: groups are room sizes, series are bars within a group.
fn panel(
    out: &mut String,
    left: f64,
    title: &str,
    fmt: &dyn Fn(f64) -> String,
    groups: &[String],
    series: &[(&str, Vec<f64>)],
    color_offset: usize,
) {
    let max = nice_max(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0, f64::max),
    );
    let bottom = TOP + PANEL_H;
    let _ = writeln!(
        out,
        r#"<text x="{:.0}" y="{:.0}" font-size="15" font-weight="bold">{title}</text>"#,
        left,
        TOP - 30.0
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = bottom - PANEL_H * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{left:.0}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            left + PANEL_W,
            left - 6.0,
            y + 4.0,
            fmt(v)
        );
    }
    let group_w = PANEL_W / groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8) / series.len().max(1) as f64;
    for (g, label) in groups.iter().enumerate() {
        let gx = left + group_w * g as f64 + group_w * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let v = values.get(g).copied().unwrap_or(0.0);
            let h = PANEL_H * (v / max).clamp(0.0, 1.0);
            let x = gx + bar_w * s as f64;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                bottom - h,
                bar_w - 2.0,
                COLORS[(s + color_offset) % COLORS.len()],
                series[s].0,
                fmt(v)
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x + bar_w / 2.0 - 1.0,
                bottom - h - 4.0,
                fmt(v)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.0}" font-size="12" text-anchor="middle">M = {label}</text>"#,
            left + group_w * (g as f64 + 0.5),
            bottom + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<line x1="{left:.0}" y1="{bottom:.0}" x2="{:.0}" y2="{bottom:.0}" stroke="black"/>"#,
        left + PANEL_W
    );
    for (s, (name, _)) in series.iter().enumerate() {
        let x = left + 130.0 * s as f64;
        let y = bottom + 40.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{y:.0}" font-size="12">{name}</text>"#,
            y - 10.0,
            COLORS[(s + color_offset) % COLORS.len()],
            x + 16.0
        );
    }
}

/// The chart.
pub fn chart(r: &Results) -> String {
    let groups: Vec<String> = r.rows.iter().map(|x| x.members.to_string()).collect();
    let col = |f: &dyn Fn(&crate::matrix::SizeRow) -> f64| r.rows.iter().map(f).collect::<Vec<_>>();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="20" y="22" font-size="13">ocmd fan-out, S = 2, B = 128, {} ({} × {}), generator on the same cores</text>"#,
        r.date, r.machine.cpus, r.machine.cpu_model
    );
    panel(
        &mut out,
        80.0,
        "Deliveries/s, senders flat out",
        &si,
        &groups,
        &[
            ("sendto ceiling", col(&|x| x.ceiling.received_per_sec)),
            ("plain members", col(&|x| x.plain_max.deliveries_per_sec)),
            ("batch members", col(&|x| x.batch_max.deliveries_per_sec)),
        ],
        0,
    );
    panel(
        &mut out,
        80.0 + PANEL_W + 80.0,
        "p99 latency at half that rate",
        &micros,
        &groups,
        &[
            ("plain members", col(&|x| x.plain_half.latency_us.p99)),
            ("batch members", col(&|x| x.batch_half.latency_us.p99)),
        ],
        1,
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.0), 5.0);
        assert_eq!(nice_max(6_100_000.0), 10_000_000.0);
        assert_eq!(nice_max(180.0), 200.0);
    }
}
