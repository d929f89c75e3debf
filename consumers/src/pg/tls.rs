//! TLS to PostgreSQL with libpq's meanings, so a connection string that works
//! with `psql` works here: `sslmode` is one of `disable`, `allow`, `prefer`,
//! `require`, `verify-ca`, `verify-full`, and `sslrootcert`, `sslcert`,
//! `sslkey` name PEM files.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require` and rejects the
//! other keys, so they are taken out of the string here (in both the URL and
//! the `key=value` form), turned into an OpenSSL connector, and the rest is
//! left to tokio-postgres untouched.
//!
//! | sslmode       | encrypted             | certificate checked                  |
//! |---------------|-----------------------|--------------------------------------|
//! | `disable`     | never                 | -                                    |
//! | `allow`, `prefer` (default) | when the server offers it | as `require`         |
//! | `require`     | always                | only against `sslrootcert` if given  |
//! | `verify-ca`   | always                | chain against `sslrootcert` (required) |
//! | `verify-full` | always                | chain and host name                  |
//!
//! `sslrootcert=system` trusts the system's roots and, as in libpq 16, makes
//! `verify-full` the default and any weaker mode an error: anyone can get a
//! publicly trusted certificate for a host name they control, so a chain
//! check without the host name proves nothing. For the same reason
//! `verify-ca` needs a `sslrootcert` file of its own (libpq needs one too),
//! and `verify-full` without `sslrootcert` checks against the system's roots.
//!
//! (`allow` tries TLS first rather than last: the only difference is which
//! of two working connections is used.) This module does no I/O but reading the
//! named certificate files.

use std::borrow::Cow;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use postgres_native_tls::MakeTlsConnector;

/// A connection string's TLS requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// libpq's `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: the certificates (PEM, one or more) a server's chain must
    /// end in; `None` for the system's roots.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`: the client certificate (PEM) and its PKCS#8 key,
    /// for servers that authenticate clients by certificate.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsError::Mode(other.to_owned())),
        })
    }

    /// The nearest mode tokio-postgres knows: whether TLS is tried, and
    /// whether its absence is an error. Verification is the connector's job.
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow | SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// What is wrong with the TLS settings; every message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={0} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    Mode(String),
    #[error("cannot read {key}={path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("sslrootcert={path} holds no PEM certificate")]
    NoRootCert { path: String },
    #[error("sslcert and sslkey go together: set both or neither")]
    HalfIdentity,
    #[error(
        "sslcert/sslkey: {0} (the key must be PEM PKCS#8, `BEGIN PRIVATE KEY`; convert one with \
         `openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.pk8.pem`)"
    )]
    Identity(native_tls::Error),
    #[error("{key}: {source}")]
    Certificate {
        key: &'static str,
        source: native_tls::Error,
    },
    #[error("TLS setup: {0}")]
    Connector(native_tls::Error),
    #[error(
        "sslrootcert=system needs sslmode=verify-full (leave sslmode out or set it so), not sslmode={0}: \
         any public certificate authority signs for a host name its owner controls"
    )]
    SystemRootsNeedFullCheck(String),
    #[error(
        "sslmode=verify-ca needs sslrootcert=<PEM file of the server's certificate authority>: a chain \
         check against public roots without the host name proves nothing (for a server with a public \
         certificate use sslmode=verify-full)"
    )]
    VerifyCaWithoutRoot,
    #[error("unterminated quoted value in the connection string")]
    Quote,
}

/// The keys taken out of the connection string.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `conn` into the string to give tokio-postgres (the TLS keys removed,
/// `sslmode` replaced by the nearest mode it knows) and the TLS options.
pub fn split(conn: &str) -> Result<(String, TlsOptions), TlsError> {
    let is_url = conn.starts_with("postgres://") || conn.starts_with("postgresql://");
    let (rest, pairs) = if is_url {
        split_url(conn)
    } else {
        split_key_values(conn)?
    };
    let mut opts = TlsOptions::default();
    let mut mode_given = None;
    for (key, value) in pairs {
        match key.as_str() {
            "sslmode" => {
                opts.mode = SslMode::parse(&value)?;
                mode_given = Some(value);
            }
            "sslrootcert" => opts.root_cert = Some(value.into()),
            "sslcert" => opts.client_cert = Some(value.into()),
            _ => opts.client_key = Some(value.into()),
        }
    }
    if opts.root_cert.as_deref() == Some(std::path::Path::new("system")) {
        opts.root_cert = None;
        match mode_given {
            Some(given) if opts.mode != SslMode::VerifyFull => return Err(TlsError::SystemRootsNeedFullCheck(given)),
            _ => opts.mode = SslMode::VerifyFull,
        }
    }
    if opts.mode == SslMode::VerifyCa && opts.root_cert.is_none() {
        return Err(TlsError::VerifyCaWithoutRoot);
    }
    let mode = opts.mode.for_tokio_postgres();
    let rest = match (is_url, rest.contains('?')) {
        (true, true) => format!("{rest}&sslmode={mode}"),
        (true, false) => format!("{rest}?sslmode={mode}"),
        (false, _) if rest.trim().is_empty() => format!("sslmode={mode}"),
        (false, _) => format!("{} sslmode={mode}", rest.trim_end()),
    };
    Ok((rest, opts))
}

/// The URL form: TLS keys are query parameters, percent-encoded.
fn split_url(conn: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = conn.split_once('?') else {
        return (conn.to_owned(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let key = decode(k);
        if TLS_KEYS.contains(&key.as_ref()) {
            taken.push((key.into_owned(), decode(v).into_owned()));
        } else {
            kept.push(param);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, taken)
}

fn decode(s: &str) -> Cow<'_, str> {
    percent_decode_str(s).decode_utf8_lossy()
}

/// The `key=value` form: whitespace between pairs, optional whitespace around
/// `=`, values bare or single-quoted with `\'` and `\\` escapes. Pairs that are
/// not TLS keys are kept exactly as written.
fn split_key_values(conn: &str) -> Result<(String, Vec<(String, String)>), TlsError> {
    let bytes = conn.as_bytes();
    let mut rest = String::with_capacity(conn.len());
    let mut taken = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conn[start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        // A key without `=`: leave it for tokio-postgres to reject.
        if i >= bytes.len() || bytes[i] != b'=' {
            rest.push_str(&conn[start..i]);
            rest.push(' ');
            continue;
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(TlsError::Quote),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1] as char);
                        i += 2;
                    }
                    Some(_) => {
                        // Copy a whole UTF-8 character.
                        let ch = conn[i..].chars().next().unwrap_or_default();
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
        } else {
            let v = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&conn[v..i]);
        }
        if TLS_KEYS.contains(&key) {
            taken.push((key.to_owned(), value));
        } else {
            rest.push_str(&conn[start..i]);
            rest.push(' ');
        }
    }
    Ok((rest, taken))
}

/// The OpenSSL connector for `opts`, certificate files read.
pub fn connector(opts: &TlsOptions) -> Result<MakeTlsConnector, TlsError> {
    let mut b = native_tls::TlsConnector::builder();
    let verify_chain = match opts.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        // As libpq: with a root certificate named, `require` checks the chain.
        _ => opts.root_cert.is_some(),
    };
    b.danger_accept_invalid_certs(!verify_chain);
    b.danger_accept_invalid_hostnames(opts.mode != SslMode::VerifyFull);
    if let Some(path) = &opts.root_cert {
        let pem = read("sslrootcert", path)?;
        let certs = native_tls::Certificate::stack_from_pem(&pem).map_err(|source| TlsError::Certificate {
            key: "sslrootcert",
            source,
        })?;
        if certs.is_empty() {
            return Err(TlsError::NoRootCert {
                path: path.display().to_string(),
            });
        }
        // Only the named roots, as libpq does.
        b.disable_built_in_roots(true);
        for cert in certs {
            b.add_root_certificate(cert);
        }
    }
    match (&opts.client_cert, &opts.client_key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let identity = native_tls::Identity::from_pkcs8(&read("sslcert", cert)?, &read("sslkey", key)?)
                .map_err(TlsError::Identity)?;
            b.identity(identity);
        }
        _ => return Err(TlsError::HalfIdentity),
    }
    Ok(MakeTlsConnector::new(b.build().map_err(TlsError::Connector)?))
}

fn read(key: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(conn: &str, rest: &str, mode: SslMode, root: Option<&str>) {
        let (got_rest, opts) = split(conn).unwrap_or_else(|e| panic!("{conn}: {e}"));
        assert_eq!(got_rest, rest, "{conn}");
        assert_eq!(opts.mode, mode, "{conn}");
        assert_eq!(opts.root_cert, root.map(PathBuf::from), "{conn}");
        // What is left is something tokio-postgres accepts.
        got_rest
            .parse::<tokio_postgres::Config>()
            .unwrap_or_else(|e| panic!("{got_rest}: {e}"));
    }

    #[test]
    fn urls_lose_their_tls_keys_and_keep_the_rest() {
        use SslMode::*;
        check(
            "postgres://u:p@db:5432/x",
            "postgres://u:p@db:5432/x?sslmode=prefer",
            Prefer,
            None,
        );
        check(
            "postgresql://u@db/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
            "postgresql://u@db/x?connect_timeout=5&sslmode=require",
            VerifyFull,
            Some("/etc/ca.pem"),
        );
        check(
            "postgres://db/x?application_name=a&sslmode=disable",
            "postgres://db/x?application_name=a&sslmode=disable",
            Disable,
            None,
        );
        check(
            "postgres://db/x?sslrootcert=system",
            "postgres://db/x?sslmode=require",
            VerifyFull,
            None,
        );
        check(
            "postgres://db/x?sslrootcert=system&sslmode=verify-full",
            "postgres://db/x?sslmode=require",
            VerifyFull,
            None,
        );
        check(
            "postgres://db/x?sslmode=allow",
            "postgres://db/x?sslmode=prefer",
            Allow,
            None,
        );
    }

    #[test]
    fn key_value_strings_lose_their_tls_keys_and_keep_the_rest() {
        use SslMode::*;
        check(
            "host=db user=u sslmode=verify-full sslrootcert='/a b/c\\'a.pem' dbname=x",
            "host=db user=u dbname=x sslmode=require",
            VerifyFull,
            Some("/a b/c'a.pem"),
        );
        check(
            "host = db  password='s e c' sslmode = require",
            "host = db password='s e c' sslmode=require",
            Require,
            None,
        );
        check("sslmode=disable", "sslmode=disable", Disable, None);
        check("", "sslmode=prefer", Prefer, None);
    }

    #[test]
    fn bad_tls_settings_are_named() {
        let err = split("postgres://db/x?sslmode=verify").unwrap_err().to_string();
        assert!(err.contains("sslmode=verify is not one of"), "{err}");
        for weaker in ["disable", "allow", "prefer", "require", "verify-ca"] {
            let err = split(&format!("host=db sslmode={weaker} sslrootcert=system"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("needs sslmode=verify-full"), "{err}");
            assert!(err.contains(&format!("not sslmode={weaker}")), "{err}");
        }
        let err = split("postgres://db/x?sslmode=verify-ca").unwrap_err().to_string();
        assert!(err.contains("verify-ca needs sslrootcert"), "{err}");
        let err = split("host=db sslrootcert='/open").unwrap_err().to_string();
        assert!(err.contains("unterminated"), "{err}");
        let (_, opts) = split("host=db sslcert=/c.pem").expect("split");
        let err = connector(&opts).err().expect("half identity").to_string();
        assert!(err.contains("set both"), "{err}");
        let (_, opts) = split("host=db sslrootcert=/no/such/ca.pem").expect("split");
        let err = connector(&opts).err().expect("missing file").to_string();
        assert!(err.contains("cannot read sslrootcert=/no/such/ca.pem"), "{err}");
    }
}
