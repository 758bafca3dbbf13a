//! The deployment files, checked without a cluster or Docker: Prometheus' config and alert rules
//! with promtool (the rules also unit-tested), the Kubernetes manifests against the Kubernetes
//! schemas and docker-compose.yml against the compose spec (deploy/validate.py, offline), and a
//! broken copy of each refused with a message naming the problem.

mod cluster;
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool").args(args).current_dir(repo_root()).output().unwrap_or_else(|e| {
        panic!("`promtool` not runnable ({e}); install the Debian package: apt-get install -y prometheus")
    })
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn promtool_accepts_the_prometheus_config_and_the_alerts_fire_as_specified() {
    let o = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 rule files found"), "the rules file is loaded: {}", text(&o));
    let o = promtool(&["check", "rules", "deploy/prometheus/rules.yml"]);
    assert!(o.status.success() && text(&o).contains("SUCCESS: 5 rules found"), "{}", text(&o));
    let o = promtool(&["test", "rules", "deploy/prometheus/rules_test.yml"]);
    assert!(o.status.success() && text(&o).contains("SUCCESS"), "{}", text(&o));
}

fn validate(root: &Path) -> Output {
    Command::new(python())
        .args([repo_root().join("deploy/validate.py").to_str().unwrap(), "--root", root.to_str().unwrap()])
        .output()
        .expect("python3 runs")
}

#[test]
fn manifests_and_compose_file_pass_their_schemas_and_cross_checks() {
    let o = validate(&repo_root());
    assert!(o.status.success(), "deploy/validate.py:\n{}", text(&o));
    let out = text(&o);
    assert!(out.contains("6 Kubernetes objects against 1.29.0, 1.37.0; 4 compose services"), "{out}");
}

/// A broken copy of each file is refused, every problem named: the validation is real.
#[test]
fn broken_manifests_and_compose_file_are_refused_naming_the_problem() {
    let root = cluster::tmp("deploy", "broken");
    for d in [
        "deploy/kubernetes",
        "deploy/prometheus",
        "dashboards/provisioning/dashboards",
        "dashboards/provisioning/datasources",
        "crates/mezo-cli/assets",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for d in [
        "deploy/kubernetes",
        "deploy/prometheus",
        "dashboards/provisioning/dashboards",
        "dashboards/provisioning/datasources",
    ] {
        copy_dir(&repo_root().join(d), &root.join(d));
    }
    for f in ["deploy/docker-compose.yml", "dashboards/mezo-training.json"] {
        std::fs::copy(repo_root().join(f), root.join(f)).unwrap();
    }
    let edit = |file: &str, from: &str, to: &str| {
        let p = root.join(file);
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{file} no longer has `{from}`");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    };
    edit("deploy/kubernetes/coordinator.yaml", "containerPort: 50051", "containerPort: \"50051/tcp\"");
    edit("deploy/kubernetes/worker.yaml", "  replicas: 2", "  replica: 2");
    edit("deploy/kubernetes/worker.yaml", "nvidia.com/gpu: 1", "nvidia.com/gpus: 1");
    edit(
        "deploy/kubernetes/worker.yaml",
        "--coordinator=http://mezo-coordinator:50051",
        "--coordinator=http://mezo-coordinator:5051",
    );
    edit("deploy/kubernetes/worker.yaml", "- key: worker-token", "- key: client-token");
    edit(
        "deploy/kubernetes/coordinator.yaml",
        "--worker-token-file=/etc/mezo/tokens/worker-token",
        "--worker-token-file=/etc/mezo/worker-token",
    );
    edit(
        "deploy/docker-compose.yml",
        "--token-file=/run/secrets/worker_token",
        "--token-file=/run/secrets/client_token",
    );
    edit(
        "deploy/docker-compose.yml",
        "      - worker_token\n    depends_on:",
        "      - client_token\n    depends_on:",
    );
    edit("deploy/docker-compose.yml", "capabilities: [gpu]", "capabilities: gpu");
    edit(
        "deploy/docker-compose.yml",
        "--coordinator=http://coordinator:50051",
        "--coordinator=http://coordinator:50052",
    );
    let o = validate(&root);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for expected in [
        "coordinator.yaml: StatefulSet/mezo-coordinator: not a valid Kubernetes 1.37.0 object at spec.template.spec.containers.0.ports.0.containerPort: '50051/tcp' is not of type 'integer'",
        "worker.yaml: Deployment/mezo-worker: not a valid Kubernetes 1.29.0 object at spec: Additional properties are not allowed ('replica' was unexpected)",
        "mezo-worker: worker requests no nvidia.com/gpu",
        "mezo-worker: --coordinator --coordinator=http://mezo-coordinator:5051 is no Service port",
        "$.services.worker.deploy.resources.reservations.devices[0].capabilities: 'gpu' is not of type 'array'",
        "does not reach the coordinator's --listen",
        "StatefulSet/mezo-coordinator: --worker-token-file=/etc/mezo/worker-token is not a file of a mounted Secret",
        "Deployment/mezo-worker: the worker sends a token the coordinator does not check",
        "Deployment/mezo-worker: the worker's pod can read the clients' token (Secret mezo-tokens key client-token)",
        "docker-compose.yml: the worker sends the token of secret client_token, the coordinator checks workers against worker_token",
        "docker-compose.yml: the worker has the clients' token (secret client_token)",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

/// The image builds mezo as scripts/setup.sh does: the same torch, a Rust at least the
/// workspace's, and every file it copies exists.
#[test]
fn dockerfile_copies_what_exists_and_pins_the_tested_torch() {
    let docker = std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).unwrap();
    let reqs = std::fs::read_to_string(repo_root().join("scripts/requirements.txt")).unwrap();
    let torch = reqs.lines().find(|l| l.starts_with("torch==")).unwrap();
    assert!(
        docker.contains(&format!("pip install --no-cache-dir {torch}")),
        "the image's torch must be {torch}"
    );
    for line in docker.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                repo_root().join(src).exists(),
                "Dockerfile copies {src}, which is not in the repository"
            );
        }
    }
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let msrv = manifest.lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().trim_matches('"');
    let image = docker.lines().find_map(|l| l.strip_prefix("FROM rust:")).unwrap();
    let version = image.split('-').next().unwrap();
    let parse = |v: &str| v.split('.').map(|x| x.parse::<u32>().unwrap()).collect::<Vec<_>>();
    assert!(
        parse(version) >= parse(msrv),
        "rust:{version} is older than the workspace's rust-version {msrv}"
    );
}
