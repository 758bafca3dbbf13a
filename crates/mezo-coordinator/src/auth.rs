//! Who may call what. Two roles, each with its own bearer tokens: clients (`MezoService`, and
//! server reflection) and workers (`WorkerService`). A worker's token cannot start or read runs;
//! a client's cannot register a worker or receive tasks. Over TLS, workers can also be required
//! to present a client certificate signed by the `--tls-client-ca` (mutual TLS).
//!
//! One listener serves both roles. Its TLS layer asks every peer for a certificate but lets one
//! without a certificate finish the handshake (a certificate that is presented must verify), so
//! clients need no certificate; the worker role then requires one on every `WorkerService` call.
//! One port is one thing to expose, probe and route, and the check still happens per call.
//!
//! A call without credentials, or with a token this coordinator does not know, gets
//! `Unauthenticated`; a valid credential of the other role gets `PermissionDenied`. Tokens are
//! kept only as SHA-256 digests and compared in constant time, every known token every time, so
//! neither the comparison's time nor an early exit says how much of a guess was right. No message
//! quotes a token, and the `authorization` header is removed before a handler sees the request.

use std::path::PathBuf;
use std::sync::Arc;

use mezo_proto::connect::error_chain;
use mezo_proto::credentials::{read_pem, read_tokens, CredentialError, Pem, Token};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::metrics::Metrics;

/// The two kinds of caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Starts, follows, stops and exports runs: `MezoService` and server reflection.
    Client,
    /// Registers, takes tasks and returns results: `WorkerService`.
    Worker,
}

impl Role {
    /// The label value in `mezo_rpc_rejected_total{role}`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }
}

/// A role's tokens, as SHA-256 digests: equal-length values to compare in constant time (the
/// tokens' own lengths differ), and no token text kept in memory after start-up.
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl TokenSet {
    pub fn new(tokens: &[Token]) -> TokenSet {
        TokenSet { digests: tokens.iter().map(|t| digest(t.expose())).collect() }
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `token` is one of the set; looks at every member whatever the answer.
    fn contains(&self, token: &str) -> bool {
        let d = digest(token);
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&d);
        }
        found.into()
    }

    fn overlaps(&self, other: &TokenSet) -> bool {
        self.digests.iter().any(|d| other.digests.contains(d))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The coordinator's security flags, as given (paths only; nothing is read yet).
#[derive(Debug, Clone, Default)]
pub struct SecurityFiles {
    pub client_token_file: Option<PathBuf>,
    pub worker_token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("{0}")]
    Flags(String),
}

/// What the coordinator checks. `Default` checks nothing (every caller has every role): the
/// in-process benchmarks, and a coordinator started without token files.
#[derive(Clone, Default)]
pub struct Security {
    pub client_tokens: Option<Arc<TokenSet>>,
    pub worker_tokens: Option<Arc<TokenSet>>,
    /// The server's TLS settings (with the client CA when workers must present certificates).
    pub tls: Option<ServerTlsConfig>,
    /// `WorkerService` calls need a client certificate verified against the client CA.
    pub worker_certificates: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Security {
    /// Reads and checks the files, and the flags' combination: a coordinator authenticates both
    /// roles or neither, since either open role undoes the other's protection (an open worker
    /// role lets anyone receive the runs' tasks and return made-up losses; an open client role
    /// lets anyone start, stop and export runs).
    pub fn from_files(f: &SecurityFiles) -> Result<Security, SecurityError> {
        let flags = |s: &str| Err(SecurityError::Flags(s.into()));
        let (cert, key) = match (&f.tls_cert, &f.tls_key) {
            (Some(c), Some(k)) => (Some(c), Some(k)),
            (None, None) => (None, None),
            _ => return flags("--tls-cert and --tls-key go together: the certificate and its private key"),
        };
        if f.tls_client_ca.is_some() && cert.is_none() {
            return flags(
                "--tls-client-ca (mutual TLS for workers) needs TLS itself: add --tls-cert and --tls-key",
            );
        }
        let load =
            |flag: &'static str, p: &Option<PathBuf>| -> Result<Option<Arc<TokenSet>>, SecurityError> {
                Ok(match p {
                    Some(p) => Some(Arc::new(TokenSet::new(&read_tokens(flag, p)?))),
                    None => None,
                })
            };
        let client_tokens = load("--client-token-file", &f.client_token_file)?;
        let worker_tokens = load("--worker-token-file", &f.worker_token_file)?;
        if let (Some(c), Some(w)) = (&client_tokens, &worker_tokens) {
            if c.overlaps(w) {
                return flags(&format!(
                    "a token is in both --client-token-file {} and --worker-token-file {}: each token \
                     must have one role, or a worker could start runs",
                    f.client_token_file.as_ref().expect("loaded").display(),
                    f.worker_token_file.as_ref().expect("loaded").display()
                ));
            }
        }
        let workers_checked = worker_tokens.is_some() || f.tls_client_ca.is_some();
        match (client_tokens.is_some(), workers_checked) {
            (true, false) => {
                return flags(
                    "--client-token-file is given but workers are not authenticated: add \
                     --worker-token-file (and/or --tls-client-ca); otherwise anyone who reaches the \
                     port could register a worker, receive the runs' tasks and return made-up losses",
                )
            }
            (false, true) => {
                return flags(
                    "workers are authenticated (--worker-token-file or --tls-client-ca) but clients are \
                     not: add --client-token-file; otherwise anyone who reaches the port could start, \
                     stop and export runs",
                )
            }
            _ => {}
        }
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(
                    read_pem("--tls-cert", cert, Pem::Certificates)?,
                    read_pem("--tls-key", key, Pem::PrivateKey)?,
                );
                let mut tls = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &f.tls_client_ca {
                    let ca = Certificate::from_pem(read_pem("--tls-client-ca", ca, Pem::Certificates)?);
                    // Clients connect without a certificate; the worker role checks for one.
                    tls = tls.client_ca_root(ca).client_auth_optional(true);
                }
                // Build it once now: a key that does not match its certificate, or a file rustls
                // cannot parse, is reported at start-up and names the files.
                tonic::transport::Server::builder().tls_config(tls.clone()).map_err(|e| {
                    let detail = error_chain(&e);
                    let hint = if detail.contains("KeyMismatch") {
                        " (--tls-key is not the private key of --tls-cert)"
                    } else {
                        ""
                    };
                    let ca = f.tls_client_ca.as_ref().map(|c| format!(" / --tls-client-ca {}", c.display()));
                    SecurityError::Flags(format!(
                        "--tls-cert {} / --tls-key {}{}: {detail}{hint}",
                        cert.display(),
                        key.display(),
                        ca.unwrap_or_default()
                    ))
                })?;
                Some(tls)
            }
            _ => None,
        };
        Ok(Security { client_tokens, worker_tokens, tls, worker_certificates: f.tls_client_ca.is_some() })
    }

    /// Fresh random tokens for a coordinator that lives inside one process with its workers
    /// (`mezo train --workers N`): its loopback port is open to every user of the machine, and
    /// nobody else should be able to join its fleet or read its run. Returns the client's and
    /// the workers' token.
    pub fn ephemeral() -> std::io::Result<(Security, Token, Token)> {
        let fresh = || -> std::io::Result<Token> {
            use std::io::Read;
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            Ok(Token::parse(&hex, String::new).expect("64 hex digits make a valid token"))
        };
        let (client, worker) = (fresh()?, fresh()?);
        let security = Security {
            client_tokens: Some(Arc::new(TokenSet::new(std::slice::from_ref(&client)))),
            worker_tokens: Some(Arc::new(TokenSet::new(std::slice::from_ref(&worker)))),
            tls: None,
            worker_certificates: false,
        };
        Ok((security, client, worker))
    }

    /// True when no caller is checked at all.
    pub fn is_open(&self) -> bool {
        self.client_tokens.is_none() && self.worker_tokens.is_none() && !self.worker_certificates
    }

    /// One line for the start-up log: what is checked (counts, never tokens).
    pub fn describe(&self) -> String {
        let count = |t: &Option<Arc<TokenSet>>| t.as_ref().map_or(0, |t| t.len());
        let mut parts = Vec::new();
        if self.is_open() {
            parts.push("no authentication".to_string());
        } else {
            parts.push(format!("client tokens: {}", count(&self.client_tokens)));
            if self.worker_tokens.is_some() {
                parts.push(format!("worker tokens: {}", count(&self.worker_tokens)));
            }
        }
        parts.push(
            match (&self.tls, self.worker_certificates) {
                (None, _) => "plaintext (no TLS)",
                (Some(_), false) => "TLS",
                (Some(_), true) => "TLS, workers must present a client certificate (mutual TLS)",
            }
            .to_string(),
        );
        parts.join("; ")
    }

    /// What an operator should hear about at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.is_open() {
            w.push(
                "WARNING: this coordinator checks no credentials: anyone who can reach its port can \
                 start, stop and export runs and register workers. Give it --client-token-file and \
                 --worker-token-file (and --tls-cert/--tls-key) unless the network is trusted; see \
                 README.md, Security."
                    .to_string(),
            );
        } else if self.tls.is_none() {
            w.push(
                "warning: tokens are checked but TLS is off, so they cross the network in the clear; \
                 add --tls-cert and --tls-key unless the network is trusted."
                    .to_string(),
            );
        }
        w
    }

    /// The interceptor that admits `role`'s callers; counts rejections in `metrics`.
    pub fn guard(&self, role: Role, metrics: Option<Arc<Metrics>>) -> Guard {
        Guard { security: Arc::new(self.clone()), role, metrics }
    }

    /// Admits the call or says why not. `authorization` is the header's value (if any);
    /// `certificate` whether the TLS layer verified a client certificate on this connection.
    pub fn check(&self, role: Role, authorization: Option<&[u8]>, certificate: bool) -> Result<(), Status> {
        let presented = match authorization {
            None => Presented::Nothing,
            Some(v) => match bearer(v) {
                None => Presented::Malformed,
                Some(t) => {
                    if self.client_tokens.as_ref().is_some_and(|s| s.contains(t)) {
                        Presented::Valid(Role::Client)
                    } else if self.worker_tokens.as_ref().is_some_and(|s| s.contains(t)) {
                        Presented::Valid(Role::Worker)
                    } else {
                        Presented::Unknown
                    }
                }
            },
        };
        let (tokens, needs_cert) = match role {
            Role::Client => (&self.client_tokens, false),
            Role::Worker => (&self.worker_tokens, self.worker_certificates),
        };
        let token_ok = tokens.is_none() || presented == Presented::Valid(role);
        let cert_ok = !needs_cert || certificate;
        if token_ok && cert_ok {
            return Ok(());
        }
        let service = match role {
            Role::Client => "MezoService (runs)",
            Role::Worker => "WorkerService",
        };
        let other = match role {
            Role::Client => Role::Worker,
            Role::Worker => Role::Client,
        };
        if presented == Presented::Valid(other) {
            return Err(Status::permission_denied(format!(
                "the token given is a {} token; {service} takes a {} token",
                other.name(),
                role.name()
            )));
        }
        if !token_ok {
            let why = match presented {
                Presented::Nothing => "no token given",
                Presented::Malformed => "the `authorization` metadata is not `Bearer <token>`",
                _ => "the token given does not match any of this coordinator's tokens",
            };
            return Err(Status::unauthenticated(format!(
                "{why}: {service} requires a {} token (gRPC metadata `authorization: Bearer <token>`)",
                role.name()
            )));
        }
        Err(Status::unauthenticated(
            "no client certificate: WorkerService requires mutual TLS, a certificate signed by the \
             coordinator's --tls-client-ca (mezo worker --tls-cert FILE --tls-key FILE)",
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presented {
    Nothing,
    Malformed,
    Unknown,
    Valid(Role),
}

/// The token of an `authorization: Bearer <token>` value (the scheme is case-insensitive,
/// RFC 6750).
fn bearer(v: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(v).ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The interceptor in front of one service (see [`Security::check`]).
#[derive(Clone)]
pub struct Guard {
    security: Arc<Security>,
    role: Role,
    metrics: Option<Arc<Metrics>>,
}

impl Interceptor for Guard {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // Only a certificate that verified against the client CA gets here: the TLS layer
        // refuses the handshake for one that does not.
        let certificate = req.peer_certs().is_some_and(|c| !c.is_empty());
        let verdict = self.security.check(
            self.role,
            req.metadata().get("authorization").map(|v| v.as_bytes()),
            certificate,
        );
        // Handlers never see the token, so no future log line can print it.
        req.metadata_mut().remove("authorization");
        match verdict {
            Ok(()) => Ok(req),
            Err(status) => {
                if let Some(m) = &self.metrics {
                    m.count_rejected(self.role, status.code());
                }
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const CLIENT: &str = "client-0123456789abcdef";
    const WORKER: &str = "worker-0123456789abcdef";

    fn security(worker_tokens: bool, worker_certificates: bool) -> Security {
        let set = |t: &str| Some(Arc::new(TokenSet::new(&[Token::parse(t, String::new).unwrap()])));
        Security {
            client_tokens: set(CLIENT),
            worker_tokens: if worker_tokens { set(WORKER) } else { None },
            tls: None,
            worker_certificates,
        }
    }

    fn code(r: Result<(), Status>) -> Option<Code> {
        r.err().map(|s| s.code())
    }

    #[test]
    fn each_role_takes_its_own_token_only() {
        let s = security(true, false);
        let h = |t: &str| format!("Bearer {t}").into_bytes();
        assert_eq!(code(s.check(Role::Client, Some(&h(CLIENT)), false)), None);
        assert_eq!(code(s.check(Role::Worker, Some(&h(WORKER)), false)), None);
        assert_eq!(code(s.check(Role::Client, Some(&h(WORKER)), false)), Some(Code::PermissionDenied));
        assert_eq!(code(s.check(Role::Worker, Some(&h(CLIENT)), false)), Some(Code::PermissionDenied));
        for role in [Role::Client, Role::Worker] {
            assert_eq!(code(s.check(role, None, false)), Some(Code::Unauthenticated));
            assert_eq!(
                code(s.check(role, Some(&h("client-0123456789abcdeX")), false)),
                Some(Code::Unauthenticated)
            );
            assert_eq!(code(s.check(role, Some(CLIENT.as_bytes()), false)), Some(Code::Unauthenticated));
            assert_eq!(code(s.check(role, Some(b"Bearer "), false)), Some(Code::Unauthenticated));
        }
        // The scheme is case-insensitive.
        assert_eq!(code(s.check(Role::Client, Some(format!("bearer {CLIENT}").as_bytes()), false)), None);
    }

    #[test]
    fn messages_say_what_is_missing_and_never_quote_a_token() {
        let s = security(true, false);
        let guess = "guess-0123456789abcdef";
        let m = s.check(Role::Client, Some(format!("Bearer {guess}").as_bytes()), false).unwrap_err();
        assert_eq!(
            m.message(),
            "the token given does not match any of this coordinator's tokens: MezoService (runs) \
             requires a client token (gRPC metadata `authorization: Bearer <token>`)"
        );
        let m = s.check(Role::Client, Some(format!("Bearer {WORKER}").as_bytes()), false).unwrap_err();
        assert_eq!(m.message(), "the token given is a worker token; MezoService (runs) takes a client token");
        let m = s.check(Role::Worker, None, false).unwrap_err();
        assert!(m.message().starts_with("no token given: WorkerService requires a worker token"), "{m:?}");
        for r in [Role::Client, Role::Worker] {
            for t in [CLIENT, WORKER, guess] {
                if let Err(e) = s.check(r, Some(format!("Bearer {t}").as_bytes()), false) {
                    assert!(!e.message().contains(t), "{e:?}");
                    assert!(!format!("{e:?}").contains("0123456789abcdef"), "{e:?}");
                }
            }
        }
    }

    #[test]
    fn mutual_tls_makes_workers_present_a_certificate_as_well() {
        let s = security(true, true);
        let w = format!("Bearer {WORKER}").into_bytes();
        assert_eq!(code(s.check(Role::Worker, Some(&w), true)), None);
        let e = s.check(Role::Worker, Some(&w), false).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().starts_with("no client certificate: WorkerService requires mutual TLS"), "{e:?}");
        // Clients need no certificate.
        assert_eq!(code(s.check(Role::Client, Some(format!("Bearer {CLIENT}").as_bytes()), false)), None);
        // Certificates alone authenticate workers when there are no worker tokens; a client's
        // token without a certificate is the wrong role, with one it is a worker.
        let s = security(false, true);
        assert_eq!(code(s.check(Role::Worker, None, true)), None);
        assert_eq!(code(s.check(Role::Worker, None, false)), Some(Code::Unauthenticated));
        let c = format!("Bearer {CLIENT}").into_bytes();
        assert_eq!(code(s.check(Role::Worker, Some(&c), false)), Some(Code::PermissionDenied));
    }

    #[test]
    fn an_open_coordinator_admits_everyone() {
        let s = Security::default();
        assert!(s.is_open());
        for role in [Role::Client, Role::Worker] {
            assert_eq!(code(s.check(role, None, false)), None);
        }
        assert_eq!(s.warnings().len(), 1);
        assert!(s.warnings()[0].starts_with("WARNING: this coordinator checks no credentials"));
    }

    fn files(dir: &std::path::Path, client: Option<&str>, worker: Option<&str>) -> SecurityFiles {
        let write = |name: &str, t: Option<&str>| {
            t.map(|t| {
                let p = dir.join(name);
                std::fs::write(&p, t).unwrap();
                p
            })
        };
        SecurityFiles {
            client_token_file: write("client", client),
            worker_token_file: write("worker", worker),
            ..Default::default()
        }
    }

    #[test]
    fn flag_combinations_that_leave_a_role_open_are_refused() {
        let dir = std::env::temp_dir().join(format!("mezo-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = |f: &SecurityFiles| Security::from_files(f).unwrap_err().to_string();
        let e = err(&files(&dir, Some(CLIENT), None));
        assert!(e.starts_with("--client-token-file is given but workers are not authenticated"), "{e}");
        let e = err(&files(&dir, None, Some(WORKER)));
        assert!(
            e.starts_with("workers are authenticated (--worker-token-file or --tls-client-ca) but"),
            "{e}"
        );
        let e = err(&files(&dir, Some(&format!("{CLIENT}\n{WORKER}\n")), Some(WORKER)));
        assert!(e.starts_with("a token is in both --client-token-file"), "{e}");
        assert!(!e.contains(WORKER), "{e}");
        let e = err(&SecurityFiles { tls_cert: Some("c.pem".into()), ..Default::default() });
        assert!(e.starts_with("--tls-cert and --tls-key go together"), "{e}");
        let mut f = files(&dir, Some(CLIENT), None);
        f.tls_client_ca = Some("ca.pem".into());
        assert!(err(&f).starts_with("--tls-client-ca (mutual TLS for workers) needs TLS itself"));
        let s = Security::from_files(&files(&dir, Some(CLIENT), Some(WORKER))).unwrap();
        assert_eq!(s.describe(), "client tokens: 1; worker tokens: 1; plaintext (no TLS)");
        assert!(s.warnings()[0].starts_with("warning: tokens are checked but TLS is off"));
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
    }
}
