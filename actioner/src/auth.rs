//! Who may call the API: a bearer token (as Alertmanager's `http_config.authorization`
//! sends it) or HTTP Basic credentials (`http_config.basic_auth`), compared in constant time.
//! The wake relay also takes its own key in the request body.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

use crate::config::Config;

/// Loaded credentials.
#[derive(Clone)]
pub struct Auth {
    bearer: Vec<u8>,
    basic: Option<(Vec<u8>, Vec<u8>)>,
    wake_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("basic", &self.basic.is_some())
            .field("wake_key", &self.wake_key.is_some())
            .finish_non_exhaustive()
    }
}

fn secret(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    Ok(std::fs::read_to_string(path)?.trim().as_bytes().to_vec())
}

/// Constant-time equality (different lengths are unequal, in time that depends only on them).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

impl Auth {
    /// Reads the secret files the config names (checked by `check_files` before).
    pub fn load(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            bearer: secret(&config.auth.bearer_token_file)?,
            basic: config
                .auth
                .basic
                .as_ref()
                .map(|b| {
                    Ok::<_, std::io::Error>((
                        b.username.as_bytes().to_vec(),
                        secret(&b.password_file)?,
                    ))
                })
                .transpose()?,
            wake_key: config
                .actions
                .wake
                .key_file
                .as_deref()
                .map(secret)
                .transpose()?,
        })
    }

    /// Credentials from literal values (tests, benchmarks).
    pub fn from_secrets(bearer: &str, basic: Option<(&str, &str)>, wake_key: Option<&str>) -> Self {
        Self {
            bearer: bearer.as_bytes().to_vec(),
            basic: basic.map(|(u, p)| (u.as_bytes().to_vec(), p.as_bytes().to_vec())),
            wake_key: wake_key.map(|k| k.as_bytes().to_vec()),
        }
    }

    /// Whether the request carries a valid bearer token or Basic credentials.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(AUTHORIZATION).map(|v| v.as_bytes()) else {
            return false;
        };
        if let Some(token) = value.strip_prefix(b"Bearer ") {
            return !self.bearer.is_empty() && same(token.trim_ascii(), &self.bearer);
        }
        if let (Some(encoded), Some((user, pass))) = (value.strip_prefix(b"Basic "), &self.basic) {
            let Ok(decoded) =
                base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii())
            else {
                return false;
            };
            let Some(colon) = decoded.iter().position(|b| *b == b':') else {
                return false;
            };
            // Evaluate both halves, so timing does not tell which one was wrong.
            let user_ok = same(&decoded[..colon], user);
            let pass_ok = same(&decoded[colon + 1..], pass);
            return user_ok & pass_ok;
        }
        false
    }

    /// Whether `key` is the wake relay's key.
    pub fn wake_key_matches(&self, key: &str) -> bool {
        self.wake_key
            .as_ref()
            .is_some_and(|k| !k.is_empty() && same(key.as_bytes(), k))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_and_basic() {
        let auth = Auth::from_secrets("s3cret", Some(("alertmanager", "pa:ss")), Some("wake-key"));
        assert!(auth.allows(&headers("Bearer s3cret")));
        assert!(!auth.allows(&headers("Bearer s3cre")));
        assert!(!auth.allows(&headers("Bearer s3cret2")));
        assert!(!auth.allows(&headers("bearer s3cret")));
        assert!(!auth.allows(&HeaderMap::new()));
        let basic = base64::engine::general_purpose::STANDARD.encode("alertmanager:pa:ss");
        assert!(auth.allows(&headers(&format!("Basic {basic}"))));
        let wrong = base64::engine::general_purpose::STANDARD.encode("alertmanager:pass");
        assert!(!auth.allows(&headers(&format!("Basic {wrong}"))));
        assert!(!auth.allows(&headers("Basic !!!not-base64")));
        assert!(auth.wake_key_matches("wake-key"));
        assert!(!auth.wake_key_matches("wake-ke"));
        assert!(!auth.wake_key_matches(""));
    }

    #[test]
    fn basic_is_refused_when_not_configured_and_empty_secrets_never_match() {
        let auth = Auth::from_secrets("", None, None);
        let basic = base64::engine::general_purpose::STANDARD.encode(":");
        assert!(!auth.allows(&headers(&format!("Basic {basic}"))));
        assert!(!auth.allows(&headers("Bearer ")));
        assert!(!auth.wake_key_matches(""));
    }
}
