//! Charts drawn on the server as SVG: stacked bars over time, lines, sparklines, an
//! invocation's timeline per worker and an action's waterfall. Each chart names
//! itself for screen readers (`role="img"` with a title).

use maud::{html, Markup};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 160.0;
/// Colours that stay apart for the common kinds of colour blindness.
pub const BLUE: &str = "#0072b2";
pub const ORANGE: &str = "#e69f00";
pub const RED: &str = "#d55e00";
pub const GREEN: &str = "#009e73";
pub const GREY: &str = "#999999";

/// One series: its name, its colour, a value per slot.
pub struct Series<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    pub values: Vec<f64>,
}

fn legend(series: &[Series]) -> Markup {
    html! {
        ul.legend {
            @for s in series {
                li { span.swatch style={ "background:" (s.colour) } {} (s.name) }
            }
        }
    }
}

/// Bars stacked per slot (one slot a minute, say), oldest on the left.
pub fn stacked_bars(title: &str, series: &[Series], first: &str, last: &str) -> Markup {
    let slots = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let totals: Vec<f64> = (0..slots)
        .map(|i| {
            series
                .iter()
                .map(|s| s.values.get(i).copied().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let top = totals.iter().copied().fold(0.0, f64::max).max(1.0);
    let width = WIDTH / slots.max(1) as f64;
    let mut rects = Vec::new();
    for i in 0..slots {
        let mut y = HEIGHT;
        for s in series {
            let v = s.values.get(i).copied().unwrap_or(0.0);
            if v > 0.0 {
                let h = v / top * HEIGHT;
                y -= h;
                rects.push((i as f64 * width, y, h, s.colour, format!("{}: {v}", s.name)));
            }
        }
    }
    html! {
        figure {
            svg role="img" aria-label=(title) width=(WIDTH) height=(HEIGHT + 20.0)
                viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 20.0) } {
                title { (title) }
                @for (x, y, h, colour, label) in &rects {
                    rect x=(format!("{x:.1}")) y=(format!("{y:.1}"))
                        width=(format!("{:.1}", (width - 0.5).max(0.5))) height=(format!("{h:.1}"))
                        fill=(colour) {
                        title { (label) }
                    }
                }
                line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) stroke="#444" {}
                text x="0" y=(HEIGHT + 15.0) font-size="11" { (first) }
                text x=(WIDTH) y=(HEIGHT + 15.0) font-size="11" text-anchor="end" { (last) }
                text x="2" y="11" font-size="11" { "max " (top) }
            }
            figcaption { (title) (legend(series)) }
        }
    }
}

/// Lines, one per series, over the same slots.
pub fn lines(title: &str, series: &[Series], first: &str, last: &str) -> Markup {
    let slots = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max)
        .max(1.0);
    let step = WIDTH / (slots.max(2) - 1) as f64;
    html! {
        figure {
            svg role="img" aria-label=(title) width=(WIDTH) height=(HEIGHT + 20.0)
                viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 20.0) } {
                title { (title) }
                @for s in series {
                    @let points: Vec<String> = s.values.iter().enumerate()
                        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, HEIGHT - v / top * HEIGHT))
                        .collect();
                    polyline points=(points.join(" ")) fill="none" stroke=(s.colour) stroke-width="2" {
                        title { (s.name) }
                    }
                }
                line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) stroke="#444" {}
                text x="0" y=(HEIGHT + 15.0) font-size="11" { (first) }
                text x=(WIDTH) y=(HEIGHT + 15.0) font-size="11" text-anchor="end" { (last) }
                text x="2" y="11" font-size="11" { "max " (top) }
            }
            figcaption { (title) (legend(series)) }
        }
    }
}

/// A small line of values between 0 and 1 (a failure rate, say).
pub fn sparkline(label: &str, values: &[f64]) -> Markup {
    let (w, h) = (120.0, 24.0);
    let step = w / (values.len().max(2) - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                h - v.clamp(0.0, 1.0) * (h - 2.0) - 1.0
            )
        })
        .collect();
    html! {
        svg.spark role="img" aria-label=(label) width=(w) height=(h) viewBox={ "0 0 " (w) " " (h) } {
            title { (label) }
            line x1="0" y1=(h - 1.0) x2=(w) y2=(h - 1.0) stroke="#ccc" {}
            @if values.len() == 1 {
                circle cx="1" cy=(format!("{:.1}", h - values[0].clamp(0.0, 1.0) * (h - 2.0) - 1.0)) r="1.5" fill=(RED) {}
            } @else {
                polyline points=(points.join(" ")) fill="none" stroke=(RED) stroke-width="1.5" {}
            }
        }
    }
}

/// One bar of a timeline: seconds from the start, a label, a link.
pub struct Bar {
    pub start: f64,
    pub end: f64,
    pub label: String,
    pub href: String,
    pub failed: bool,
}

/// Bars in lanes (one per worker), over `span` seconds.
pub fn timeline(title: &str, lanes: &[(String, Vec<Bar>)], span: f64) -> Markup {
    let lane_height = 18.0;
    let label_width = 160.0;
    let plot = WIDTH - label_width;
    let span = span.max(0.001);
    let height = lanes.len() as f64 * lane_height + 20.0;
    html! {
        figure {
            svg role="img" aria-label=(title) width=(WIDTH) height=(height)
                viewBox={ "0 0 " (WIDTH) " " (height) } {
                title { (title) }
                @for (row, (lane, bars)) in lanes.iter().enumerate() {
                    @let y = row as f64 * lane_height;
                    text x="0" y=(y + 13.0) font-size="11" { (lane) }
                    @for bar in bars {
                        @let x = label_width + bar.start / span * plot;
                        @let w = ((bar.end - bar.start) / span * plot).max(1.0);
                        a href=(bar.href) {
                            rect x=(format!("{x:.1}")) y=(y + 2.0) width=(format!("{w:.1}"))
                                height=(lane_height - 4.0) fill=(if bar.failed { RED } else { BLUE }) {
                                title { (bar.label) }
                            }
                        }
                    }
                }
                text x=(label_width) y=(height - 4.0) font-size="11" { "0 s" }
                text x=(WIDTH) y=(height - 4.0) font-size="11" text-anchor="end" { (format!("{span:.1} s")) }
            }
            figcaption { (title) }
        }
    }
}

/// An action's stages as a waterfall: (stage, start, end) in seconds from the first.
pub fn waterfall(title: &str, stages: &[(&str, f64, f64)]) -> Markup {
    let span = stages.iter().map(|s| s.2).fold(0.0, f64::max).max(0.001);
    let row = 22.0;
    let label_width = 150.0;
    let plot = WIDTH - label_width - 70.0;
    let height = stages.len() as f64 * row + 6.0;
    html! {
        figure {
            svg role="img" aria-label=(title) width=(WIDTH) height=(height)
                viewBox={ "0 0 " (WIDTH) " " (height) } {
                title { (title) }
                @for (i, (name, start, end)) in stages.iter().enumerate() {
                    @let y = i as f64 * row;
                    @let x = label_width + start / span * plot;
                    @let w = ((end - start) / span * plot).max(1.0);
                    text x="0" y=(y + 15.0) font-size="12" { (name) }
                    rect x=(format!("{x:.1}")) y=(y + 3.0) width=(format!("{w:.1}")) height=(row - 6.0) fill=(BLUE) {
                        title { (name) ": " (format!("{:.3} s", end - start)) }
                    }
                    text x=(format!("{:.1}", x + w + 4.0)) y=(y + 15.0) font-size="11" { (format!("{:.3} s", end - start)) }
                }
            }
            figcaption { (title) }
        }
    }
}
