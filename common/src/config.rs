//! Loading YAML config files: every problem is reported with the YAML path it is about.
//!
//! Deserialization goes through `serde_path_to_error`, so a type error names its key
//! (`collectors.cpu.interval: invalid duration "fast"`); a file that parses is then validated
//! with [`Validate`], which reports every semantic problem rather than stopping at the first.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};

/// One thing wrong with a config file, tied to the YAML path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted YAML path (`collectors.cpu.interval`, `rules[2].action`); `.` for the document.
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Collects the problems [`Validate::validate`] finds.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Records a problem unless `ok` holds.
    pub fn check(&mut self, ok: bool, path: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.push(path, message);
        }
    }

    /// The problems found, in the order they were found.
    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }
}

/// Records a problem unless `url` is an `http://` or `https://` URL with a host.
pub fn check_http_url(problems: &mut Problems, path: impl Into<String>, url: &str) {
    let ok = url
        .parse::<axum::http::Uri>()
        .ok()
        .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    problems.check(
        ok,
        path,
        format!("invalid URL {url:?}: expected http://host[:port][/path] or https://..."),
    );
}

/// Records a problem unless `pattern` compiles (after `wrap`, e.g. anchoring), naming what is
/// wrong in one line.
pub fn check_regex(
    problems: &mut Problems,
    path: impl Into<String>,
    pattern: &str,
    wrap: impl Fn(&str) -> String,
) {
    if let Err(err) = regex::Regex::new(&wrap(pattern)) {
        problems.push(
            path,
            format!("invalid regex {pattern:?}: {}", regex_reason(&err)),
        );
    }
}

/// The last line of a regex error ("unclosed group"): the full message spans several lines,
/// and a problem is one line.
pub fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(&text);
    last.trim().trim_start_matches("error: ").to_owned()
}

/// Semantic checks a config runs after it deserialized.
pub trait Validate {
    /// Pushes every problem found; pushes nothing for a valid config.
    fn validate(&self, problems: &mut Problems);
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("invalid config file {}: {}", path.display(), join(problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// One line per problem, each naming its YAML path (what `check-config` prints).
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
        }
    }
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The file to load: the explicit `--config.file`, else `default` when it exists, else none
/// (built-in defaults).
pub fn resolve_path(explicit: Option<&Path>, default: &Path) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_owned()),
        None => default.exists().then(|| default.to_owned()),
    }
}

/// What `check-config` prints for the outcome of loading `path` (`default` names the file
/// looked for when there is none): `<path>: ok` on stdout, or every problem on stderr.
pub fn report_check<T>(
    path: Option<&Path>,
    default: &str,
    loaded: Result<T, ConfigError>,
) -> std::process::ExitCode {
    match loaded {
        Ok(_) => {
            match path {
                Some(path) => println!("{}: ok", path.display()),
                None => println!("no config file ({default} absent): built-in defaults are valid"),
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            for line in err.lines() {
                eprintln!("{line}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Loads and validates the config at `path`, or returns the defaults (validated too) for `None`.
pub fn load<T>(path: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Default + Validate,
{
    let Some(path) = path else {
        let config = T::default();
        return validated(config).map_err(|problems| ConfigError::Invalid {
            path: PathBuf::from("<built-in defaults>"),
            problems,
        });
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

/// Parses and validates config text; an empty document means "all defaults".
pub fn parse<T>(text: &str) -> Result<T, Vec<Problem>>
where
    T: DeserializeOwned + Default + Validate,
{
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let config: Option<T> = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        // serde_yaml already names the path in some messages; say it once.
        let message = err.into_inner().to_string();
        let message = match message.split_once(": ") {
            Some((named, rest)) if !named.contains(' ') && path.starts_with(named) => {
                rest.to_owned()
            }
            _ => message,
        };
        vec![Problem { path, message }]
    })?;
    validated(config.unwrap_or_default())
}

fn validated<T: Validate>(config: T) -> Result<T, Vec<Problem>> {
    let mut problems = Problems::default();
    config.validate(&mut problems);
    let problems = problems.into_vec();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// A duration written as a string with a unit: `500ms`, `15s`, `30m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer).map_err(|_| {
            D::Error::custom(r#"expected a duration string like "500ms", "15s" or "30m""#)
        })?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                D::Error::custom(format!(
                    r#"invalid duration {text:?} ({e}); write a number and a unit like "500ms", "15s" or "30m""#
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        interval: Option<HumanDuration>,
        nested: Nested,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        ratio: f64,
        items: Vec<Item>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        name: String,
    }

    impl Validate for Sample {
        fn validate(&self, problems: &mut Problems) {
            problems.check(
                (0.0..=1.0).contains(&self.nested.ratio),
                "nested.ratio",
                "must be between 0 and 1",
            );
            for (i, item) in self.nested.items.iter().enumerate() {
                problems.check(
                    !item.name.is_empty(),
                    format!("nested.items[{i}].name"),
                    "must not be empty",
                );
            }
        }
    }

    #[test]
    fn empty_and_comment_only_documents_are_defaults() {
        for text in ["", "\n", "# nothing here\n", "---\n"] {
            let cfg: Sample = parse(text).unwrap_or_else(|p| panic!("{text:?}: {p:?}"));
            assert!(cfg.interval.is_none());
        }
    }

    #[test]
    fn durations_parse_with_units() {
        let cfg: Sample = parse("interval: 500ms").unwrap();
        assert_eq!(cfg.interval, Some(HumanDuration::from_millis(500)));
        let cfg: Sample = parse("interval: 1h30m").unwrap();
        assert_eq!(cfg.interval, Some(HumanDuration::from_secs(5400)));
    }

    #[test]
    fn type_errors_name_their_path() {
        let problems = parse::<Sample>("interval: fast").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "interval");
        assert!(
            !problems[0].message.starts_with("interval:"),
            "{problems:?}"
        );
        assert!(
            problems[0].message.contains(r#"invalid duration "fast""#),
            "{problems:?}"
        );

        let problems = parse::<Sample>("interval: 15").unwrap_err();
        assert!(
            problems[0].message.contains("time unit needed"),
            "{problems:?}"
        );
        let problems = parse::<Sample>("interval: [1s]").unwrap_err();
        assert!(
            problems[0].message.contains("expected a duration string"),
            "{problems:?}"
        );

        let problems = parse::<Sample>("nested:\n  items:\n    - {nam: x}\n").unwrap_err();
        assert_eq!(problems[0].path, "nested.items[0].nam");
        assert!(
            problems[0].message.contains("unknown field `nam`"),
            "{problems:?}"
        );
    }

    #[test]
    fn validation_reports_every_problem() {
        let problems =
            parse::<Sample>("nested:\n  ratio: 2\n  items: [{name: ''}, {name: ok}, {name: ''}]")
                .unwrap_err();
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "nested.ratio: must be between 0 and 1",
                "nested.items[0].name: must not be empty",
                "nested.items[2].name: must not be empty",
            ]
        );
    }

    #[test]
    fn missing_explicit_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let err = load::<Sample>(Some(&missing)).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.lines()[0].contains("nope.yaml"));
    }

    #[test]
    fn default_path_is_used_only_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("exporter.yaml");
        assert_eq!(resolve_path(None, &default), None);
        std::fs::write(&default, "").unwrap();
        assert_eq!(resolve_path(None, &default), Some(default.clone()));
        let explicit = dir.path().join("other.yaml");
        assert_eq!(resolve_path(Some(&explicit), &default), Some(explicit));
    }
}
