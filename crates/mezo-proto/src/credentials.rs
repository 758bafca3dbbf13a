//! Credentials as the coordinator and its callers read them: bearer tokens (from files, or
//! `$MEZO_TOKEN` for a client) and PEM files for TLS.
//!
//! Tokens are read from files or the environment, never from flags, so they stay out of `ps`,
//! shell history and process listings in orchestrators. A [`Token`] never prints itself (its
//! `Debug` is redacted and it has no `Display`), and no error here quotes one: a bad line is named
//! by its file and number, never by its content.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable a client or worker reads its token from when no `--token-file` is
/// given.
pub const TOKEN_ENV: &str = "MEZO_TOKEN";

/// The shortest token accepted: shorter ones are guessable. `openssl rand -hex 32` makes 64.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    // The io error's text comes through `source` (anyhow's `{:#}` prints the chain).
    #[error("{flag} {}: cannot read it", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{flag} {}: holds no token (one token a line; empty lines and lines starting with # are \
         skipped)",
        path.display()
    )]
    NoToken { flag: &'static str, path: PathBuf },
    #[error(
        "{flag} {}: holds {count} tokens; a client or worker sends one (a file of several is for \
         the coordinator's --client-token-file or --worker-token-file)",
        path.display()
    )]
    SeveralTokens { flag: &'static str, path: PathBuf, count: usize },
    /// `place` is e.g. `--client-token-file /etc/mezo/client, line 3` or `$MEZO_TOKEN`.
    #[error("{place}: {problem}")]
    BadToken { place: String, problem: String },
    #[error("{flag} {}: {problem}", path.display())]
    BadPem { flag: &'static str, path: PathBuf, problem: String },
}

/// A bearer token. It never prints itself: `Debug` shows `Token(<redacted>)`, and there is no
/// `Display`; the one way to its text is [`Token::expose`], so every use is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks a token's text (already trimmed); `place` names where it came from in the error.
    pub fn parse(text: &str, place: impl FnOnce() -> String) -> Result<Token, CredentialError> {
        // It travels as an HTTP/2 header value (`authorization: Bearer <token>`), which carries
        // visible ASCII only; spaces would also make `Bearer a b` ambiguous.
        let problem = if !text.bytes().all(|b| b.is_ascii_graphic()) {
            Some(
                "the token has a character other than visible ASCII (letters, digits, punctuation; \
                 no spaces or tabs): it must fit an HTTP header"
                    .to_string(),
            )
        } else if text.len() < MIN_TOKEN_LEN {
            Some(format!(
                "the token is {} characters long; at least {MIN_TOKEN_LEN} are needed (make one with \
                 `openssl rand -hex 32`)",
                text.len()
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => Err(CredentialError::BadToken { place: place(), problem }),
            None => Ok(Token(text.into())),
        }
    }

    /// The token's text, for the one place that sends it (the `authorization` header) and the
    /// one that hashes it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Every token in a file: one a line, surrounding whitespace trimmed, empty lines and lines
/// starting with `#` skipped. Several tokens let an operator rotate them: add the new one,
/// move the callers over, remove the old one.
pub fn read_tokens(flag: &'static str, path: &Path) -> Result<Vec<Token>, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        tokens.push(Token::parse(line, || format!("{flag} {}, line {}", path.display(), i + 1))?);
    }
    if tokens.is_empty() {
        return Err(CredentialError::NoToken { flag, path: path.to_path_buf() });
    }
    Ok(tokens)
}

/// The token a client or worker sends: the one in `file` (`--token-file`), else `$MEZO_TOKEN`,
/// else none (for a coordinator that checks no tokens).
pub fn caller_token(file: Option<&Path>) -> Result<Option<Token>, CredentialError> {
    const FLAG: &str = "--token-file";
    if let Some(path) = file {
        let mut tokens = read_tokens(FLAG, path)?;
        if tokens.len() > 1 {
            return Err(CredentialError::SeveralTokens {
                flag: FLAG,
                path: path.to_path_buf(),
                count: tokens.len(),
            });
        }
        return Ok(tokens.pop());
    }
    match std::env::var(TOKEN_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(Token::parse(v.trim(), || format!("${TOKEN_ENV}"))?)),
        _ => Ok(None),
    }
}

/// What a PEM file must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pem {
    /// One or more certificates (a certificate chain, or CA certificates).
    Certificates,
    /// One private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reads a PEM file and checks that it holds what `kind` says, so a swapped or truncated file is
/// named here rather than failing later as "error parsing TLS certificate".
pub fn read_pem(flag: &'static str, path: &Path, kind: Pem) -> Result<Vec<u8>, CredentialError> {
    let bytes = std::fs::read(path).map_err(|source| CredentialError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let bad =
        |problem: &str| CredentialError::BadPem { flag, path: path.to_path_buf(), problem: problem.into() };
    let has_cert = text.contains("-----BEGIN CERTIFICATE-----");
    let has_key = text.contains("PRIVATE KEY-----");
    match kind {
        Pem::Certificates if !has_cert && has_key => {
            Err(bad("holds a private key, not a certificate (are the certificate and key swapped?)"))
        }
        Pem::Certificates if !has_cert => {
            Err(bad("holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"))
        }
        Pem::PrivateKey if !has_key && has_cert => {
            Err(bad("holds a certificate, not a private key (are the certificate and key swapped?)"))
        }
        Pem::PrivateKey if !has_key => Err(bad("holds no PEM private key (`-----BEGIN … PRIVATE KEY-----`)")),
        _ => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mezo-credentials-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn token_files_skip_comments_and_blank_lines_and_trim() {
        let p = file("ok", "# rotated 2026-11\n\n  0123456789abcdef0123  \r\nfedcba9876543210fedc\n");
        let t = read_tokens("--client-token-file", &p).unwrap();
        assert_eq!(
            t.iter().map(Token::expose).collect::<Vec<_>>(),
            ["0123456789abcdef0123", "fedcba9876543210fedc"]
        );
    }

    #[test]
    fn bad_tokens_are_named_by_place_never_quoted() {
        let secret = "has a space inside it 0123456789";
        let p = file("space", &format!("0123456789abcdef\n{secret}\n"));
        let e = read_tokens("--worker-token-file", &p).unwrap_err().to_string();
        assert!(e.starts_with(&format!("--worker-token-file {}, line 2: ", p.display())), "{e}");
        assert!(e.contains("visible ASCII"), "{e}");
        assert!(!e.contains("inside"), "the error quotes the token: {e}");

        let p = file("short", "shorty\n");
        let e = read_tokens("--token-file", &p).unwrap_err().to_string();
        assert!(e.contains("line 1: the token is 6 characters long; at least 16"), "{e}");
        assert!(!e.contains("shorty"), "{e}");

        let p = file("empty", "# nothing yet\n\n");
        let e = read_tokens("--client-token-file", &p).unwrap_err().to_string();
        assert!(e.contains("holds no token"), "{e}");

        let e = read_tokens("--client-token-file", Path::new("/nonexistent/tokens")).unwrap_err().to_string();
        assert!(e.starts_with("--client-token-file /nonexistent/tokens: cannot read it"), "{e}");
    }

    #[test]
    fn a_caller_sends_exactly_one_token() {
        let p = file("two", "0123456789abcdef\nfedcba9876543210\n");
        let e = caller_token(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("holds 2 tokens; a client or worker sends one"), "{e}");
        let p = file("one", "0123456789abcdef\n");
        assert_eq!(caller_token(Some(&p)).unwrap().unwrap().expose(), "0123456789abcdef");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = Token::parse("0123456789abcdef-secret", String::new).unwrap();
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert_eq!(format!("{:?}", Some(t)), "Some(Token(<redacted>))");
    }

    #[test]
    fn pem_files_must_hold_what_they_are_for() {
        let cert = file("cert.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let key = file("key.pem", "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n");
        assert!(read_pem("--tls-cert", &cert, Pem::Certificates).is_ok());
        assert!(read_pem("--tls-key", &key, Pem::PrivateKey).is_ok());
        let e = read_pem("--tls-cert", &key, Pem::Certificates).unwrap_err().to_string();
        assert!(
            e.contains("holds a private key, not a certificate (are the certificate and key swapped?)"),
            "{e}"
        );
        let e = read_pem("--tls-key", &cert, Pem::PrivateKey).unwrap_err().to_string();
        assert!(e.contains("holds a certificate, not a private key"), "{e}");
        let junk = file("junk.pem", "hello\n");
        let e = read_pem("--tls-ca", &junk, Pem::Certificates).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("--tls-ca {}: holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)", junk.display())
        );
    }
}
