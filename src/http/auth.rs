//! Who may use the `/v1/` API: bearer tokens, one per line of a file, compared in constant time.
//! The file is read again when it changes (checked at most once a second), so a rotated
//! Kubernetes Secret takes effect without a restart. `/metrics`, `/healthz` and `/readyz` stay
//! open: Prometheus and kubelets read them, and they hold no user's data.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{error, info, warn};

use crate::config::{HttpAuth, HttpConfig};
use crate::metrics::Metrics;

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The token file made when `http.token_file` is empty, in the data directory.
pub const GENERATED_TOKEN_FILE: &str = "api-token";

/// How often the token file is looked at for a change, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// The API's gate.
pub enum Auth {
    /// `http.auth = "none"`: everyone may ask.
    Open,
    Tokens(TokenFile),
}

impl Auth {
    /// The gate `config` asks for: with `http.auth = "none"` open (a warning says so); else the
    /// tokens of `http.token_file`, or of a file generated in `data_dir` when none is named.
    pub fn prepare(config: &HttpConfig, data_dir: &Path) -> Result<Self> {
        if config.auth == HttpAuth::None {
            warn!("http.auth = \"none\": the /v1/ API (every user's history and recommendations) answers anyone who reaches http.listen");
            return Ok(Self::Open);
        }
        let path = if config.token_file.as_os_str().is_empty() {
            generated_token_file(data_dir)?
        } else {
            config.token_file.clone()
        };
        Ok(Self::Tokens(TokenFile::open(path)?))
    }

    /// Whether `authorization` (the header's value) names a valid token.
    fn admits(&self, authorization: Option<&[u8]>) -> bool {
        match self {
            Self::Open => true,
            Self::Tokens(file) => authorization
                .and_then(|v| v.strip_prefix(b"Bearer "))
                .is_some_and(|token| file.admits(token)),
        }
    }
}

/// The token file in `data_dir`, made with a fresh random token (readable by this user only)
/// when it is not there yet.
fn generated_token_file(data_dir: &Path) -> Result<PathBuf> {
    let path = data_dir.join(GENERATED_TOKEN_FILE);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let token: String = {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(&path)
        .with_context(|| format!("cannot create the API token file {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    info!(file = %path.display(), "generated an API token: send it as `Authorization: Bearer <token>` (http.token_file names your own)");
    Ok(path)
}

/// The tokens of a file, as SHA-256 digests (compared in constant time), read again when the
/// file changes.
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    digests: Arc<Vec<[u8; 32]>>,
    /// The file's modification time and length when it was read.
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl TokenFile {
    /// Reads the file: an error if it cannot be read or holds no valid token.
    pub fn open(path: PathBuf) -> Result<Self> {
        let digests = read_tokens(&path)?;
        Ok(Self {
            state: Mutex::new(Loaded {
                digests: Arc::new(digests),
                stamp: stamp(&path),
                checked: Instant::now(),
            }),
            path,
        })
    }

    fn admits(&self, token: &[u8]) -> bool {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let digests = self.current();
        // every token is compared, so the time taken says nothing of which one matched
        digests
            .iter()
            .fold(subtle::Choice::from(0), |found, d| {
                found | d.ct_eq(&presented)
            })
            .into()
    }

    /// The tokens now: read again if the file changed since it was last read (a file that
    /// became unreadable or invalid keeps the tokens it had, with an error logged).
    fn current(&self) -> Arc<Vec<[u8; 32]>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamp(&self.path);
            if now != state.stamp {
                state.stamp = now;
                match read_tokens(&self.path) {
                    Ok(d) => {
                        info!(file = %self.path.display(), tokens = d.len(), "API tokens read again");
                        state.digests = Arc::new(d);
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "the API token file changed but cannot be used: the tokens read before stay valid")
                    }
                }
            }
        }
        state.digests.clone()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The tokens of a file: one per line, blank lines and `#` comments skipped; each at least
/// [`MIN_TOKEN_CHARS`] visible ASCII characters.
fn read_tokens(path: &Path) -> Result<Vec<[u8; 32]>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("http.token_file: cannot read {}", path.display()))?;
    let mut digests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let token = line.trim();
        if token.is_empty() || token.starts_with('#') {
            continue;
        }
        if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "http.token_file: {} line {}: a token must be at least {MIN_TOKEN_CHARS} visible ASCII characters",
                path.display(),
                n + 1
            );
        }
        digests.push(Sha256::digest(token.as_bytes()).into());
    }
    if digests.is_empty() {
        bail!(
            "http.token_file: {} holds no token (one per line)",
            path.display()
        );
    }
    Ok(digests)
}

/// What the gate uses.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<Auth>,
    pub metrics: Arc<Metrics>,
}

/// The middleware in front of `/v1/`: a request without a valid bearer token gets 401 with
/// `WWW-Authenticate` and nothing else.
pub async fn require_token(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let given = request.headers().get(header::AUTHORIZATION);
    if gate.auth.admits(given.map(HeaderValue::as_bytes)) {
        return next.run(request).await;
    }
    gate.metrics.http_unauthorized.inc();
    let challenge = if given.is_some() {
        r#"Bearer realm="multivaed", error="invalid_token""#
    } else {
        r#"Bearer realm="multivaed""#
    };
    let mut r = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "error": "a valid bearer token is needed: Authorization: Bearer <token>"
        })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_checked_and_read_again_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# fleet tokens\n\nfirst-token-0123456789\n").unwrap();
        let file = TokenFile::open(path.clone()).unwrap();
        assert!(file.admits(b"first-token-0123456789"));
        assert!(!file.admits(b"first-token-012345678"));
        assert!(!file.admits(b""));
        // rotated: both during the overlap, then only the new one
        std::fs::write(&path, "second-token-0123456789xx\nfirst-token-0123456789\n").unwrap();
        file.state.lock().unwrap().checked -= RECHECK;
        assert!(file.admits(b"second-token-0123456789xx"));
        std::fs::write(&path, "second-token-0123456789xx\n").unwrap();
        file.state.lock().unwrap().checked -= RECHECK;
        assert!(!file.admits(b"first-token-0123456789"));
        // a broken rotation keeps what was valid
        std::fs::write(&path, "short\n").unwrap();
        file.state.lock().unwrap().checked -= RECHECK;
        assert!(file.admits(b"second-token-0123456789xx"));
        for bad in [
            "",
            "# only a comment\n",
            "short\n",
            "has space in the token\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(TokenFile::open(path.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_generated_token_file_is_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = HttpConfig::default();
        assert_eq!(config.auth, HttpAuth::Token, "on unless switched off");
        let Auth::Tokens(_) = Auth::prepare(&config, dir.path()).unwrap() else {
            panic!("a token gate")
        };
        let path = dir.path().join(GENERATED_TOKEN_FILE);
        let token = std::fs::read_to_string(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        let again = Auth::prepare(&config, dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
        let header = format!("Bearer {}", token.trim());
        assert!(again.admits(Some(header.as_bytes())));
        assert!(!again.admits(Some(token.trim().as_bytes())), "no scheme");
        assert!(!again.admits(None));
        assert!(Auth::Open.admits(None));
    }
}
