//! `mezo report`: a run's training-loss and dev-accuracy curves as an SVG image, from the
//! coordinator's stored step log (over `StreamMetrics`, which replays it from step 0, dev
//! accuracies included, also for runs that ended before the coordinator's last restart) or from
//! a `mezo train` step log (`OUT/train_log.jsonl`).
//!
//! SVG because it is plain text we can write without a plotting stack or system fonts, scales
//! to any size, and opens in every browser; each curve is one `<polyline>` with one point per
//! step, so the image is also easy to check.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mezo_proto::v1 as pb;

use crate::service::ClientArgs;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The run on the coordinator (see `mezo run list`).
    #[arg(required_unless_present = "log", conflicts_with = "log")]
    pub run_id: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// A `mezo train` step log (OUT/train_log.jsonl) instead of a coordinator's run.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// The image to write (.svg).
    #[arg(long)]
    pub out: PathBuf,
    /// Steps in the moving average of the smoothed loss curve (default: a 50th of the steps, at
    /// least 5: single-step MeZO losses are noisy).
    #[arg(long)]
    pub smooth: Option<usize>,
}

/// One step: its loss (`None` when skipped or not finite) and the dev accuracy measured after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub step: u64,
    pub loss: Option<f64>,
    pub dev_accuracy: Option<f64>,
}

pub fn report(a: ReportArgs) -> Result<()> {
    if a.out.extension().is_none_or(|e| !e.eq_ignore_ascii_case("svg")) {
        bail!("--out {}: mezo report writes SVG, so the file must end in .svg", a.out.display());
    }
    if a.smooth == Some(0) {
        bail!("--smooth must be at least 1 (steps in the moving average)");
    }
    let (title, points) = match (&a.log, &a.run_id) {
        (Some(log), _) => (format!("mezo train: {}", log.display()), read_log(log)?),
        (None, Some(id)) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            (format!("mezo run {id}"), rt.block_on(fetch(&a.client, id))?)
        }
        (None, None) => bail!("name a RUN on the coordinator, or --log FILE"),
    };
    let smooth = a.smooth.unwrap_or((points.len() / 50).max(5));
    let svg = render_svg(&title, &points, smooth);
    std::fs::write(&a.out, svg).with_context(|| format!("writing {}", a.out.display()))?;
    let evals = points.iter().filter(|p| p.dev_accuracy.is_some()).count();
    println!("{}: {} steps, {evals} dev evaluations -> {}", title, points.len(), a.out.display());
    Ok(())
}

/// The run's logged steps as the coordinator replays them; for a run still training, those logged
/// when we asked (the report does not wait for the run to end).
async fn fetch(client: &ClientArgs, run_id: &str) -> Result<Vec<Point>> {
    let mut c = client.connect().await?;
    let run = c
        .get_run(pb::GetRunRequest { run_id: run_id.into() })
        .await
        .map_err(|s| client.rpc_error(s))?
        .into_inner();
    if run.steps_done == 0 {
        bail!("run `{run_id}` has no logged step yet: nothing to chart");
    }
    let mut stream = c
        .stream_metrics(pb::StreamMetricsRequest { run_id: run_id.into(), from_step: 0 })
        .await
        .map_err(|s| client.rpc_error(s))?
        .into_inner();
    let mut points = Vec::new();
    while let Some(m) = stream.message().await.map_err(|s| client.rpc_error(s))? {
        if m.done {
            break;
        }
        points.push(Point {
            step: m.step,
            loss: (!m.skipped && m.loss.is_finite()).then_some(m.loss),
            dev_accuracy: m.dev_accuracy,
        });
        if m.step + 1 >= run.steps_done {
            break;
        }
    }
    Ok(points)
}

/// `OUT/train_log.jsonl` of `mezo train`: one object a step (a non-finite loss is written as null).
pub fn read_log(path: &std::path::Path) -> Result<Vec<Point>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut points = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: &str| {
            anyhow::anyhow!("{}:{}: {why} (expected a train_log.jsonl line)", path.display(), i + 1)
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let step = v["step"].as_u64().ok_or_else(|| bad("no integer `step`"))?;
        let skipped = v["skipped"].as_bool().unwrap_or(false);
        points.push(Point {
            step,
            loss: v["loss"].as_f64().filter(|l| l.is_finite() && !skipped),
            dev_accuracy: v["dev_accuracy"].as_f64(),
        });
    }
    if points.is_empty() {
        bail!("{}: no step in the log: nothing to chart", path.display());
    }
    Ok(points)
}

/// Round tick values within `[lo, hi]`: multiples of 1, 2 or 5 times a power of ten, the
/// spacing whose count of intervals is nearest `about`.
fn ticks(lo: f64, hi: f64, about: usize) -> Vec<f64> {
    let raw = (hi - lo) / about as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let off = |s: f64| ((hi - lo) / s - about as f64).abs();
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .min_by(|a, b| off(*a).total_cmp(&off(*b)))
        .expect("four candidates");
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn label(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const W: f64 = 960.0;
const H: f64 = 700.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = W - 30.0;

/// A panel's frame in pixels and the data ranges it maps.
struct Panel {
    top: f64,
    bottom: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Panel {
    fn px(&self, step: f64) -> f64 {
        LEFT + (step - self.x.0) / (self.x.1 - self.x.0) * (RIGHT - LEFT)
    }
    fn py(&self, v: f64) -> f64 {
        self.bottom - (v - self.y.0) / (self.y.1 - self.y.0) * (self.bottom - self.top)
    }
    /// Frame, grid, tick labels and axis titles.
    fn axes(&self, svg: &mut String, title: &str, y_label: impl Fn(f64) -> String) {
        let (t, b) = (self.top, self.bottom);
        let _ = writeln!(
            svg,
            r##"<text x="{LEFT}" y="{:.1}" font-size="14" font-weight="bold">{title}</text>"##,
            t - 10.0
        );
        for v in ticks(self.y.0, self.y.1, 5) {
            let y = self.py(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.2}" x2="{RIGHT}" y2="{y:.2}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.2}" text-anchor="end">{}</text>"##,
                LEFT - 6.0,
                y + 4.0,
                y_label(v)
            );
        }
        for v in ticks(self.x.0, self.x.1, 8) {
            let x = self.px(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.2}" y1="{t}" x2="{x:.2}" y2="{b}" stroke="#f0f0f0"/><text x="{x:.2}" y="{:.1}" text-anchor="middle">{}</text>"##,
                b + 16.0,
                label(v)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{t}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/><text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"##,
            RIGHT - LEFT,
            b - t,
            (LEFT + RIGHT) / 2.0,
            b + 32.0
        );
    }
}

fn polyline(svg: &mut String, class: &str, stroke: &str, width: f64, pts: &[(f64, f64)]) {
    let coords: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.2},{y:.2}")).collect();
    let _ = writeln!(
        svg,
        r##"<polyline class="{class}" fill="none" stroke="{stroke}" stroke-width="{width}" stroke-linejoin="round" points="{}"/>"##,
        coords.join(" ")
    );
}

/// The loss panel (each step's loss, thin, and its trailing moving average over `smooth` steps,
/// thick; skipped steps marked in red along the bottom) above the dev-accuracy panel.
pub fn render_svg(title: &str, points: &[Point], smooth: usize) -> String {
    let first = points.first().map_or(0, |p| p.step) as f64;
    let last = points.last().map_or(0, |p| p.step) as f64;
    let x = if last > first { (first, last) } else { (first - 0.5, first + 0.5) };
    let losses: Vec<(f64, f64)> = points.iter().filter_map(|p| Some((p.step as f64, p.loss?))).collect();
    let evals: Vec<(f64, f64)> =
        points.iter().filter_map(|p| Some((p.step as f64, p.dev_accuracy?))).collect();
    let window = smooth.max(1);
    let smoothed: Vec<(f64, f64)> = losses
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let w = &losses[i.saturating_sub(window - 1)..=i];
            (s, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>"##
    );
    let best = evals.iter().copied().fold(None, |b: Option<(f64, f64)>, e| match b {
        Some(b) if b.1 >= e.1 => Some(b),
        _ => Some(e),
    });
    // The title on its own line, cut from the left when long (a log's path: its end says most).
    let chars: Vec<char> = title.chars().collect();
    let shown: String = if chars.len() > 110 {
        std::iter::once('…').chain(chars[chars.len() - 109..].iter().copied()).collect()
    } else {
        title.into()
    };
    let _ = writeln!(svg, r##"<text x="{LEFT}" y="22" font-size="15">{}</text>"##, escape(&shown));
    let mut headline = format!("{} steps", points.len());
    match (smoothed.last(), window.min(losses.len())) {
        (Some(&(_, l)), 1) => {
            let _ = write!(headline, ", final loss {l:.4}");
        }
        (Some(&(_, l)), n) => {
            let _ = write!(headline, ", final loss {l:.4} (mean of the last {n})");
        }
        (None, _) => {}
    }
    if let Some((s, a)) = best {
        let _ = write!(headline, ", best dev accuracy {:.1}% at step {s}", 100.0 * a);
    }
    let _ = writeln!(svg, r##"<text x="{LEFT}" y="42" fill="#444">{headline}</text>"##);

    // Training loss.
    let (lo, hi) =
        losses.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    let loss_panel = Panel { top: 80.0, bottom: 380.0, x, y: (lo - pad, hi + pad) };
    loss_panel.axes(&mut svg, "Training loss", label);
    let to_px = |panel: &Panel, pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        pts.iter().map(|&(s, v)| (panel.px(s), panel.py(v))).collect()
    };
    polyline(&mut svg, "loss", "#9ecae1", 1.0, &to_px(&loss_panel, &losses));
    polyline(&mut svg, "loss-smoothed", "#08519c", 2.0, &to_px(&loss_panel, &smoothed));
    for p in points.iter().filter(|p| p.loss.is_none()) {
        let xp = loss_panel.px(p.step as f64);
        let _ = writeln!(
            svg,
            r##"<line class="skipped" x1="{xp:.2}" y1="{:.1}" x2="{xp:.2}" y2="{:.1}" stroke="#cb181d" stroke-width="2"/>"##,
            loss_panel.bottom - 8.0,
            loss_panel.bottom
        );
    }
    let legend_y = loss_panel.top + 16.0;
    let _ = writeln!(
        svg,
        r##"<g font-size="11"><line x1="{0}" y1="{legend_y}" x2="{1}" y2="{legend_y}" stroke="#9ecae1"/><text x="{2}" y="{3}">loss of each step</text><line x1="{0}" y1="{4}" x2="{1}" y2="{4}" stroke="#08519c" stroke-width="2"/><text x="{2}" y="{5}">mean of the last {6} steps</text></g>"##,
        RIGHT - 190.0,
        RIGHT - 165.0,
        RIGHT - 160.0,
        legend_y + 4.0,
        legend_y + 16.0,
        legend_y + 20.0,
        window
    );

    // Dev accuracy.
    let (alo, ahi) =
        evals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (alo, ahi) = if alo.is_finite() {
        (((alo - 0.02) * 10.0).floor().max(0.0) / 10.0, (((ahi + 0.02) * 10.0).ceil() / 10.0).min(1.0))
    } else {
        (0.0, 1.0)
    };
    let acc_panel = Panel { top: 450.0, bottom: 650.0, x, y: (alo, ahi.max(alo + 0.1)) };
    acc_panel.axes(&mut svg, "Dev accuracy", |v| format!("{}%", label(100.0 * v)));
    let acc_px = to_px(&acc_panel, &evals);
    polyline(&mut svg, "dev-accuracy", "#d94801", 2.0, &acc_px);
    for (xp, yp) in &acc_px {
        let _ =
            writeln!(svg, r##"<circle class="dev-point" cx="{xp:.2}" cy="{yp:.2}" r="3" fill="#d94801"/>"##);
    }
    if evals.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#777">no dev evaluation in this run (--eval-every 0)</text>"##,
            (LEFT + RIGHT) / 2.0,
            (acc_panel.top + acc_panel.bottom) / 2.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let labels = |t: Vec<f64>| t.into_iter().map(label).collect::<Vec<_>>().join(" ");
        assert_eq!(labels(ticks(0.0, 1.0, 5)), "0 0.2 0.4 0.6 0.8 1");
        assert_eq!(labels(ticks(0.0, 40.0, 8)), "0 5 10 15 20 25 30 35 40");
        assert_eq!(labels(ticks(3.0, 1234.0, 8)), "200 400 600 800 1000 1200");
        let t = ticks(0.4123, 0.9871, 5);
        assert!(t.len() >= 4 && t[0] >= 0.4123 && *t.last().unwrap() <= 0.9871, "{t:?}");
        assert_eq!(label(0.30000000000000004), "0.3");
        assert_eq!(label(-0.0), "0");
    }

    #[test]
    fn one_point_per_step_and_skipped_steps_marked() {
        let points: Vec<Point> = (0..10)
            .map(|s| Point {
                step: s,
                loss: (s != 4).then_some(1.0 - s as f64 * 0.05),
                dev_accuracy: (s % 5 == 4).then_some(0.5 + s as f64 * 0.01),
            })
            .collect();
        let svg = render_svg("a <run>", &points, 3);
        let count = |class: &str| {
            let at = svg.find(&format!("class=\"{class}\"")).unwrap();
            let pts = &svg[at..];
            let pts = &pts[pts.find("points=\"").unwrap() + 8..];
            pts[..pts.find('"').unwrap()].split(' ').count()
        };
        assert_eq!(count("loss"), 9, "the skipped step has no loss point");
        assert_eq!(count("loss-smoothed"), 9);
        assert_eq!(count("dev-accuracy"), 2);
        assert_eq!(svg.matches("class=\"skipped\"").count(), 1);
        assert!(svg.contains(">a &lt;run&gt;</text>") && svg.contains(">10 steps, final loss"), "{svg}");
        assert!(svg.contains("best dev accuracy 59.0% at step 9"), "{svg}");
    }
}
