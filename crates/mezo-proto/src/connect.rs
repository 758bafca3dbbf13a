//! How clients and workers reach a coordinator: `http://` or `https://` (rustls; the CA that
//! signed the coordinator's certificate from `--tls-ca`, else the system's trusted roots), a
//! client certificate for mutual TLS (workers), and a bearer token sent with every call.

use std::path::PathBuf;

/// The largest reply a client accepts: the coordinator's own limit on what it sends (snapshots,
/// exported adapters: 6 MB for OPT-1.3B at r=8, above tonic's 4 MiB default).
pub const MAX_REPLY_BYTES: usize = 1 << 30;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::credentials::{read_pem, CredentialError, Pem, Token};
use crate::v1::mezo_service_client::MezoServiceClient;
use crate::v1::worker_service_client::WorkerServiceClient;

/// A channel that adds the caller's token to every call.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Where a coordinator is and how to prove who we are to it.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<Token>,
    /// PEM certificate(s) of the CA that signed the coordinator's certificate (`https://` only);
    /// without it the system's trusted roots are used.
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate and private key this process presents (mutual TLS, for workers).
    pub tls_identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("--coordinator {url}: {problem}")]
    Url { url: String, problem: String },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("cannot reach the coordinator at {url}: {detail}{hint}")]
    Unreachable { url: String, detail: String, hint: String },
}

/// The interceptor that sends the token. The header value is marked sensitive, so HTTP/2 never
/// puts it in its compression tables and `Debug` of the metadata does not show it.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    pub fn new(token: Option<&Token>) -> Bearer {
        Bearer(token.map(|t| {
            let mut v = AsciiMetadataValue::try_from(format!("Bearer {}", t.expose()))
                .expect("Token::parse admits visible ASCII only");
            v.set_sensitive(true);
            v
        }))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// An error and its causes in one line ("transport error: …: invalid peer certificate: …"):
/// tonic's own `Display` says only "transport error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        // Layers often repeat their cause's text; keep each once.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A status with its causes ("transport error: connection error: received fatal alert: …"):
/// a call that failed below gRPC carries the reason in its source, not its message.
pub fn status_chain(s: &Status) -> String {
    match std::error::Error::source(s) {
        Some(src) => {
            let chain = error_chain(src);
            if chain.contains(s.message()) {
                chain
            } else {
                format!("{}: {chain}", s.message())
            }
        }
        None => s.message().to_string(),
    }
}

/// Whether a failed call means the coordinator's TLS layer refused this side's certificate
/// (or its lack): a TLS alert, which no retry can cure.
pub fn refused_by_tls(s: &Status) -> bool {
    status_chain(s).contains("received fatal alert")
}

/// How a plaintext call to a TLS server fails: the server reads the HTTP/2 preface as a bad TLS
/// record, answers with an alert and closes, so the client sees a bad frame, a closed
/// connection, or a pipe broken mid-request.
const PLAINTEXT_TO_TLS: [&str; 5] =
    ["h2 protocol error", "frame", "connection closed", "broken pipe", "connection reset"];

/// What a user most likely got wrong, judged from a failed call's causes (none for a status the
/// coordinator itself returned).
pub fn transport_hint(url: &str, s: &Status) -> String {
    if std::error::Error::source(s).is_none() {
        return String::new();
    }
    let d = status_chain(s).to_ascii_lowercase();
    if url.starts_with("http://") && PLAINTEXT_TO_TLS.iter().any(|c| d.contains(c)) {
        " (the connection failed below gRPC: if the coordinator serves TLS, use https:// and --tls-ca)".into()
    } else if d.contains("received fatal alert") {
        " (the coordinator's TLS layer refused this side's certificate: a worker's --tls-cert must be \
          signed by the coordinator's --tls-client-ca and made for client authentication)"
            .into()
    } else {
        String::new()
    }
}

impl Target {
    pub fn new(url: impl Into<String>) -> Target {
        Target { url: url.into(), ..Default::default() }
    }

    fn is_tls(&self) -> bool {
        self.url.starts_with("https://")
    }

    /// The endpoint with its TLS settings; reads the PEM files, so a missing or wrong one is
    /// named here, before any connection is tried.
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        let url_err = |problem: &str| ConnectError::Url { url: self.url.clone(), problem: problem.into() };
        if !self.url.starts_with("http://") && !self.is_tls() {
            return Err(url_err("expected http://HOST:PORT, or https://HOST:PORT for TLS"));
        }
        if !self.is_tls() {
            if self.tls_ca.is_some() {
                return Err(url_err("--tls-ca is given but the URL is plaintext http://: use https://"));
            }
            if self.tls_identity.is_some() {
                return Err(url_err(
                    "--tls-cert/--tls-key are given but the URL is plaintext http://: use https://",
                ));
            }
        }
        let mut ep = Endpoint::from_shared(self.url.clone()).map_err(|e| url_err(&e.to_string()))?;
        if self.is_tls() {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.tls_ca {
                Some(ca) => {
                    tls.ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca, Pem::Certificates)?))
                }
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &self.tls_identity {
                tls = tls.identity(Identity::from_pem(
                    read_pem("--tls-cert", cert, Pem::Certificates)?,
                    read_pem("--tls-key", key, Pem::PrivateKey)?,
                ));
            }
            ep = ep.tls_config(tls).map_err(|e| url_err(&error_chain(&e)))?;
        }
        Ok(ep)
    }

    /// Connects (TCP, TLS and HTTP/2 handshakes, so a refused certificate shows here).
    pub async fn channel(&self) -> Result<Channel, ConnectError> {
        let ep = self.endpoint()?;
        ep.connect().await.map_err(|e| {
            let detail = error_chain(&e);
            ConnectError::Unreachable { hint: self.hint(&detail), url: self.url.clone(), detail }
        })
    }

    /// What the user most likely got wrong, judged from a connection error's text.
    fn hint(&self, detail: &str) -> String {
        let d = detail.to_ascii_lowercase();
        if !self.is_tls() && PLAINTEXT_TO_TLS.iter().any(|c| d.contains(c)) {
            " (the connection failed below gRPC: if the coordinator serves TLS, use https:// and --tls-ca)"
                .into()
        } else if self.is_tls() && (d.contains("corrupt message") || d.contains("invalidcontenttype")) {
            " (the coordinator answered in plaintext: use http://, or start it with --tls-cert and --tls-key)"
                .into()
        } else if self.is_tls() && d.contains("unknownissuer") {
            " (the coordinator's certificate is not signed by a CA this side trusts: pass the CA with \
              --tls-ca)"
                .into()
        } else if self.is_tls() && d.contains("notvalidforname") {
            " (the coordinator's certificate does not name the host in the URL: connect by a name \
              its certificate lists)"
                .into()
        } else {
            String::new()
        }
    }

    pub fn bearer(&self) -> Bearer {
        Bearer::new(self.token.as_ref())
    }

    /// A `MezoService` client over `channel`, sending this target's token.
    pub fn mezo_client(&self, channel: Channel) -> MezoServiceClient<AuthChannel> {
        MezoServiceClient::with_interceptor(channel, self.bearer()).max_decoding_message_size(MAX_REPLY_BYTES)
    }

    /// A `WorkerService` client over `channel`, sending this target's token.
    pub fn worker_client(&self, channel: Channel) -> WorkerServiceClient<AuthChannel> {
        WorkerServiceClient::with_interceptor(channel, self.bearer())
            .max_decoding_message_size(MAX_REPLY_BYTES)
    }

    pub async fn mezo(&self) -> Result<MezoServiceClient<AuthChannel>, ConnectError> {
        Ok(self.mezo_client(self.channel().await?))
    }

    pub async fn worker(&self) -> Result<WorkerServiceClient<AuthChannel>, ConnectError> {
        Ok(self.worker_client(self.channel().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_tls_flags_must_agree() {
        let e = Target::new("127.0.0.1:50051").endpoint().unwrap_err().to_string();
        assert_eq!(
            e,
            "--coordinator 127.0.0.1:50051: expected http://HOST:PORT, or https://HOST:PORT for TLS"
        );
        let t = Target { tls_ca: Some("ca.pem".into()), ..Target::new("http://h:1") };
        let e = t.endpoint().unwrap_err().to_string();
        assert!(e.contains("--tls-ca is given but the URL is plaintext http://: use https://"), "{e}");
        let t = Target { tls_ca: Some("/nonexistent/ca.pem".into()), ..Target::new("https://h:1") };
        let e = t.endpoint().unwrap_err().to_string();
        assert!(e.starts_with("--tls-ca /nonexistent/ca.pem: cannot read it"), "{e}");
    }

    #[test]
    fn the_token_rides_in_a_sensitive_authorization_header() {
        let t = Token::parse("0123456789abcdef-secret", String::new).unwrap();
        let mut b = Bearer::new(Some(&t));
        let req = b.call(Request::new(())).unwrap();
        let v = req.metadata().get("authorization").unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer 0123456789abcdef-secret");
        assert!(v.is_sensitive());
        assert!(!format!("{:?}", req.metadata()).contains("secret"));
        let req = Bearer::new(None).call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
