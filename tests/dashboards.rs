//! The Grafana dashboards against a real Prometheus (Debian's `prometheus` package) scraping a
//! live coordinator with a run in progress: every panel's PromQL and every variable query must
//! return data, every exported metric must be charted, and the alert rules must evaluate cleanly.
//! Prometheus' config is deploy/prometheus/prometheus.yml itself, with the target and interval
//! swapped for the test's.

mod cluster;
mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::*;
use common::*;
use serde_json::Value;

/// The window `$__rate_interval` stands for here: Grafana makes it at least four scrape
/// intervals; 10 one-second scrapes leave room for a slow CI machine.
const RATE_INTERVAL: &str = "10s";

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join("dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 3, "training, fleet and system dashboards in {}", dir.display());
    out
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter());
        }
    }
    out
}

/// A panel expression with Grafana's variables replaced by what they stand for on this
/// Prometheus: every coordinator (the variable's "All") and the rate window.
fn substitute(expr: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [("__rate_interval", RATE_INTERVAL), ("__interval", "1s"), ("instance", ".*")] {
        for form in [format!("${{{var}}}"), format!("[[{var}]]"), format!("${var}")] {
            e = e.replace(&form, value);
        }
    }
    assert!(!e.contains('$') && !e.contains("[["), "an unknown Grafana variable is left in `{e}`");
    e
}

#[test]
fn dashboards_are_well_formed_grafana_models() {
    let mut uids = HashSet::new();
    for (file, d) in dashboards() {
        assert!(uids.insert(d["uid"].as_str().unwrap().to_string()), "{file}: uid repeats");
        assert!(d["title"].as_str().is_some_and(|t| t.starts_with("mezo")), "{file}: title");
        assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "{file}: schemaVersion");
        let vars: Vec<&str> =
            d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(vars, ["datasource", "instance"], "{file}: template variables");
        let mut ids = HashSet::new();
        let mut cells = HashSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{file}: panel id of `{title}` repeats");
            assert!(
                !p["description"].as_str().unwrap_or_default().is_empty(),
                "{file}: `{title}` has no description"
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: `{title}` must use the datasource variable"
            );
            // Panels tile the 24-column grid without overlapping.
            let g = &p["gridPos"];
            let (x, y, w, h) = [&g["x"], &g["y"], &g["w"], &g["h"]].map(|v| v.as_u64().unwrap()).into();
            assert!(w > 0 && h > 0 && x + w <= 24, "{file}: `{title}` gridPos {g}");
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(
                        cells.insert((cx, cy)),
                        "{file}: `{title}` overlaps another panel at ({cx}, {cy})"
                    );
                }
            }
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: `{title}` has no query");
            let refs: HashSet<&str> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
            assert_eq!(refs.len(), targets.len(), "{file}: `{title}` repeats a refId");
            for t in targets {
                substitute(t["expr"].as_str().unwrap());
            }
        }
    }
}

/// `(value of a 200 reply's JSON "data", or the error)` for a Prometheus API call.
fn api(port: u16, path_and_query: &str) -> Result<Value, String> {
    let (status, body) = http_get(port, path_and_query);
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(v["data"].clone())
}

/// The instant vector of `expr` as `(labels, value)`.
fn query(port: u16, expr: &str) -> Result<Vec<(Value, f64)>, String> {
    let data = api(port, &format!("/api/v1/query?query={}", url_encode(expr)))?;
    let rows = data["result"].as_array().ok_or_else(|| format!("not a vector: {data}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let v = r["value"][1].as_str().unwrap_or("NaN");
            (r["metric"].clone(), v.parse::<f64>().unwrap_or(f64::NAN))
        })
        .collect())
}

fn prometheus_binary() -> PathBuf {
    let p = PathBuf::from(std::env::var_os("MEZO_PROMETHEUS").unwrap_or_else(|| "prometheus".into()));
    match Command::new(&p).arg("--version").output() {
        Ok(o) if o.status.success() => p,
        r => panic!(
            "`{}` is not runnable ({r:?}): this test needs a real Prometheus. Install the Debian package \
             (apt-get install -y prometheus; scripts/setup.sh does when run as root) or set MEZO_PROMETHEUS",
            p.display()
        ),
    }
}

#[test]
fn every_panel_query_returns_data_from_prometheus_scraping_a_live_run() {
    let started = Instant::now();
    let prometheus = prometheus_binary();
    let boards = dashboards();
    let c = Cluster::new("dashboards", "live", 2);
    // Long enough to still be running when the last query is made; stopped at the end. Dev
    // evaluations and snapshots (every 5 steps) feed the accuracy and checkpoint panels.
    c.start_run("live", 100_000, &["--eval-every", "4"]);

    // deploy/prometheus/prometheus.yml, pointed at this coordinator and scraping every second.
    let deploy = repo_root().join("deploy/prometheus");
    let config = std::fs::read_to_string(deploy.join("prometheus.yml")).unwrap();
    let target = format!("127.0.0.1:{}", c.metrics_port);
    let mut ours = config.clone();
    for (from, to) in [
        ("scrape_interval: 5s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("\"coordinator:9464\"", &format!("\"{target}\"")),
    ] {
        assert!(ours.contains(from), "deploy/prometheus/prometheus.yml no longer has `{from}`:\n{config}");
        ours = ours.replace(from, to);
    }
    let pdir = c.dir.join("prometheus");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("prometheus.yml"), ours).unwrap();
    std::fs::copy(deploy.join("rules.yml"), pdir.join("rules.yml")).unwrap();
    let port = free_port();
    let _prom = Proc::spawn(
        &prometheus,
        &[
            &format!("--config.file={}", pdir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", pdir.join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ],
        c.dir.join("prometheus.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(150);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || !http_get(port, "/-/ready").0.contains("200")
    {
        assert!(Instant::now() < deadline, "Prometheus did not become ready:\n{}", _prom.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Enough scrapes for a full rate window while the run trains.
    let first_scrape = loop {
        if query(port, "up{job=\"mezo-coordinator\"} == 1").is_ok_and(|r| !r.is_empty()) {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped {target}:\n{}", _prom.log());
        std::thread::sleep(Duration::from_millis(200));
    };

    // Every panel's queries, retried until each returns at least one finite value (counters
    // need two samples in the window, the accuracy gauge a first evaluation).
    let mut pending: Vec<(String, String, String)> = Vec::new();
    for (file, d) in &boards {
        for p in panels(d) {
            for t in p["targets"].as_array().unwrap() {
                let title = p["title"].as_str().unwrap().to_string();
                pending.push((
                    format!("{file}: {title} [{}]", t["refId"]),
                    t["expr"].as_str().unwrap().into(),
                    String::new(),
                ));
            }
        }
    }
    let total = pending.len();
    while first_scrape.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(200));
    }
    loop {
        for (_, expr, why) in pending.iter_mut() {
            *why = match query(port, &substitute(expr)) {
                Err(e) => format!("error: {e}"),
                Ok(rows) if rows.is_empty() => "no series".into(),
                Ok(rows) if !rows.iter().any(|(_, v)| v.is_finite()) => format!("no finite value: {rows:?}"),
                Ok(_) => String::new(),
            };
        }
        pending.retain(|(_, _, why)| !why.is_empty());
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let failed: Vec<String> =
        pending.iter().map(|(what, expr, why)| format!("{what}\n    {expr}\n    -> {why}")).collect();
    assert!(
        failed.is_empty(),
        "{} of {total} panel queries returned no data:\n{}\ncoordinator:\n{}",
        failed.len(),
        failed.join("\n"),
        c.coordinator.as_ref().unwrap().log()
    );

    // Variable queries: label_values(METRIC, LABEL) must list this coordinator.
    for (file, d) in &boards {
        for v in d["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
            let def = v["definition"].as_str().unwrap();
            let args = def.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).expect(def);
            let (metric, label) = args.split_once(',').expect(def);
            let values = api(
                port,
                &format!("/api/v1/label/{}/values?match[]={}", label.trim(), url_encode(metric.trim())),
            )
            .unwrap();
            assert!(values.as_array().unwrap().iter().any(|x| x == &target), "{file}: {def} gave {values}");
        }
    }

    // The values behind the panels are the cluster's, not just present.
    let one = |expr: &str| {
        let rows = query(port, expr).unwrap();
        assert_eq!(rows.len(), 1, "{expr}: {rows:?}");
        rows[0].1
    };
    assert_eq!(one("mezo_workers_connected"), 2.0);
    assert_eq!(one("mezo_runs{status=\"running\"}"), 1.0);
    let (used, cap) = (
        one("mezo_worker_memory_bytes{device=\"cpu\"}"),
        one("mezo_worker_memory_capacity_bytes{device=\"cpu\"}"),
    );
    assert!(used > 50e6 && used < cap, "a CPU worker holding the model: {used} bytes in use of {cap}");
    let acc = one("mezo_dev_accuracy");
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    assert!(one("rate(mezo_steps_total[10s])") > 0.0, "the run is training");

    // Every metric the coordinator exports is charted on some dashboard.
    let (_, body) = http_get(c.metrics_port, "/metrics");
    let exported: BTreeSet<&str> =
        body.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let all_exprs: String = boards
        .iter()
        .flat_map(|(_, d)| panels(d))
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let uncharted: Vec<&&str> = exported.iter().filter(|m| !all_exprs.contains(*m)).collect();
    assert!(uncharted.is_empty(), "exported but on no dashboard: {uncharted:?}");
    assert!(exported.len() >= 19, "{exported:?}");

    // The alert rules load and evaluate without error against real series.
    let rules = api(port, "/api/v1/rules").unwrap();
    let list: Vec<&Value> =
        rules["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(list.len(), 5, "{rules}");
    for r in list {
        assert_eq!(r["health"], "ok", "rule {} failed to evaluate: {r}", r["name"]);
    }

    mezo_ok(&["run", "stop", "live", "--coordinator", &c.url()]);
    eprintln!(
        "dashboards: {total} panel queries over {} dashboards returned data; test took {:.1}s",
        boards.len(),
        started.elapsed().as_secs_f64()
    );
}
