//! A small hand-written SVG line chart: x and y axes with ticks, one polyline with dots per
//! series, a legend. Enough for "latency vs VM count" and "memory vs VM count".

use std::fmt::Write as _;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// A "nice" step (1, 2 or 5 times a power of ten) that cuts `span` into about 5 parts.
fn nice_step(span: f64) -> f64 {
    if !span.is_finite() || span <= 0.0 {
        return 1.0;
    }
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    step.max(f64::MIN_POSITIVE)
}

/// Axis range (low, high, step) covering 0 and `min..max` in whole steps: counts and costs start
/// at 0, but a memory delta may go below it when other work on the host frees memory.
fn axis(min: f64, max: f64) -> (f64, f64, f64) {
    let max = if max.is_finite() && max > 0.0 { max } else { 0.0 };
    let min = if min.is_finite() && min < 0.0 { min } else { 0.0 };
    let span = if max - min > 0.0 { max - min } else { 1.0 };
    let step = nice_step(span);
    let low = (min / step).floor() * step;
    let high = ((max / step).ceil() * step).max(low + step);
    (low, high, step)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn label(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

impl Chart {
    pub fn render(&self) -> String {
        let finite = |v: &f64| v.is_finite();
        let all: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| finite(x) && finite(y))
            .collect();
        let (x_min, x_max, x_step) = axis(
            all.iter().map(|p| p.0).fold(0.0, f64::min),
            all.iter().map(|p| p.0).fold(0.0, f64::max),
        );
        let (y_min, y_max, y_step) = axis(
            all.iter().map(|p| p.1).fold(0.0, f64::min),
            all.iter().map(|p| p.1).fold(0.0, f64::max),
        );
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let px = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
        let py = |y: f64| TOP + plot_h - (y - y_min) / (y_max - y_min) * plot_h;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            LEFT + plot_w / 2.0,
            escape(&self.title)
        );
        // Grid lines and tick labels.
        let mut x = x_min;
        while x <= x_max + x_step / 2.0 {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
                px(x),
                TOP,
                TOP + plot_h,
                TOP + plot_h + 16.0,
                label(x)
            );
            x += x_step;
        }
        let mut y = y_min;
        while y <= y_max + y_step / 2.0 {
            let _ = writeln!(
                out,
                r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
                LEFT,
                py(y),
                LEFT + plot_w,
                LEFT - 6.0,
                py(y) + 4.0,
                label(y)
            );
            y += y_step;
        }
        let _ = writeln!(
            out,
            r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 12.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| finite(x) && finite(y))
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            for p in &pts {
                if let Some((cx, cy)) = p.split_once(',') {
                    let _ = writeln!(out, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>"#);
                }
            }
            let ly = TOP + 10.0 + i as f64 * 20.0;
            let lx = LEFT + plot_w + 14.0;
            let _ = writeln!(
                out,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                lx + 20.0,
                lx + 26.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_axes() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(150.0), 50.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(axis(0.0, 143.0), (0.0, 150.0, 50.0));
        assert_eq!(axis(0.0, 0.0), (0.0, 0.2, 0.2));
        assert_eq!(axis(-30.0, 80.0), (-50.0, 100.0, 50.0));
    }

    #[test]
    fn renders_every_series() {
        let chart = Chart {
            title: "a < b".into(),
            x_label: "VMs".into(),
            y_label: "ms".into(),
            series: vec![
                Series {
                    name: "p50".into(),
                    points: vec![(10.0, 5.0), (20.0, 7.5), (30.0, f64::NAN)],
                },
                Series {
                    name: "p99".into(),
                    points: vec![],
                },
            ],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt; b") && svg.contains(">p99</text>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
    }
}
