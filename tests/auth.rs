//! Authentication and TLS end to end, real processes on loopback: a coordinator with client and
//! worker tokens, TLS and mutual TLS for workers (certificates made here with rcgen; no key is
//! kept in the repository); callers with no token, a wrong one or the other role's, workers with
//! no certificate or one from another CA; a run that completes through it all; and no token in
//! any log, any output or /metrics.

mod cluster;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cluster::*;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::Value;

/// A CA and a certificate it signed, as PEM files in `dir`.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA: its certificate file, and what it needs to sign more.
struct Ca {
    pem: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, cert.pem()).unwrap();
    Ca { pem, cert, key }
}

fn issue(dir: &Path, ca: &Ca, name: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![purpose];
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Issued { cert: cert_path, key: key_path }
}

/// A fresh random token (64 hex digits), so a grep for it finds only what this test leaked.
fn fresh_token() -> String {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write_secret(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Waits for a process that must end by itself (a refused worker); its exit status.
fn wait_exit(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "the process did not end in {limit:?}:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a coordinator with `extra` flags and waits until it listens; `(process, port, metrics port)`.
fn coordinator(dir: &Path, name: &str, extra: &[&str]) -> (Proc, u16, u16) {
    let (port, metrics) = (free_port(), free_port());
    let store = dir.join(format!("store-{name}"));
    let (listen, metrics_listen) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{metrics}"));
    let mut args = vec![
        "coordinator",
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics_listen,
        "--data-dir",
        store.to_str().unwrap(),
        "--lease-ms",
        "1500",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&mezo_bin(), &args, dir.join(format!("coordinator-{name}.log")));
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(p.child.try_wait().unwrap().is_none(), "the coordinator exited:\n{}", p.log());
        assert!(start.elapsed() < Duration::from_secs(60), "the coordinator did not listen:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port, metrics)
}

#[test]
fn tokens_roles_tls_and_mutual_tls_end_to_end() {
    let started = Instant::now();
    let dir = tmp("auth", "tls");
    let server_ca = ca(&dir, "server-ca");
    let worker_ca = ca(&dir, "worker-ca");
    let other_ca = ca(&dir, "other-ca");
    let server = issue(
        &dir,
        &server_ca,
        "coordinator",
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let worker_cert = issue(&dir, &worker_ca, "worker", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let rogue_cert = issue(&dir, &other_ca, "rogue", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let (client_token, worker_token, guess) = (fresh_token(), fresh_token(), fresh_token());
    // Two client tokens (rotation); comments and blank lines are skipped.
    let client_file = write_secret(
        &dir.join("client-tokens"),
        &format!("# clients\n\n{}\n{client_token}\n", fresh_token()),
    );
    let worker_file = write_secret(&dir.join("worker-tokens"), &format!("{worker_token}\n"));
    let client_one = write_secret(&dir.join("client-token"), &format!("{client_token}\n"));
    let worker_one = write_secret(&dir.join("worker-token"), &format!("{worker_token}\n"));
    let guess_one = write_secret(&dir.join("guess-token"), &format!("{guess}\n"));

    #[rustfmt::skip]
    let (mut coord, port, metrics_port) = coordinator(&dir, "tls", &[
        "--client-token-file", client_file.to_str().unwrap(), "--worker-token-file", worker_file.to_str().unwrap(),
        "--tls-cert", server.cert.to_str().unwrap(), "--tls-key", server.key.to_str().unwrap(),
        "--tls-client-ca", worker_ca.pem.to_str().unwrap(),
    ]);
    assert!(
        coord
            .log()
            .contains("client tokens: 2; worker tokens: 1; TLS, workers must present a client certificate"),
        "{}",
        coord.log()
    );
    let url = format!("https://127.0.0.1:{port}");
    let ca_flag = server_ca.pem.to_str().unwrap().to_string();
    let mut outputs = Vec::new();
    // `mezo ARGS --coordinator URL --tls-ca CA [--token-file F]`, its output kept for the grep.
    let mut client = |args: &[&str], token: Option<&Path>, env: &[(&str, &str)]| -> Output {
        let mut cmd = Command::new(mezo_bin());
        cmd.args(args).args(["--coordinator", &url, "--tls-ca", &ca_flag]).envs(env.iter().copied());
        if let Some(t) = token {
            cmd.args(["--token-file", t.to_str().unwrap()]);
        }
        let o = cmd.output().unwrap();
        outputs.push(text(&o));
        o
    };

    // A client without a token, or with one the coordinator does not know: Unauthenticated.
    let o = client(&["run", "list"], None, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("the coordinator refused the call (Unauthenticated): no token given: MezoService (runs) requires a client token"),
        "{e}"
    );
    assert!(e.contains("--token-file FILE or $MEZO_TOKEN"), "the message says what to pass: {e}");
    let o = client(&["run", "list"], Some(&guess_one), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o)
            .contains("(Unauthenticated): the token given does not match any of this coordinator's tokens"),
        "{}",
        text(&o)
    );
    // The worker's token cannot start a run (nor list them): PermissionDenied.
    let a = repo_root().join("crates/mezo-cli/assets");
    let (model, data) = (a.join("opt-mini"), a.join("sst2"));
    #[rustfmt::skip]
    let spec = [
        "--model", model.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "--steps", "8",
        "--n-train", "64", "--n-dev", "16", "--test-limit", "16", "--eval-every", "4", "--lr", "1e-3",
        "--directions", "2", "--batch-size", "8", "--run-id", "secured",
    ];
    let start: Vec<&str> = ["run", "start"].iter().chain(spec.iter()).copied().collect();
    let o = client(&start, Some(&worker_one), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(
            "(PermissionDenied): the token given is a worker token; MezoService (runs) takes a client token"
        ),
        "{}",
        text(&o)
    );
    // The token in $MEZO_TOKEN works as the file does.
    let o = client(&["run", "list"], None, &[("MEZO_TOKEN", &client_token)]);
    assert!(o.status.success(), "{}", text(&o));

    // Workers: a client's token (with a good certificate) is the wrong role; the worker's token
    // without a certificate is refused by mutual TLS; a certificate from another CA is refused
    // by the TLS layer. Each worker stops with the reason instead of retrying forever.
    let worker = |name: &str, token: &Path, cert: Option<&Issued>| -> Proc {
        let mut args = vec![
            "worker",
            "--coordinator",
            &url,
            "--tls-ca",
            &ca_flag,
            "--token-file",
            token.to_str().unwrap(),
        ];
        if let Some(c) = cert {
            args.extend_from_slice(&[
                "--tls-cert",
                c.cert.to_str().unwrap(),
                "--tls-key",
                c.key.to_str().unwrap(),
            ]);
        }
        Proc::spawn(&mezo_bin(), &args, dir.join(format!("worker-{name}.log")))
    };
    let mut refused = Vec::new();
    for (name, token, cert, expected) in [
        (
            "client-token",
            &client_one,
            Some(&worker_cert),
            "refused this worker (PermissionDenied): the token given is a client token; WorkerService takes a worker token",
        ),
        (
            "no-certificate",
            &worker_one,
            None,
            "refused this worker (Unauthenticated): no client certificate: WorkerService requires mutual TLS",
        ),
        (
            "other-ca",
            &worker_one,
            Some(&rogue_cert),
            "refused this worker's TLS connection: transport error: connection error: received fatal alert",
        ),
    ] {
        let mut w = worker(name, token, cert);
        let status = wait_exit(&mut w, Duration::from_secs(30));
        assert!(!status.success(), "worker {name} was admitted:\n{}", w.log());
        assert!(w.log().contains(expected), "worker {name}: expected `{expected}` in:\n{}", w.log());
        assert!(!w.log().contains("registered with"), "{}", w.log());
        refused.push(w);
    }

    // The real thing: a worker with its token and certificate, a run started, followed and
    // exported with the client's token, over TLS.
    let mut good = worker("good", &worker_one, Some(&worker_cert));
    let o = client(&start, Some(&client_one), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "secured");
    let o = client(&["run", "watch", "secured", "--json"], Some(&client_one), &[]);
    assert!(o.status.success(), "{}\n{}", text(&o), good.log());
    let lines: Vec<Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.last().unwrap()["status"], "completed", "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l["done"] == false).count(), 8, "every step streamed once");
    let out = dir.join("adapter");
    let o = client(&["run", "export", "secured", "--out", out.to_str().unwrap()], Some(&client_one), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::metadata(out.join("adapter_model.safetensors")).unwrap().len() > 0);
    let svg = dir.join("secured.svg");
    let o = client(&["report", "secured", "--out", svg.to_str().unwrap()], Some(&client_one), &[]);
    assert!(o.status.success() && text(&o).contains("8 steps, 2 dev evaluations"), "{}", text(&o));
    assert!(good.log().contains("registered with"), "{}", good.log());

    // Without --tls-ca the system's roots are used: they do not know this CA, unless the system
    // is told to trust it (SSL_CERT_FILE, which rustls-native-certs reads).
    let o = Command::new(mezo_bin())
        .args(["run", "list", "--coordinator", &url, "--token-file", client_one.to_str().unwrap()])
        .output()
        .unwrap();
    outputs.push(text(&o));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("invalid peer certificate: UnknownIssuer (the coordinator's certificate is not signed by a CA this side trusts: pass the CA with --tls-ca)"),
        "{}",
        text(&o)
    );
    let o = Command::new(mezo_bin())
        .args(["run", "list", "--coordinator", &url, "--token-file", client_one.to_str().unwrap()])
        .env("SSL_CERT_FILE", &server_ca.pem)
        .output()
        .unwrap();
    outputs.push(text(&o));
    assert!(text(&o).contains(r#""run_id":"secured","status":"completed""#), "{}", text(&o));
    // Plaintext against TLS says so.
    let o = Command::new(mezo_bin())
        .args(["run", "list", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--token-file", client_one.to_str().unwrap()])
        .output()
        .unwrap();
    outputs.push(text(&o));
    assert!(!o.status.success());
    assert!(text(&o).contains("if the coordinator serves TLS, use https:// and --tls-ca"), "{}", text(&o));

    // The Python client: TLS and a token, or UNAUTHENTICATED without one.
    let py = |args: &[&str], token: Option<&Path>| -> Output {
        let mut cmd = Command::new(python());
        cmd.arg(repo_root().join("deploy/clients/python/mezo_client.py"))
            .args(["--coordinator", &url, "--tls-ca", &ca_flag])
            .env("MEZO_CLIENT_STUBS", dir.join("stubs"))
            .env_remove("MEZO_TOKEN");
        if let Some(t) = token {
            cmd.args(["--token-file", t.to_str().unwrap()]);
        }
        cmd.args(args).output().unwrap()
    };
    let o = py(&["list"], Some(&client_one));
    outputs.push(text(&o));
    assert!(text(&o).contains(r#""run_id": "secured", "status": "completed""#), "{}", text(&o));
    let o = py(&["get", "secured"], None);
    outputs.push(text(&o));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("mezo_client: UNAUTHENTICATED: no token given"), "{}", text(&o));
    let o = py(&["reflect"], Some(&client_one));
    outputs.push(text(&o));
    assert!(text(&o).contains(r#""runs": ["secured"]"#), "reflection with the client's token: {}", text(&o));
    let o = py(&["reflect"], Some(&worker_one));
    outputs.push(text(&o));
    assert!(text(&o).contains("PERMISSION_DENIED"), "reflection is the clients': {}", text(&o));

    // Refusals are counted, by role and code, and no token is anywhere: not in /metrics, not
    // in any process's log, not in any command's output.
    let (status, metrics) = http_get(metrics_port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let count = |role: &str, code: &str| -> f64 {
        let series = format!("mezo_rpc_rejected_total{{code=\"{code}\",role=\"{role}\"}} ");
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&series))
            .unwrap_or_else(|| panic!("{series}:\n{metrics}"));
        line[series.len()..].parse().unwrap()
    };
    assert!(count("client", "unauthenticated") >= 3.0, "{metrics}");
    assert!(count("client", "permission_denied") >= 2.0, "{metrics}");
    assert!(count("worker", "unauthenticated") >= 1.0, "{metrics}");
    assert!(count("worker", "permission_denied") >= 1.0, "{metrics}");
    coord.kill9();
    good.kill9();
    let mut everything = vec![("/metrics".to_string(), metrics)];
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".log") {
            everything.push((e.path().display().to_string(), std::fs::read_to_string(e.path()).unwrap()));
        }
    }
    everything.extend(outputs.into_iter().map(|o| ("a command's output".to_string(), o)));
    for (what, text) in &everything {
        for (name, token) in [("client", &client_token), ("worker", &worker_token), ("guessed", &guess)] {
            assert!(!text.contains(token.as_str()), "the {name} token is in {what}:\n{text}");
        }
        assert!(!text.contains("panicked"), "{what}:\n{text}");
    }
    eprintln!("auth: tokens, roles, TLS and mutual TLS in {:.1}s", started.elapsed().as_secs_f64());
}

/// Start-up refuses what would leave a role open or cannot work, naming the flag and file; a
/// coordinator with tokens but no TLS checks them and warns; one with neither warns loudly.
#[test]
fn bad_security_settings_are_refused_naming_them_and_weak_ones_warned_about() {
    let dir = tmp("auth", "settings");
    let server_ca = ca(&dir, "server-ca");
    let server = issue(&dir, &server_ca, "coordinator", &["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let other = issue(&dir, &server_ca, "other", &["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_token, worker_token) = (fresh_token(), fresh_token());
    let client = write_secret(&dir.join("client"), &format!("{client_token}\n"));
    let worker = write_secret(&dir.join("worker"), &format!("{worker_token}\n"));
    let short = write_secret(&dir.join("short"), "# a comment\ntoo-short\n");
    let (c, w, s) = (client.to_str().unwrap(), worker.to_str().unwrap(), short.to_str().unwrap());
    let (cert, key, other_key) =
        (server.cert.to_str().unwrap(), server.key.to_str().unwrap(), other.key.to_str().unwrap());
    let store = dir.join("store");
    let st = store.to_str().unwrap();
    let missing = dir.join("missing");
    let m = missing.to_str().unwrap();
    for (args, expected) in [
        (
            vec!["--client-token-file", c],
            "error: --client-token-file is given but workers are not authenticated".to_string(),
        ),
        (
            vec!["--worker-token-file", w],
            "error: workers are authenticated (--worker-token-file or --tls-client-ca) but clients are not"
                .into(),
        ),
        (
            vec!["--client-token-file", c, "--worker-token-file", c],
            format!("error: a token is in both --client-token-file {c} and --worker-token-file {c}"),
        ),
        (
            vec!["--client-token-file", s, "--worker-token-file", w],
            format!("error: --client-token-file {s}, line 2: the token is 9 characters long; at least 16"),
        ),
        (
            vec!["--client-token-file", m, "--worker-token-file", w],
            format!("error: --client-token-file {m}: cannot read it: No such file"),
        ),
        (
            vec!["--client-token-file", c, "--worker-token-file", w, "--tls-cert", key, "--tls-key", key],
            format!("error: --tls-cert {key}: holds a private key, not a certificate"),
        ),
        (
            vec![
                "--client-token-file",
                c,
                "--worker-token-file",
                w,
                "--tls-cert",
                cert,
                "--tls-key",
                other_key,
            ],
            "KeyMismatch (--tls-key is not the private key of --tls-cert)".into(),
        ),
        (
            vec!["--client-token-file", c, "--tls-client-ca", cert],
            "error: --tls-client-ca (mutual TLS for workers) needs TLS itself: add --tls-cert and --tls-key"
                .into(),
        ),
    ] {
        let mut all = vec![
            "coordinator",
            "--data-dir",
            st,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        all.extend_from_slice(&args);
        let e = mezo_err(&all);
        assert!(e.contains(&expected), "{args:?}: expected `{expected}` in:\n{e}");
        assert!(!e.contains(&client_token) && !e.contains(&worker_token) && !e.contains("too-short"), "{e}");
    }
    assert!(!store.exists(), "a refused start-up must not create the store");

    // Tokens over plaintext: checked, with a warning about the wire.
    let (plain, port, _) = coordinator(&dir, "plain", &["--client-token-file", c, "--worker-token-file", w]);
    let url = format!("http://127.0.0.1:{port}");
    let o = mezo(&["run", "list", "--coordinator", &url]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("(Unauthenticated): no token given"), "{}", text(&o));
    let o = Command::new(mezo_bin())
        .args(["run", "list", "--coordinator", &url])
        .env("MEZO_TOKEN", &client_token)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(plain.log().contains("warning: tokens are checked but TLS is off"), "{}", plain.log());
    // A client pointed at https:// of a plaintext coordinator is told so.
    let o = mezo(&["run", "list", "--coordinator", &format!("https://127.0.0.1:{port}"), "--tls-ca", cert]);
    assert!(text(&o).contains("(the coordinator answered in plaintext: use http://"), "{}", text(&o));
    // A worker's mistakes in its own files end it at once, named.
    let o = mezo(&["worker", "--coordinator", &url, "--tls-cert", cert, "--tls-key", key]);
    assert!(text(&o).contains(&format!("--coordinator {url}: --tls-cert/--tls-key are given but the URL is plaintext http://: use https://")), "{}", text(&o));
    let o = mezo(&[
        "worker",
        "--coordinator",
        &format!("https://127.0.0.1:{port}"),
        "--tls-cert",
        key,
        "--tls-key",
        cert,
    ]);
    assert!(
        text(&o).contains(&format!(
            "--tls-cert {key}: holds a private key, not a certificate (are the certificate and key swapped?)"
        )),
        "{}",
        text(&o)
    );

    // No credentials at all: it works as before, and says loudly that anyone may call it.
    let (open, port, _) = coordinator(&dir, "open", &[]);
    assert!(mezo(&["run", "list", "--coordinator", &format!("http://127.0.0.1:{port}")]).status.success());
    assert!(
        open.log().contains("coordinator: WARNING: this coordinator checks no credentials"),
        "{}",
        open.log()
    );
}
