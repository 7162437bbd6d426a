//! Buttons on notifications: ntfy `http` actions that call back into this actioner, so that a
//! phone can wake a host, fail back or repair a service with one tap.
//!
//! A button's link is `POST <url>/api/v1/buttons/<token>`. The token names one action on one
//! target for one alert firing, carries its expiry, and is signed with HMAC-SHA256 under the key
//! in `actions.notify.buttons.key_file`. Whoever sees the notification (the ntfy server too) can
//! press that button, until it expires, once: nothing else. The bearer token never leaves the
//! actioner. A press goes through the manual trigger's safety path (allowlist, pause, cooldown,
//! the action's own re-checks) under the journal key `button:<action>:<target>:<alert>`, which
//! makes it once-only across restarts.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::Serialize;

use super::{ButtonOffer, ButtonsConfig};
use crate::actions::SetupError;
use crate::alert::{Alert, AlertStatus, LabelMatcher};
use crate::vocab::{ActionKind, Allowlists, RunKey};

/// ntfy shows at most this many actions on a notification.
pub const MAX_BUTTONS: usize = 3;
/// Tokens longer than this are refused unread.
const MAX_TOKEN_LEN: usize = 1024;
/// Signed with every payload, so a tag cannot be replayed under another scheme.
const DOMAIN: &[u8] = b"aistack-button-v1\n";

/// An ntfy action button (JSON publishing, `actions[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NtfyAction {
    /// Always `http`: the ntfy app sends the request itself.
    pub action: &'static str,
    /// The button's text.
    pub label: String,
    /// The signed link.
    pub url: String,
    /// Always `POST`.
    pub method: &'static str,
    /// Dismiss the notification once the request succeeded.
    pub clear: bool,
}

/// A verified press: what to run, and the key that makes it once-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Press {
    /// The action.
    pub action: ActionKind,
    /// Its target, for actions that take one.
    pub target: Option<String>,
    /// For actions that take no target (failover, failback): the node the alert was about,
    /// for re-checks on that node's exporter.
    pub node: Option<String>,
    /// The journal key: `button:<action>:<target>:<firing>`.
    pub key: RunKey,
    /// The alert firing it is about: `<fingerprint>@<startsAt>`.
    pub firing: String,
}

/// Why a press was refused (403, except where said).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ButtonError {
    /// Not a token this actioner could have made.
    #[error("not a valid button")]
    Invalid,
    /// Signed, but past its expiry.
    #[error("this button has expired")]
    Expired,
}

struct Offer {
    config: ButtonOffer,
    matcher: LabelMatcher,
}

/// Makes and checks button links.
pub struct Buttons {
    url: String,
    key: hmac::Key,
    ttl: Duration,
    offers: Vec<Offer>,
    allowlists: Allowlists,
}

impl std::fmt::Debug for Buttons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buttons")
            .field("url", &self.url)
            .field("ttl", &self.ttl)
            .field("offers", &self.offers.len())
            .finish_non_exhaustive()
    }
}

impl Buttons {
    /// The buttons `config` asks for, reading the signing key; targets only from `allowlists`.
    pub fn new(config: &ButtonsConfig, allowlists: Allowlists) -> Result<Self, SetupError> {
        let key =
            std::fs::read_to_string(&config.key_file).map_err(|source| SetupError::Secret {
                path: config.key_file.clone(),
                source,
            })?;
        let offers = config
            .offer
            .iter()
            .map(|offer| {
                Ok(Offer {
                    config: offer.clone(),
                    matcher: LabelMatcher::new(&offer.match_labels, &offer.match_re)?,
                })
            })
            .collect::<Result<_, regex::Error>>()?;
        Ok(Self::with_key(
            &config.url,
            key.trim().as_bytes(),
            config.ttl.into(),
            offers,
            allowlists,
        ))
    }

    fn with_key(
        url: &str,
        key: &[u8],
        ttl: Duration,
        offers: Vec<Offer>,
        allowlists: Allowlists,
    ) -> Self {
        Self {
            url: url.trim_end_matches('/').to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            ttl,
            offers,
            allowlists,
        }
    }

    /// The buttons for `alert`'s notification sent at `now`: firing alerts only (a resolution
    /// replaces the notification, and its buttons go with it), allowlisted targets only, at
    /// most [`MAX_BUTTONS`].
    pub fn for_alert(&self, alert: &Alert, now: SystemTime) -> Vec<NtfyAction> {
        if alert.status != AlertStatus::Firing {
            return Vec::new();
        }
        let Some(expires) = now
            .checked_add(self.ttl)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
        else {
            return Vec::new();
        };
        let firing = format!("{}@{}", alert.fingerprint, alert.starts_at);
        self.offers
            .iter()
            .filter(|offer| offer.matcher.matches(alert))
            .filter_map(|offer| {
                let config = &offer.config;
                let target = config
                    .target
                    .clone()
                    .or_else(|| {
                        let label = config.target_label.as_ref()?;
                        alert.labels.get(label).cloned()
                    })
                    .or_else(|| {
                        let about_host =
                            matches!(config.action, ActionKind::Wake | ActionKind::Suspend)
                                || config.action.moves_backend();
                        about_host.then(|| alert.host()).flatten()
                    });
                let target = target.map(|t| self.allowlists.as_configured(config.action, t));
                let takes_target = self.allowlists.takes_target(config.action);
                let allowed = !takes_target
                    || target
                        .as_deref()
                        .is_some_and(|t| self.allowlists.allows(config.action, t));
                if !allowed {
                    return None;
                }
                // An action without a target signs the alert's node in its place.
                let signed = if takes_target {
                    target.clone()
                } else {
                    alert.host().filter(|h| crate::exporter::valid_node(h))
                };
                let token = self.sign(config.action, signed.as_deref(), expires, &firing)?;
                Some(NtfyAction {
                    action: "http",
                    label: config
                        .label
                        .replace("{target}", target.as_deref().unwrap_or_default()),
                    url: format!("{}/api/v1/buttons/{token}", self.url),
                    method: "POST",
                    clear: true,
                })
            })
            .take(MAX_BUTTONS)
            .collect()
    }

    /// The token for `action` on `target`, valid until `expires` (Unix seconds), for the alert
    /// firing `firing`; `None` when a field holds a newline (it could not be read back).
    fn sign(
        &self,
        action: ActionKind,
        target: Option<&str>,
        expires: u64,
        firing: &str,
    ) -> Option<String> {
        let target = target.unwrap_or_default();
        if target.contains('\n') || firing.contains('\n') {
            return None;
        }
        let payload = format!("{}\n{expires}\n{firing}\n{target}", action.name());
        let tag = hmac::sign(&self.key, &[DOMAIN, payload.as_bytes()].concat());
        Some(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// Checks `token` at `now`: signed by this key (compared in constant time) and not expired.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Press, ButtonError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(ButtonError::Invalid);
        }
        let (payload, tag) = token.split_once('.').ok_or(ButtonError::Invalid)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| ButtonError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| ButtonError::Invalid)?;
        hmac::verify(&self.key, &[DOMAIN, &payload].concat(), &tag)
            .map_err(|_| ButtonError::Invalid)?;
        // Signed by us: from here on a malformed payload is a bug, still refused cleanly.
        let payload = String::from_utf8(payload).map_err(|_| ButtonError::Invalid)?;
        let mut fields = payload.splitn(4, '\n');
        let (Some(action), Some(expires), Some(firing), Some(target)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(ButtonError::Invalid);
        };
        let action = ActionKind::from_name(action).ok_or(ButtonError::Invalid)?;
        let expires: u64 = expires.parse().map_err(|_| ButtonError::Invalid)?;
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now > expires {
            return Err(ButtonError::Expired);
        }
        let slot = (!target.is_empty()).then(|| target.to_owned());
        let (node, slot) = if self.allowlists.takes_target(action) {
            (None, slot)
        } else {
            (slot, None)
        };
        Ok(Press {
            action,
            target: slot,
            node,
            key: RunKey::button(action, Some(target), firing),
            firing: firing.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn offer(yaml: &str) -> Offer {
        let config: ButtonOffer = serde_yaml::from_str(yaml).unwrap();
        let matcher = LabelMatcher::new(&config.match_labels, &config.match_re).unwrap();
        Offer { config, matcher }
    }

    fn buttons(key: &[u8], offers: Vec<Offer>) -> Buttons {
        let allowlists = Allowlists {
            wake: BTreeSet::from(["gpu-box".to_owned()]),
            repair: BTreeSet::from(["ollama".to_owned(), "open-webui".to_owned()]),
            host: "gpu-box".into(),
            failover: BTreeSet::new(),
        };
        Buttons::with_key(
            "https://aistack.home.example/",
            key,
            Duration::from_secs(3600),
            offers,
            allowlists,
        )
    }

    fn alert(name: &str, labels: &[(&str, &str)]) -> Alert {
        let mut alert: Alert = serde_json::from_value(serde_json::json!({
            "status": "firing",
            "labels": {"alertname": name},
            "annotations": {},
            "startsAt": "2026-11-22T21:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "",
            "fingerprint": "c0ffee1234567890"
        }))
        .unwrap();
        for (k, v) in labels {
            alert.labels.insert((*k).into(), (*v).into());
        }
        alert
    }

    fn token(url: &str) -> &str {
        url.rsplit_once('/').unwrap().1
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_400_000)
    }

    #[test]
    fn matching_offers_become_signed_links_that_verify() {
        let b = buttons(
            KEY,
            vec![
                offer(
                    "{match: {alertname: AistackGpuHostWorkload}, label: Fail back now, action: failback}",
                ),
                offer(
                    "{match: {alertname: AistackGpuHostWorkload}, label: 'Wake {target}', action: wake}",
                ),
                offer("{match: {alertname: Other}, label: Never, action: failback}"),
            ],
        );
        let alert = alert("AistackGpuHostWorkload", &[("instance", "gpu-box:9470")]);
        let actions = b.for_alert(&alert, now());
        let labels: Vec<&str> = actions.iter().map(|a| a.label.as_str()).collect();
        assert_eq!(labels, ["Fail back now", "Wake gpu-box"]);
        assert!(
            actions[0]
                .url
                .starts_with("https://aistack.home.example/api/v1/buttons/")
        );
        assert_eq!((actions[0].action, actions[0].method), ("http", "POST"));

        let press = b.verify(token(&actions[1].url), now()).unwrap();
        assert_eq!(
            press,
            Press {
                action: ActionKind::Wake,
                target: Some("gpu-box".into()),
                node: None,
                key: RunKey("button:wake:gpu-box:c0ffee1234567890@2026-11-22T21:00:00Z".into()),
                firing: "c0ffee1234567890@2026-11-22T21:00:00Z".into(),
            }
        );
        // Failback takes no target: the alert's node rides in its place, for the re-check.
        let press = b.verify(token(&actions[0].url), now()).unwrap();
        assert_eq!(
            (press.action, press.target, press.node.as_deref()),
            (ActionKind::Failback, None, Some("gpu-box"))
        );
    }

    #[test]
    fn targets_outside_the_allowlist_get_no_button_and_resolutions_none() {
        let b = buttons(
            KEY,
            vec![
                offer(
                    "{match: {alertname: Unhealthy}, label: 'Repair {target}', action: repair, target_label: container}",
                ),
                offer("{match_re: {alertname: '.+'}, label: Suspend, action: suspend}"),
            ],
        );
        let ok = alert("Unhealthy", &[("container", "ollama"), ("host", "gpu-box")]);
        assert_eq!(b.for_alert(&ok, now()).len(), 2);
        let elsewhere = alert("Unhealthy", &[("container", "postgres"), ("host", "nas")]);
        assert!(b.for_alert(&elsewhere, now()).is_empty());
        let mut resolved = ok.clone();
        resolved.status = AlertStatus::Resolved;
        assert!(b.for_alert(&resolved, now()).is_empty());
    }

    #[test]
    fn at_most_three_buttons() {
        let offers = (0..5)
            .map(|i| {
                offer(&format!(
                    "{{match: {{alertname: A}}, label: B{i}, action: failback}}"
                ))
            })
            .collect();
        assert_eq!(
            buttons(KEY, offers)
                .for_alert(&alert("A", &[]), now())
                .len(),
            3
        );
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused() {
        let b = buttons(
            KEY,
            vec![offer(
                "{match: {alertname: A}, label: Wake, action: wake, target: gpu-box}",
            )],
        );
        let url = b.for_alert(&alert("A", &[]), now())[0].url.clone();
        let good = token(&url);
        assert!(b.verify(good, now() + Duration::from_secs(3600)).is_ok());
        assert_eq!(
            b.verify(good, now() + Duration::from_secs(3601)),
            Err(ButtonError::Expired)
        );

        // Another target under the same tag.
        let (payload, tag) = good.split_once('.').unwrap();
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        let forged = format!(
            "{}.{tag}",
            URL_SAFE_NO_PAD.encode(payload.replace("gpu-box", "nas"))
        );
        assert_eq!(b.verify(&forged, now()), Err(ButtonError::Invalid));
        // A later expiry under the same tag.
        let later = payload.replacen("1795403600", "1895403600", 1);
        assert_ne!(later, payload);
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(later));
        assert_eq!(b.verify(&forged, now()), Err(ButtonError::Invalid));

        let other = buttons(b"another key, also 32 characters..", Vec::new());
        assert_eq!(other.verify(good, now()), Err(ButtonError::Invalid));
        for junk in ["", ".", "abc", "a.b.c", "%%%.%%%", &"A".repeat(5000)] {
            assert_eq!(b.verify(junk, now()), Err(ButtonError::Invalid), "{junk:?}");
        }
    }

    proptest! {
        #[test]
        fn unsigned_tokens_are_refused(token in ".{0,300}") {
            let b = buttons(KEY, Vec::new());
            prop_assert_eq!(b.verify(&token, now()), Err(ButtonError::Invalid));
        }

        /// Payloads signed with the right key but not made by `sign` (as after a format
        /// change) are read back or refused, never a panic.
        #[test]
        fn signed_payloads_of_any_shape_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let b = buttons(KEY, Vec::new());
            let tag = hmac::sign(&b.key, &[DOMAIN, &payload].concat());
            let token = format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag.as_ref()));
            if let Ok(press) = b.verify(&token, now()) {
                let prefix = format!("button:{}:", press.action.name());
                prop_assert!(press.key.as_str().starts_with(&prefix), "{}", press.key);
            }
        }
    }
}
