//! Tracing and metrics set-up shared by every service.
//!
//! - [`init_tracing`] installs the global subscriber: `RUST_LOG` filtering, stderr output, plain
//!   or JSON lines as chosen by `ISTHMUS_LOG_FORMAT` ([`LogFormat::from_env`]).
//! - [`MetricsRegistry`] is the one Prometheus registry of a process, prefixed `isthmus`;
//!   each component registers its own `Metrics` struct under
//!   [`MetricsRegistry::sub_registry`] and the admin server serves
//!   [`MetricsRegistry::encode_text`].

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::Environment;

/// Environment variable choosing the log format: `plain` (default) or `json`.
pub const LOG_FORMAT_ENV: &str = "ISTHMUS_LOG_FORMAT";

/// Environment variable holding the tracing filter directives.
pub const LOG_FILTER_ENV: &str = "RUST_LOG";

/// Prefix of every metric name.
pub const METRICS_PREFIX: &str = "isthmus";

/// Errors from telemetry set-up and encoding.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `ISTHMUS_LOG_FORMAT` (or a config field) holds an unknown format.
    #[error("invalid log format {value:?}: expected \"plain\" or \"json\"")]
    LogFormat {
        /// The value as given.
        value: String,
    },
    /// The tracing filter (from `RUST_LOG` or the default) does not parse.
    #[error("invalid log filter {value:?}: {source}")]
    Filter {
        /// The directives as given.
        value: String,
        /// What the parser reported.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is already installed; the existing one is kept.
    #[error(
        "tracing is already initialized; keeping the existing subscriber ({format} not applied)"
    )]
    AlreadyInitialized {
        /// The format this call asked for.
        format: LogFormat,
    },
    /// Metrics could not be encoded.
    #[error("cannot encode metrics: {0}")]
    Encode(#[from] fmt::Error),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured when stderr is a terminal).
    #[default]
    Plain,
    /// One JSON object per line, event fields at the top level.
    Json,
}

impl LogFormat {
    /// Reads [`LOG_FORMAT_ENV`]; unset or empty means [`LogFormat::Plain`].
    pub fn from_env<E: Environment + ?Sized>(env: &E) -> Result<Self, TelemetryError> {
        match env.var(LOG_FORMAT_ENV) {
            Some(value) if !value.trim().is_empty() => value.parse(),
            _ => Ok(Self::default()),
        }
    }
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "plain" => Ok(Self::Plain),
            "json" => Ok(Self::Json),
            _ => Err(TelemetryError::LogFormat {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Json => "json",
        })
    }
}

/// Installs the global tracing subscriber writing to stderr.
///
/// Filter directives come from `RUST_LOG`, or `default_directives` (e.g. `"info"`) when it is
/// unset or empty; invalid directives are an error rather than silently dropped. A second call
/// returns [`TelemetryError::AlreadyInitialized`] and changes nothing.
pub fn init_tracing(format: LogFormat, default_directives: &str) -> Result<(), TelemetryError> {
    let filter = log_filter(&crate::config::ProcessEnv, default_directives)?;
    let ansi = std::io::stderr().is_terminal();
    subscriber(format, filter, std::io::stderr, ansi)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialized { format })
}

fn log_filter<E: Environment + ?Sized>(
    env: &E,
    default_directives: &str,
) -> Result<EnvFilter, TelemetryError> {
    let directives = env
        .var(LOG_FILTER_ENV)
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| default_directives.to_owned());
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| TelemetryError::Filter {
            value: directives,
            source,
        })
}

fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let output = match format {
        LogFormat::Plain => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    };
    tracing_subscriber::registry().with(filter).with(output)
}

/// The process's Prometheus registry; every metric is named `isthmus_…`.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: Registry,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRegistry {
    /// An empty registry with the `isthmus` prefix.
    pub fn new() -> Self {
        Self {
            registry: Registry::with_prefix(METRICS_PREFIX),
        }
    }

    /// The registry for one component: its metrics are named `isthmus_<component>_…`.
    pub fn sub_registry(&mut self, component: &str) -> &mut Registry {
        self.registry.sub_registry_with_prefix(component)
    }

    /// The top-level registry, for process-wide metrics named `isthmus_…`.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every registered metric in OpenMetrics text format, ending with `# EOF`.
    pub fn encode_text(&self) -> Result<String, TelemetryError> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io;
    use std::sync::{Arc, Mutex};

    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn log_format_parsing() {
        assert_eq!("plain".parse::<LogFormat>().unwrap(), LogFormat::Plain);
        assert_eq!(" JSON ".parse::<LogFormat>().unwrap(), LogFormat::Json);
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.to_string().contains("\"yaml\""), "{err}");

        assert_eq!(LogFormat::from_env(&env(&[])).unwrap(), LogFormat::Plain);
        assert_eq!(
            LogFormat::from_env(&env(&[(LOG_FORMAT_ENV, "")])).unwrap(),
            LogFormat::Plain
        );
        assert_eq!(
            LogFormat::from_env(&env(&[(LOG_FORMAT_ENV, "json")])).unwrap(),
            LogFormat::Json
        );
        let err = LogFormat::from_env(&env(&[(LOG_FORMAT_ENV, "xml")])).unwrap_err();
        assert!(matches!(err, TelemetryError::LogFormat { ref value } if value == "xml"));
    }

    #[test]
    fn log_filter_prefers_rust_log_and_names_bad_directives() {
        assert_eq!(log_filter(&env(&[]), "info").unwrap().to_string(), "info");
        let filter = log_filter(&env(&[(LOG_FILTER_ENV, "isthmus=debug")]), "info").unwrap();
        assert_eq!(filter.to_string(), "isthmus=debug");
        let err = log_filter(&env(&[(LOG_FILTER_ENV, "isthmus=loud")]), "info").unwrap_err();
        assert!(err.to_string().contains("\"isthmus=loud\""), "{err}");
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Self;

        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn json_format_writes_fields_at_top_level() {
        let out = Captured::default();
        let filter = EnvFilter::builder().parse("info").unwrap();
        let subscriber = subscriber(LogFormat::Json, filter, out.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("filtered out");
            tracing::warn!(trust_domain = "east.example", "bundle refresh failed");
        });
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "bundle refresh failed");
        assert_eq!(line["trust_domain"], "east.example");
    }

    #[test]
    fn plain_format_writes_fields() {
        let out = Captured::default();
        let filter = EnvFilter::builder().parse("info").unwrap();
        let subscriber = subscriber(LogFormat::Plain, filter, out.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(port = 8443, "listening");
        });
        let text = out.text();
        assert!(
            text.contains("listening") && text.contains("port=8443"),
            "{text}"
        );
    }

    /// Installing a global subscriber would leak into every other test of this binary, so
    /// the second-call check runs in a child process of the same test binary.
    #[test]
    fn init_tracing_twice_is_a_typed_error() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "telemetry::tests::init_tracing_twice_child"])
            .args(["--ignored", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env(LOG_FILTER_ENV, "off")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{stdout}");
        assert!(stdout.contains("1 passed"), "{stdout}");
    }

    const CHILD_ENV: &str = "ISTHMUS_TELEMETRY_TEST_CHILD";

    #[test]
    #[ignore = "run in a child process by init_tracing_twice_is_a_typed_error"]
    fn init_tracing_twice_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            // Run directly (`--ignored`): installing the subscriber here would leak into the
            // other tests of this process.
            return;
        }
        init_tracing(LogFormat::Plain, "off").unwrap();
        let err = init_tracing(LogFormat::Json, "off").unwrap_err();
        assert!(matches!(
            err,
            TelemetryError::AlreadyInitialized {
                format: LogFormat::Json
            }
        ));
    }

    #[test]
    fn counter_is_encoded_with_prefix() {
        let mut metrics = MetricsRegistry::new();
        let restarts = Counter::<u64>::default();
        metrics
            .registry_mut()
            .register("restarts", "Process restarts", restarts.clone());
        let connections = Counter::<u64>::default();
        metrics.sub_registry("gateway").register(
            "connections",
            "Tunnel connections accepted",
            connections.clone(),
        );
        restarts.inc();
        connections.inc_by(3);

        let text = metrics.encode_text().unwrap();
        assert!(text.contains("\nisthmus_restarts_total 1\n"), "{text}");
        assert!(
            text.contains("\nisthmus_gateway_connections_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP isthmus_restarts Process restarts."),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
