//! What users drive the service with, end to end against real processes: the Python client
//! example in deploy/clients/python (stubs generated from proto/, a run started, watched to the
//! end and exported), gRPC server reflection as grpcurl uses it (both protocol versions), `mezo
//! report`'s SVG from the stored log (also after a coordinator restart), and the progress bars of
//! `mezo train` and `mezo run watch` with their ETA, drawn on a real pseudo-terminal.

mod cluster;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cluster::*;
use common::*;
use serde_json::Value;

fn client(c: &Cluster, args: &[&str]) -> std::process::Output {
    let script = repo_root().join("deploy/clients/python/mezo_client.py");
    Command::new(python())
        .arg(script)
        .args(["--coordinator", &c.addr()])
        .args(args)
        .env("MEZO_CLIENT_STUBS", c.dir.join("stubs"))
        .output()
        .expect("python3 runs")
}

fn client_ok(c: &Cluster, args: &[&str]) -> String {
    let o = client(c, args);
    assert!(o.status.success(), "mezo_client.py {args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// The `points` of the `<polyline class="CLASS">` as (x, y).
fn polyline(svg: &str, class: &str) -> Vec<(f64, f64)> {
    let at = svg.find(&format!("<polyline class=\"{class}\"")).unwrap_or_else(|| panic!("no {class} curve"));
    let rest = &svg[at..];
    let pts = &rest[rest.find("points=\"").unwrap() + 8..];
    let pts = &pts[..pts.find('"').unwrap()];
    if pts.is_empty() {
        return vec![];
    }
    pts.split(' ')
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

/// The curve is the data: pixels are one affine map of (step, value) for every point.
fn assert_plots(points: &[(f64, f64)], data: &[(f64, f64)], what: &str) {
    assert_eq!(points.len(), data.len(), "{what}: one point per value");
    let (i, j) = (0, data.len() - 1);
    let sx = (points[j].0 - points[i].0) / (data[j].0 - data[i].0);
    let (lo, hi) = data.iter().enumerate().fold((0, 0), |(lo, hi), (k, d)| {
        (if d.1 < data[lo].1 { k } else { lo }, if d.1 > data[hi].1 { k } else { hi })
    });
    let sy = (points[hi].1 - points[lo].1) / (data[hi].1 - data[lo].1);
    assert!(sx > 0.0 && sy < 0.0, "{what}: steps go right and larger values up");
    for (p, d) in points.iter().zip(data) {
        let x = points[i].0 + sx * (d.0 - data[i].0);
        let y = points[lo].1 + sy * (d.1 - data[lo].1);
        assert!((p.0 - x).abs() < 0.02 && (p.1 - y).abs() < 0.02, "{what}: {p:?} does not plot {d:?}");
    }
}

#[test]
fn python_client_reflection_and_report_against_a_live_fleet() {
    let started = Instant::now();
    let mut c = Cluster::new("clients", "python", 2);
    let a = repo_root().join("crates/mezo-cli/assets");
    let (model, data) = (a.join("opt-mini"), a.join("sst2"));
    #[rustfmt::skip]
    let id = client_ok(&c, &[
        "start", "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "--steps", "24",
        "--eval-every", "8", "--n-train", "64", "--n-dev", "16", "--batch-size", "8", "--directions", "2",
        "--lr", "1e-3", "--run-id", "py",
    ]);
    assert_eq!(id.trim(), "py");

    // watch: every step once, in order, dev accuracy where evaluated, then the final status.
    let lines: Vec<Value> =
        client_ok(&c, &["watch", "py"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (steps, last) = lines.split_at(lines.len() - 1);
    assert_eq!(last[0], serde_json::json!({"done": true, "status": "completed"}));
    assert_eq!(
        steps.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(),
        (0..24).collect::<Vec<_>>()
    );
    let evaluated: Vec<u64> = steps
        .iter()
        .filter(|l| l.get("dev_accuracy").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evaluated, [7, 15, 23], "dev accuracy after every 8th step");

    // export: the same adapter, byte for byte, as `mezo run export`.
    let (py_out, cli_out) = (c.dir.join("py-adapter"), c.dir.join("cli-adapter"));
    let v: Value =
        serde_json::from_str(&client_ok(&c, &["export", "py", "--out", py_out.to_str().unwrap()])).unwrap();
    assert_eq!(v["step"], 24);
    mezo_ok(&["run", "export", "py", "--coordinator", &c.url(), "--out", cli_out.to_str().unwrap()]);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(py_out.join(f)).unwrap(), std::fs::read(cli_out.join(f)).unwrap(), "{f}");
    }
    let list = client_ok(&c, &["list"]);
    assert!(list.contains(r#""run_id": "py", "status": "completed", "steps_done": 24"#), "{list}");
    // A user's mistake comes back as the coordinator's message, with a non-zero exit.
    let o = client(&c, &["get", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOT_FOUND: run \"nope\" not found"), "{o:?}");

    // Reflection, as grpcurl uses it: services listed, the public API resolved from the server's
    // descriptors alone, and a call built from them.
    for version in ["v1", "v1alpha"] {
        let r: Value = serde_json::from_str(&client_ok(&c, &["reflect", "--version", version])).unwrap();
        assert_eq!(
            r["services"],
            serde_json::json!([
                format!("grpc.reflection.{version}.ServerReflection"),
                "mezo.v1.MezoService",
                "mezo.v1.WorkerService"
            ]),
            "{r}"
        );
        assert_eq!(r["files"], serde_json::json!(["mezo/v1/mezo.proto", "mezo/v1/run.proto"]), "{r}");
        let m = &r["methods"];
        assert_eq!(m.as_object().unwrap().len(), 6, "{r}");
        assert_eq!(m["StartRun"]["input"], "mezo.v1.StartRunRequest");
        assert_eq!(m["StreamMetrics"]["server_streaming"], true);
        assert_eq!(m["ExportAdapter"]["output"], "mezo.v1.ExportAdapterResponse");
        assert_eq!(r["runs"], serde_json::json!(["py"]), "ListRuns through reflection alone");
    }

    // mezo report: one point per step on the loss curve, one per evaluation on the accuracy
    // curve, each where the logged value puts it.
    let svg_path = c.dir.join("py.svg");
    let out = mezo_ok(&[
        "report",
        "py",
        "--coordinator",
        &c.url(),
        "--out",
        svg_path.to_str().unwrap(),
        "--smooth",
        "4",
    ]);
    assert!(out.contains("24 steps, 3 dev evaluations"), "{out}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let losses: Vec<(f64, f64)> =
        steps.iter().map(|l| (l["step"].as_f64().unwrap(), l["loss"].as_f64().unwrap())).collect();
    assert_plots(&polyline(&svg, "loss"), &losses, "loss");
    let smoothed: Vec<(f64, f64)> = (0..24usize)
        .map(|i| {
            let w = &losses[i.saturating_sub(3)..=i];
            (losses[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    assert_plots(&polyline(&svg, "loss-smoothed"), &smoothed, "4-step mean");
    let accs: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|l| Some((l["step"].as_f64().unwrap(), l.get("dev_accuracy")?.as_f64().unwrap())))
        .collect();
    assert_eq!(polyline(&svg, "dev-accuracy").len(), 3);
    assert_eq!(svg.matches("class=\"dev-point\"").count(), 3);
    if accs.iter().any(|a| a.1 != accs[0].1) {
        assert_plots(&polyline(&svg, "dev-accuracy"), &accs, "dev accuracy");
    }
    // A real XML parser accepts it as SVG.
    let check = run_python(&[
        "-c",
        "import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); \
         print(r.tag, r.get('width'), r.get('height'), len(r.findall('{http://www.w3.org/2000/svg}polyline')))",
        svg_path.to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "{http://www.w3.org/2000/svg}svg 960 700 3");

    // After a restart the run is no longer driven by anyone, yet its stored log (dev accuracies
    // included) gives the same image.
    c.start_coordinator();
    let again = c.dir.join("py-after-restart.svg");
    mezo_ok(&["report", "py", "--coordinator", &c.url(), "--out", again.to_str().unwrap(), "--smooth", "4"]);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), svg, "the report changed across a restart");
    // Clear errors for what a user can get wrong.
    let e = mezo_err(&["report", "nope", "--coordinator", &c.url(), "--out", again.to_str().unwrap()]);
    assert!(e.contains("run \"nope\" not found"), "{e}");
    let e = mezo_err(&["report", "py", "--coordinator", &c.url(), "--out", "curves.png"]);
    assert!(e.contains("--out curves.png: mezo report writes SVG"), "{e}");
    eprintln!("clients: python client, reflection and report in {:.1}s", started.elapsed().as_secs_f64());
}

/// Frames of an indicatif bar as the terminal drew them: `(pos, len, steps/s, ETA seconds)`.
fn frames(raw: &[u8]) -> Vec<(u64, u64, f64, u64)> {
    let text = String::from_utf8_lossy(raw);
    let mut out = Vec::new();
    for frame in text.split(['\r', '\n']) {
        let words: Vec<&str> = frame.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "steps") else { continue };
        let Some((pos, len)) = words.get(i.wrapping_sub(1)).and_then(|w| w.split_once('/')) else { continue };
        let Some(e) = words.iter().position(|w| *w == "ETA") else { continue };
        let rate = words[i + 1].trim_end_matches("/s").replace(',', "");
        let hms: Vec<u64> = words[e + 1].split(':').filter_map(|x| x.parse().ok()).collect();
        if let ([h, m, s], Ok(pos), Ok(len), Ok(rate)) = (&hms[..], pos.parse(), len.parse(), rate.parse()) {
            out.push((pos, len, rate, h * 3600 + m * 60 + s));
        }
    }
    out
}

fn on_a_terminal(args: &[&str]) -> Vec<u8> {
    let pty = repo_root().join("tests/py/pty_run.py");
    let bin = mezo_bin();
    let mut cmd = vec![pty.to_str().unwrap(), "160", bin.to_str().unwrap()];
    cmd.extend_from_slice(args);
    run_python(&cmd).stdout
}

/// A bar's ETA is what is left over the rate it shows (whole seconds, so within a second or two).
fn assert_eta_consistent(f: &[(u64, u64, f64, u64)], what: &str) {
    let live: Vec<_> = f.iter().filter(|(p, l, r, _)| p < l && *r > 0.0).collect();
    assert!(!live.is_empty(), "{what}: no frame with a rate: {f:?}");
    assert!(live.iter().any(|x| x.3 >= 1), "{what}: the ETA never showed time left: {f:?}");
    for &&(pos, len, rate, eta) in &live {
        let expected = (len - pos) as f64 / rate;
        assert!(
            (eta as f64 - expected).abs() <= 2.0 + 0.1 * expected,
            "{what}: ETA {eta}s at {pos}/{len} and {rate}/s"
        );
    }
}

#[test]
fn progress_bars_of_train_and_watch_show_a_consistent_eta() {
    let a = repo_root().join("crates/mezo-cli/assets");
    let (model, data) = (a.join("opt-mini"), a.join("sst2"));
    let out = tmp("clients", "train-bar");
    #[rustfmt::skip]
    let raw = on_a_terminal(&[
        "train", "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "--steps", "160",
        "--n-train", "64", "--n-dev", "16", "--test-limit", "16", "--eval-every", "80", "--batch-size", "8",
        "--directions", "2", "--lr", "1e-3", "--out", out.to_str().unwrap(),
    ]);
    let f = frames(&raw);
    assert!(f.len() >= 3, "mezo train drew no bar:\n{}", String::from_utf8_lossy(&raw));
    // Long enough that the bar shows seconds left at this machine's speed (40 steps once took
    // under a second, when the adapter's update on the CPU became one vectorised pass).
    assert!(f.iter().all(|x| x.1 == 160), "{f:?}");
    assert_eta_consistent(&f, "mezo train");
    // The step log `mezo train` wrote charts too.
    let svg = out.join("curves.svg");
    let printed = mezo_ok(&[
        "report",
        "--log",
        out.join("train_log.jsonl").to_str().unwrap(),
        "--out",
        svg.to_str().unwrap(),
    ]);
    assert!(printed.contains("160 steps, 2 dev evaluations"), "{printed}");
    assert_eq!(polyline(&std::fs::read_to_string(&svg).unwrap(), "loss").len(), 160);

    // `mezo run watch` joining a run mid-way: the replayed history is not taken for speed.
    let c = Cluster::new("clients", "watch-bar", 1);
    // Long enough that the bar shows seconds left at this machine's speed (a 90-step run's
    // remaining steps took under a second once SST-2's candidates shared their rows).
    c.start_run("w", 300, &["--eval-every", "100"]);
    c.wait_steps("w", 15, Duration::from_secs(120));
    let raw = on_a_terminal(&["run", "watch", "w", "--coordinator", &c.url()]);
    let f = frames(&raw);
    assert!(String::from_utf8_lossy(&raw).contains("run w: completed"), "{}", String::from_utf8_lossy(&raw));
    let live: Vec<_> = f.iter().filter(|x| x.0 < x.1).collect();
    assert!(live.len() >= 3, "watch drew no bar while the run trained:\n{}", String::from_utf8_lossy(&raw));
    assert!(live[0].0 >= 15, "the bar starts where the run was, not at the replayed steps: {f:?}");
    // One worker on this machine cannot go faster than ~1000 steps/s; the replay would read far above.
    assert!(live.iter().all(|x| x.2 < 1000.0), "the replay leaked into the rate: {f:?}");
    assert_eta_consistent(&f, "mezo run watch");
}
