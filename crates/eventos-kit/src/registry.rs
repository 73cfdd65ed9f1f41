//! Transports by URL scheme.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use eventos_core::Transport;
use futures::future::BoxFuture;

/// Where and how to open a transport.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// What it was named by: `log`, `log:/var/lib/eventos`, `memory`,
    /// `amqp://user:pass@host:5672/%2f`, or a path (the log's).
    pub url: &'a str,
    /// The process's data directory, for transports that keep files.
    pub data_dir: &'a Path,
    /// The engine's settings section (`[amqp]` for RabbitMQ), if it has
    /// one and the settings name it.
    pub options: Option<&'a serde_json::Value>,
}

impl Target<'_> {
    /// What follows `scheme:` (and `//`) in the URL: the log's directory,
    /// a broker's address.
    pub fn rest(&self) -> &str {
        match self.url.split_once(':') {
            Some((_, rest)) if scheme_of(self.url).is_some() => {
                rest.strip_prefix("//").unwrap_or(rest)
            }
            _ => self.url,
        }
    }
}

/// A transport, opened.
pub struct Opened {
    /// The transport.
    pub transport: Arc<dyn Transport>,
    /// Counters of the engine's own, in Prometheus text format, rendered
    /// on the system's `/metrics` (the log's syncs, for one).
    pub metrics: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("transport", &self.transport.name())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Why a transport could not be opened, in one line a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// One kind of transport, as the composition root knows it: its URL
/// schemes, its settings section, and how to open it. Each transport crate
/// implements it for itself; adding an engine to the system is one
/// [`Registry::with`].
pub trait Engine: Send + Sync + 'static {
    /// The URL schemes it answers to, without `:`: `["amqp", "amqps"]`.
    fn schemes(&self) -> &'static [&'static str];

    /// An example of what it is named by, for error messages.
    fn example(&self) -> &'static str;

    /// Whether a bare path names it (the embedded log).
    fn opens_paths(&self) -> bool {
        false
    }

    /// The name of its settings section, if it has options.
    fn section(&self) -> Option<&'static str> {
        None
    }

    /// Checks the options of its section without opening anything, so a
    /// misspelt key fails when the settings are read.
    ///
    /// # Errors
    ///
    /// A line naming the key or value at fault.
    fn check_options(&self, options: &serde_json::Value) -> Result<(), String> {
        let _ = options;
        Ok(())
    }

    /// Checks the URL's form without connecting, so a malformed one fails
    /// when it is given rather than when the transport opens.
    ///
    /// # Errors
    ///
    /// A line saying what is wrong with it and what to write.
    fn check_url(&self, url: &str) -> Result<(), String> {
        let _ = url;
        Ok(())
    }

    /// Whether every service must run in the process that opens it (the
    /// transport lives in that process).
    fn process_local(&self) -> bool;

    /// How the target is shown to people: what it is and where, no secret.
    fn describe(&self, target: &Target<'_>) -> String;

    /// Opens the transport.
    fn open<'a>(&'a self, target: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>>;
}

/// The scheme `url` names, if it has one: `amqp` in `amqp://h`, `log` in
/// `log:/d` and in `log`; `None` for a path.
fn scheme_of(url: &str) -> Option<&str> {
    let word = url.split_once(':').map_or(url, |(scheme, _)| scheme);
    let is_scheme = !word.is_empty()
        && word.starts_with(|c: char| c.is_ascii_alphabetic())
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    is_scheme.then_some(word)
}

/// The transports a program knows, looked up by URL scheme.
#[derive(Clone, Default)]
pub struct Registry {
    engines: Vec<Arc<dyn Engine>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.engines.iter().map(|e| e.schemes()))
            .finish()
    }
}

/// A transport name no engine answers to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {given:?}: use {known}")]
pub struct UnknownTransport {
    given: String,
    known: String,
}

impl Registry {
    /// No engines.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `engine`.
    #[must_use]
    pub fn with(mut self, engine: impl Engine) -> Self {
        self.engines.push(Arc::new(engine));
        self
    }

    /// The engine `url` names.
    ///
    /// # Errors
    ///
    /// [`UnknownTransport`], listing what is known with an example each.
    pub fn lookup(&self, url: &str) -> Result<&dyn Engine, UnknownTransport> {
        let found = match scheme_of(url) {
            Some(scheme) => self
                .engines
                .iter()
                .find(|e| e.schemes().iter().any(|s| s.eq_ignore_ascii_case(scheme))),
            None if !url.is_empty() => self.engines.iter().find(|e| e.opens_paths()),
            None => None,
        };
        found.map(AsRef::as_ref).ok_or_else(|| UnknownTransport {
            given: url.to_owned(),
            known: self.known(),
        })
    }

    /// Every engine's settings section name.
    pub fn sections(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.engines.iter().filter_map(|e| e.section())
    }

    /// The engine whose settings section is `name`.
    pub fn by_section(&self, name: &str) -> Option<&dyn Engine> {
        self.engines
            .iter()
            .find(|e| e.section() == Some(name))
            .map(AsRef::as_ref)
    }

    /// What is known, as a person would type it: `log (or a path),
    /// memory, amqp://… (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)`.
    pub fn known(&self) -> String {
        let mut known: Vec<String> = self
            .engines
            .iter()
            .map(|e| {
                let schemes = e.schemes().join(", ");
                let example = e.example();
                let mut shown = if example == e.schemes()[0] {
                    schemes
                } else {
                    format!("{schemes} (e.g. {example})")
                };
                if e.opens_paths() {
                    shown.push_str(" or a directory path");
                }
                shown
            })
            .collect();
        if let Some(last) = known.pop() {
            if known.is_empty() {
                return last;
            }
            return format!("{}, or {last}", known.join(", "));
        }
        "nothing: no transport is registered".into()
    }
}

/// The directory a log-like engine keeps its files in: the URL's rest
/// after `scheme:`, a bare path, or `<data-dir>/<default>` when the URL
/// names only the scheme.
pub fn directory(target: &Target<'_>, default: &str) -> PathBuf {
    let rest = target.rest();
    if rest.is_empty() || scheme_of(target.url) == Some(target.url) {
        target.data_dir.join(default)
    } else {
        PathBuf::from(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static [&'static str], &'static str, bool);

    impl Engine for Fake {
        fn schemes(&self) -> &'static [&'static str] {
            self.0
        }
        fn example(&self) -> &'static str {
            self.1
        }
        fn opens_paths(&self) -> bool {
            self.2
        }
        fn process_local(&self) -> bool {
            true
        }
        fn describe(&self, target: &Target<'_>) -> String {
            target.url.to_owned()
        }
        fn open<'a>(&'a self, _: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>> {
            Box::pin(async { Err(OpenError("not in a test".into())) })
        }
    }

    fn registry() -> Registry {
        Registry::new()
            .with(Fake(&["log"], "log", true))
            .with(Fake(&["memory"], "memory", false))
            .with(Fake(
                &["amqp", "amqps"],
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                false,
            ))
    }

    #[test]
    fn schemes_and_paths_find_their_engine_and_the_rest_is_named() {
        let r = registry();
        for (url, scheme) in [
            ("log", "log"),
            ("log:", "log"),
            ("log:/var/lib/x", "log"),
            ("/var/lib/x", "log"),
            ("./data/log", "log"),
            ("memory", "memory"),
            ("memory:", "memory"),
            ("amqp://h:5672/%2f", "amqp"),
            ("AMQPS://h", "amqp"),
        ] {
            assert_eq!(r.lookup(url).unwrap().schemes()[0], scheme, "{url}");
        }
        let Err(e) = r.lookup("foo://x") else {
            panic!("foo://x found an engine");
        };
        let e = e.to_string();
        assert_eq!(
            e,
            "unknown transport \"foo://x\": use log or a directory path, memory, or amqp, amqps (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)"
        );
        assert!(r.lookup("").is_err());
    }

    #[test]
    fn a_log_directory_comes_from_the_url_or_the_data_dir() {
        let data = Path::new("/data");
        let dir = |url| {
            directory(
                &Target {
                    url,
                    data_dir: data,
                    options: None,
                },
                "log",
            )
        };
        assert_eq!(dir("log"), PathBuf::from("/data/log"));
        assert_eq!(dir("log:"), PathBuf::from("/data/log"));
        assert_eq!(dir("log:/srv/events"), PathBuf::from("/srv/events"));
        assert_eq!(dir("log:relative/dir"), PathBuf::from("relative/dir"));
        assert_eq!(dir("/srv/events"), PathBuf::from("/srv/events"));
    }
}
