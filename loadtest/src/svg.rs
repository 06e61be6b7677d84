//! `plot`: a latency-by-percentile chart as a hand-written SVG.
//!
//! The x axis is the percentile on a log scale of `1 / (1 - p)`, so 90%,
//! 99%, 99.9%, ... are evenly spaced; the y axis is the latency. Each result
//! line (its `label` and `percentiles`) becomes one line of the chart.

use std::fmt::Write;
use std::fs;
use std::path::Path;

use crate::cli::PlotArgs;

const WIDTH: f64 = 960.0;
/// Height of the chart without the legend, which goes below it.
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const LEGEND_ROW: f64 = 20.0;

/// Highest percentile on the x axis: 99.999% is 5 on the log scale.
const MAX_NINES: f64 = 5.0;

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One line of the chart: a run's label and `(percentile, microseconds)`.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Reads the inputs and writes the chart to the output file.
pub fn run(args: &PlotArgs) -> Result<(), String> {
    let mut series = Vec::new();
    for input in &args.inputs {
        series.extend(read_series(input)?);
    }
    if series.is_empty() {
        return Err("no result line with latency percentiles in the input".to_string());
    }
    let svg = render(&series, &args.title, args.log_latency);
    fs::write(&args.output, svg)
        .map_err(|error| format!("cannot write {}: {error}", args.output.display()))?;
    eprintln!("wrote {} ({} lines)", args.output.display(), series.len());
    Ok(())
}

/// Reads the result lines of `path` that carry percentiles.
fn read_series(path: &Path) -> Result<Vec<Series>, String> {
    let text = fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let mut series = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|error| format!("{}:{}: invalid JSON: {error}", path.display(), number + 1))?;
        let points: Vec<(f64, f64)> = value["percentiles"]
            .as_array()
            .map(|pairs| {
                pairs
                    .iter()
                    .filter_map(|pair| Some((pair.get(0)?.as_f64()?, pair.get(1)?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        if points.is_empty() {
            continue;
        }
        let label = value["label"].as_str().map_or_else(
            || format!("{}:{}", path.display(), number + 1),
            str::to_string,
        );
        series.push(Series { label, points });
    }
    Ok(series)
}

/// Returns the x position of `percentile` in "nines": 0 for 0%, 1 for 90%,
/// 2 for 99%, capped at 99.999%.
pub fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(10f64.powf(-MAX_NINES));
    -rest.log10()
}

/// Maps latencies to the vertical axis.
struct LatencyAxis {
    log: bool,
    low: f64,
    high: f64,
    ticks: Vec<f64>,
}

impl LatencyAxis {
    fn new(series: &[Series], log: bool) -> LatencyAxis {
        let values = series
            .iter()
            .flat_map(|s| s.points.iter().map(|point| point.1));
        let max = values.clone().fold(1.0, f64::max);
        if log {
            let min = values.fold(f64::MAX, f64::min).max(1.0);
            let low = min.log10().floor();
            let high = max.log10().ceil().max(low + 1.0);
            let ticks = (low as i32..=high as i32)
                .map(|exp| 10f64.powi(exp))
                .collect();
            return LatencyAxis {
                log,
                low,
                high,
                ticks,
            };
        }
        let step = nice_step(max / 5.0);
        let high = (max / step).ceil() * step;
        let ticks = (0..=(high / step).round() as u32)
            .map(|i| f64::from(i) * step)
            .collect();
        LatencyAxis {
            log,
            low: 0.0,
            high,
            ticks,
        }
    }

    /// Returns the y coordinate of `micros`.
    fn y(&self, micros: f64) -> f64 {
        let value = if self.log {
            micros.max(1.0).log10()
        } else {
            micros
        };
        let fraction = (value - self.low) / (self.high - self.low);
        HEIGHT - BOTTOM - fraction * (HEIGHT - TOP - BOTTOM)
    }
}

/// Rounds `raw` up to 1, 2 or 5 times a power of ten.
pub fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1.0);
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let factor = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|factor| normalized <= *factor)
        .unwrap_or(10.0);
    factor * magnitude
}

/// Renders the chart as an SVG document.
pub fn render(series: &[Series], title: &str, log: bool) -> String {
    let max_nines = series
        .iter()
        .flat_map(|s| s.points.iter().map(|point| nines(point.0)))
        .fold(2.0, f64::max)
        .ceil()
        .min(MAX_NINES);
    let x = |percentile: f64| {
        LEFT + nines(percentile).min(max_nines) / max_nines * (WIDTH - LEFT - RIGHT)
    };
    let axis = LatencyAxis::new(series, log);
    let height = HEIGHT + 10.0 + series.len() as f64 * LEGEND_ROW;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" font-size="16" text-anchor="middle">{}</text>"#,
        (WIDTH - RIGHT + LEFT) / 2.0,
        escape(title)
    );
    write_x_axis(&mut svg, max_nines, &x);
    write_y_axis(&mut svg, &axis);
    for (index, line) in series.iter().enumerate() {
        write_series(
            &mut svg,
            line,
            COLORS[index % COLORS.len()],
            index,
            &x,
            &axis,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn write_x_axis(svg: &mut String, max_nines: f64, x: &impl Fn(f64) -> f64) {
    let bottom = HEIGHT - BOTTOM;
    for nine in 0..=max_nines as u32 {
        let percentile = 100.0 * (1.0 - 10f64.powi(-(nine as i32)));
        let at = x(percentile);
        let label = if nine == 0 {
            "0%".to_string()
        } else {
            format!("{}%", trim(percentile))
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{at:.1}" y1="{TOP}" x2="{at:.1}" y2="{bottom}" stroke="#ddd"/><text x="{at:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#333"/><text x="{}" y="{}" text-anchor="middle">percentile</text>"##,
        WIDTH - RIGHT,
        (WIDTH - RIGHT + LEFT) / 2.0,
        HEIGHT - 15.0
    );
}

fn write_y_axis(svg: &mut String, axis: &LatencyAxis) {
    for &tick in &axis.ticks {
        let at = axis.y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{at:.1}" x2="{}" y2="{at:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            at + 4.0,
            format_micros(tick)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="#333"/><text transform="translate(18 {}) rotate(-90)" text-anchor="middle">latency</text>"##,
        HEIGHT - BOTTOM,
        (HEIGHT - BOTTOM + TOP) / 2.0
    );
}

fn write_series(
    svg: &mut String,
    series: &Series,
    color: &str,
    index: usize,
    x: &impl Fn(f64) -> f64,
    axis: &LatencyAxis,
) {
    let points: Vec<String> = series
        .points
        .iter()
        .filter(|(percentile, _)| *percentile < 100.0)
        .map(|&(percentile, micros)| format!("{:.1},{:.1}", x(percentile), axis.y(micros)))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
        points.join(" ")
    );
    let legend_x = LEFT;
    let legend_y = HEIGHT + 5.0 + index as f64 * LEGEND_ROW;
    let _ = writeln!(
        svg,
        r#"<line x1="{legend_x}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
        legend_x + 20.0,
        legend_x + 26.0,
        legend_y + 4.0,
        escape(&series.label)
    );
}

/// Formats a latency as microseconds below 1 ms, else milliseconds.
fn format_micros(micros: f64) -> String {
    if micros >= 1000.0 {
        format!("{} ms", trim(micros / 1000.0))
    } else {
        format!("{} us", trim(micros))
    }
}

/// Formats a number with up to 3 decimals and no trailing zeros.
fn trim(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_spaces_percentiles_evenly() {
        assert!(nines(0.0).abs() < 1e-9);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert!((nines(100.0) - MAX_NINES).abs() < 1e-9);
    }

    #[test]
    fn nice_step_rounds_up() {
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(120.0), 200.0);
        assert_eq!(nice_step(1000.0), 1000.0);
        assert_eq!(nice_step(0.2), 1.0);
    }

    #[test]
    fn render_draws_one_line_per_series() {
        let series = vec![
            Series {
                label: "a <b>".to_string(),
                points: vec![(0.0, 100.0), (90.0, 200.0), (99.0, 900.0), (100.0, 5000.0)],
            },
            Series {
                label: "c".to_string(),
                points: vec![(0.0, 50.0), (99.9, 2500.0)],
            },
        ];
        for log in [false, true] {
            let svg = render(&series, "title", log);
            assert_eq!(svg.matches("<polyline").count(), 2);
            assert!(svg.contains("a &lt;b&gt;"));
            assert!(svg.contains("99.9%"));
            assert!(svg.ends_with("</svg>\n"));
        }
    }

    #[test]
    fn latency_labels_switch_to_milliseconds() {
        assert_eq!(format_micros(250.0), "250 us");
        assert_eq!(format_micros(2500.0), "2.5 ms");
    }
}
