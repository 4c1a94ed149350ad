//! Layered configuration shared by every Isthmus service (broker, gateway, dns, agent).
//!
//! A component's configuration struct `T` is assembled in one fixed order, each layer
//! overriding the one before it:
//!
//! 1. `T::default()`;
//! 2. the TOML file, if any;
//! 3. the environment variables named in the component's [`EnvBinding`] table;
//! 4. command-line flags, as `(dotted.field, value)` pairs (see [`parse_set_flag`]);
//!
//! and the result is checked with [`Validate::validate`]. Start at [`load`].
//!
//! The layers are merged as TOML values *before* anything is deserialized, so one
//! `serde_path_to_error` pass reports every problem with the dotted path of the field
//! (`federation.refresh_hint`) and the layer that set it. Every struct in `T` must carry
//! `#[serde(deny_unknown_fields)]`, so a misspelt key is an error rather than a silently
//! ignored setting.
//!
//! Durations are written as short strings (`"250ms"`, `"30s"`, `"1h30m"`); see
//! [`HumanDuration`] and [`human_duration`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::{Table, Value};

/// Prefix every Isthmus environment variable carries.
pub const ENV_PREFIX: &str = "ISTHMUS_";

/// What [`redacted_json`] puts in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// Errors from loading, validating or rendering configuration.
///
/// The `Display` text of field errors starts with the field, so the binary can print
/// `invalid configuration: {error}` and get `invalid configuration: <field>: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    ReadFile {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("{}:{line}:{column}: invalid TOML: {message}", path.display())]
    Syntax {
        /// The file being parsed.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the TOML parser reported.
        message: String,
    },
    /// A field is unknown, has the wrong type or is missing.
    #[error("{field}: {message} (from {origin})")]
    Invalid {
        /// Dotted path of the field, e.g. `federation.refresh_hint` or `peers[2].name`.
        field: String,
        /// What the deserializer reported.
        message: String,
        /// The layer that set the offending value.
        origin: Origin,
    },
    /// An environment or flag value cannot be read as the type of the field it sets.
    #[error("{field}: {origin} value {value:?} is not a valid {expected}")]
    Override {
        /// Dotted path of the field.
        field: String,
        /// The environment variable or flag that carried the value.
        origin: Origin,
        /// The raw value.
        value: String,
        /// The kind of value the field takes.
        expected: &'static str,
    },
    /// An environment binding or flag names a field path that cannot exist.
    #[error("{field}: invalid field path from {origin}: {message}")]
    FieldPath {
        /// The dotted path as given.
        field: String,
        /// The environment variable or flag that named it.
        origin: Origin,
        /// What is wrong with the path.
        message: String,
    },
    /// A `--set` argument is not of the form `key=value`.
    #[error("--set expects key=value, got {value:?}")]
    SetFlag {
        /// The argument as given.
        value: String,
    },
    /// [`Validate::validate`] rejected a field.
    #[error("{field}: {message}")]
    Validation {
        /// Dotted path of the field.
        field: String,
        /// Why the value is rejected; should quote the value.
        message: String,
    },
    /// A duration string cannot be parsed.
    #[error("invalid duration {value:?}: {reason}")]
    Duration {
        /// The string as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration type cannot be represented as TOML or JSON.
    #[error("BUG: configuration cannot be serialized as {format}: {message}")]
    Serialize {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// What the serializer reported.
        message: String,
    },
    /// A component declared a malformed [`EnvBinding`].
    #[error("BUG: environment binding {name:?} for {field:?}: {message}")]
    Binding {
        /// The variable name as declared.
        name: &'static str,
        /// The field as declared.
        field: &'static str,
        /// What is wrong with the binding.
        message: &'static str,
    },
}

impl ConfigError {
    /// A validation failure for `field`; the message should quote the offending value.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The dotted path of the offending field, when the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. }
            | Self::Override { field, .. }
            | Self::FieldPath { field, .. }
            | Self::Validation { field, .. } => Some(field),
            Self::Binding { field, .. } => Some(field),
            Self::ReadFile { .. }
            | Self::Syntax { .. }
            | Self::SetFlag { .. }
            | Self::Duration { .. }
            | Self::Serialize { .. } => None,
        }
    }
}

/// The configuration layer a value came from, reported in errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `T::default()`.
    Default,
    /// The configuration file at this path.
    File(PathBuf),
    /// The named environment variable.
    Env(&'static str),
    /// A command-line flag or `--set key=value`.
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("built-in default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::Flag => f.write_str("command-line flag"),
        }
    }
}

/// Read access to environment variables, so tests can inject a map instead of `std::env`.
pub trait Environment {
    /// The value of `name`, or `None` when it is not set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        // Lossy instead of `std::env::var`: a non-UTF-8 value is then reported as invalid
        // rather than silently treated as unset.
        std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
    }
}

impl<S: BuildHasher> Environment for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Binds one environment variable to one configuration field.
///
/// Each component declares its bindings as a `const` slice, so every variable name is a
/// constant that can be found and documented in one place:
///
/// ```
/// use isthmus_core::config::EnvBinding;
///
/// pub const GATEWAY_ENV: &[EnvBinding] = &[
///     EnvBinding { name: "ISTHMUS_GATEWAY_PORT", field: "listen.port" },
///     EnvBinding { name: "ISTHMUS_GATEWAY_REFRESH_HINT", field: "federation.refresh_hint" },
/// ];
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvBinding {
    /// The variable name; starts with [`ENV_PREFIX`].
    pub name: &'static str,
    /// Dotted path of the field it sets.
    pub field: &'static str,
}

/// Checks that a loaded configuration is coherent; runs after every layer is applied.
pub trait Validate {
    /// Returns the first problem found, naming the field (see [`ConfigError::validation`]).
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Builds `T` from its default, the optional TOML `file`, the environment and `flags`, in that
/// order, then validates it.
///
/// Environment and flag values are strings read as the type of the field's default: a field
/// whose default is an integer takes `ISTHMUS_X_PORT=8443` as an integer, a boolean takes
/// `true`/`false`, an array takes `a,b,c` or TOML array syntax. Where the default has no value
/// (an `Option` that is `None`) the type is guessed from TOML syntax, falling back to a string
/// if the guess is rejected. Environment variables set to an empty string count as unset,
/// because manifests often template an unused option to `""`.
///
/// Tables from the file are merged key by key into the defaults; arrays replace the default
/// as a whole. Field paths cannot address map keys that contain dots.
pub fn load<T, E>(
    file: Option<&Path>,
    env: &E,
    bindings: &[EnvBinding],
    flags: &[(String, String)],
) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned + Validate,
    E: Environment + ?Sized,
{
    let contents = file
        .map(|path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    load_layers(file.zip(contents.as_deref()), env, bindings, flags)
}

/// [`load`] with the file's contents already read.
fn load_layers<T, E>(
    file: Option<(&Path, &str)>,
    env: &E,
    bindings: &[EnvBinding],
    flags: &[(String, String)],
) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned + Validate,
    E: Environment + ?Sized,
{
    let mut layers = Layers::from_default(&T::default())?;
    if let Some((path, contents)) = file {
        layers.merge_file(path, contents)?;
    }
    for binding in bindings {
        check_binding(binding)?;
        if let Some(value) = env.var(binding.name).filter(|v| !v.trim().is_empty()) {
            layers.set(binding.field, &value, Origin::Env(binding.name))?;
        }
    }
    for (field, value) in flags {
        layers.set(field, value, Origin::Flag)?;
    }
    let config: T = layers.deserialize()?;
    config.validate()?;
    Ok(config)
}

fn check_binding(binding: &EnvBinding) -> Result<(), ConfigError> {
    let message = if !binding.name.starts_with(ENV_PREFIX) || binding.name.len() == ENV_PREFIX.len()
    {
        "variable names must start with ISTHMUS_"
    } else if binding.field.is_empty() {
        "the field path is empty"
    } else {
        return Ok(());
    };
    Err(ConfigError::Binding {
        name: binding.name,
        field: binding.field,
        message,
    })
}

/// Splits a `--set key=value` argument into `(key, value)`; usable as a clap value parser.
pub fn parse_set_flag(arg: &str) -> Result<(String, String), ConfigError> {
    match arg.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(ConfigError::SetFlag {
            value: arg.to_owned(),
        }),
    }
}

/// Serializes `config` to JSON for logging, replacing each field in `secret_fields` (dotted
/// paths) with [`REDACTED`]. Absent and null fields are left alone.
pub fn redacted_json<T: Serialize + ?Sized>(
    config: &T,
    secret_fields: &[&str],
) -> Result<serde_json::Value, ConfigError> {
    let mut json = serde_json::to_value(config).map_err(|e| ConfigError::Serialize {
        format: "JSON",
        message: e.to_string(),
    })?;
    for field in secret_fields {
        let slot = field
            .split('.')
            .try_fold(&mut json, |value, segment| value.get_mut(segment));
        if let Some(value) = slot
            && !value.is_null()
        {
            *value = serde_json::Value::String(REDACTED.to_owned());
        }
    }
    Ok(json)
}

/// The configuration as TOML values while layers are applied.
struct Layers {
    root: Table,
    /// `T::default()`, the source of each field's type for string overrides.
    defaults: Table,
    /// The layer that last set each path, for error messages.
    origins: BTreeMap<String, Origin>,
    /// Overrides whose type was guessed, with the all-strings reading to retry if the guess is
    /// rejected (an `Option<String>` set to `"8443"` must stay a string).
    guessed: Vec<(String, Value)>,
}

impl Layers {
    fn from_default<T: Serialize>(default: &T) -> Result<Self, ConfigError> {
        let root = Table::try_from(default).map_err(|e| ConfigError::Serialize {
            format: "TOML",
            message: e.to_string(),
        })?;
        Ok(Self {
            defaults: root.clone(),
            root,
            origins: BTreeMap::new(),
            guessed: Vec::new(),
        })
    }

    fn merge_file(&mut self, path: &Path, contents: &str) -> Result<(), ConfigError> {
        let table: Table = contents.parse().map_err(|e: toml::de::Error| {
            let (line, column) = e
                .span()
                .map_or((1, 1), |span| line_column(contents, span.start));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        record_leaves(
            &table,
            "",
            &Origin::File(path.to_path_buf()),
            &mut self.origins,
        );
        deep_merge(&mut self.root, table);
        Ok(())
    }

    /// Applies one string override from the environment or a flag.
    fn set(&mut self, field: &str, raw: &str, origin: Origin) -> Result<(), ConfigError> {
        let segments: Vec<&str> = field.split('.').map(str::trim).collect();
        let path_error = |message: String| ConfigError::FieldPath {
            field: field.to_owned(),
            origin: origin.clone(),
            message,
        };
        if segments.iter().any(|segment| segment.is_empty()) {
            return Err(path_error("the path has an empty segment".to_owned()));
        }
        let path = segments.join(".");
        let (value, fallback) = match lookup(&self.defaults, &segments) {
            Some(hint) => coerce(raw, hint),
            None => Ok(guess(raw)),
        }
        .map_err(|expected| ConfigError::Override {
            field: path.clone(),
            origin: origin.clone(),
            value: raw.to_owned(),
            expected,
        })?;
        insert_at(&mut self.root, &segments, value).map_err(path_error)?;
        self.guessed.retain(|(guessed, _)| *guessed != path);
        if let Some(fallback) = fallback {
            self.guessed.push((path.clone(), fallback));
        }
        self.origins.insert(path, origin);
        Ok(())
    }

    fn deserialize<T: DeserializeOwned>(mut self) -> Result<T, ConfigError> {
        loop {
            let error = match serde_path_to_error::deserialize(Value::Table(self.root.clone())) {
                Ok(config) => return Ok(config),
                Err(error) => error,
            };
            let field = error.path().to_string();
            // Bounded: each retry consumes one guessed override.
            if self.retry_as_strings(&field) {
                continue;
            }
            return Err(ConfigError::Invalid {
                origin: self.origin_of(&field),
                field,
                message: error.into_inner().message().trim().to_owned(),
            });
        }
    }

    /// Replaces a guessed override under `field` with its string reading; false if none.
    fn retry_as_strings(&mut self, field: &str) -> bool {
        let Some(index) = self
            .guessed
            .iter()
            .position(|(guessed, _)| covers(guessed, field))
        else {
            return false;
        };
        let (guessed, fallback) = self.guessed.swap_remove(index);
        let segments: Vec<&str> = guessed.split('.').collect();
        insert_at(&mut self.root, &segments, fallback).is_ok()
    }

    /// The layer that set `field`, one of its ancestors or, failing that, a descendant (an
    /// unknown table is reported at the table, but the file set its leaves).
    fn origin_of(&self, field: &str) -> Origin {
        self.origins
            .iter()
            .filter(|(set, _)| covers(set, field))
            .max_by_key(|(set, _)| set.len())
            .or_else(|| self.origins.iter().find(|(set, _)| covers(field, set)))
            .map_or(Origin::Default, |(_, origin)| origin.clone())
    }
}

/// Whether `path` is `ancestor` or lies below it (`a.b`, `a[0]`).
fn covers(ancestor: &str, path: &str) -> bool {
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

fn record_leaves(table: &Table, prefix: &str, origin: &Origin, out: &mut BTreeMap<String, Origin>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Table(inner) if !inner.is_empty() => record_leaves(inner, &path, origin, out),
            _ => {
                out.insert(path, origin.clone());
            }
        }
    }
}

/// Merges `over` into `base`: tables key by key, everything else replaced.
fn deep_merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base)), Value::Table(over)) => deep_merge(base, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn lookup<'t>(table: &'t Table, segments: &[&str]) -> Option<&'t Value> {
    let (last, parents) = segments.split_last()?;
    let mut table = table;
    for segment in parents {
        table = table.get(*segment)?.as_table()?;
    }
    table.get(*last)
}

/// Merges `value` in at `segments`, creating missing tables on the way.
fn insert_at(root: &mut Table, segments: &[&str], value: Value) -> Result<(), String> {
    let Some((last, parents)) = segments.split_last() else {
        return Err("the path is empty".to_owned());
    };
    let mut table = root;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = table
            .entry(*segment)
            .or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(inner) => inner,
            other => {
                return Err(format!(
                    "{} is {}, not a table",
                    segments[..=depth].join("."),
                    other.type_str()
                ));
            }
        };
    }
    let mut over = Table::new();
    over.insert((*last).to_owned(), value);
    deep_merge(table, over);
    Ok(())
}

/// A TOML value literal (`8443`, `true`, `[1, 2]`, `{ a = 1 }`), if `raw` is one.
fn parse_toml(raw: &str) -> Option<Value> {
    raw.trim().parse().ok()
}

/// Reads `raw` as the type of `hint`. Returns the value, plus a string reading to retry when
/// the element type had to be guessed, or the kind of value expected.
fn coerce(raw: &str, hint: &Value) -> Result<(Value, Option<Value>), &'static str> {
    let value = match hint {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Integer(_) => match parse_toml(raw) {
            Some(value @ Value::Integer(_)) => value,
            _ => return Err("integer"),
        },
        Value::Float(_) => match parse_toml(raw) {
            Some(Value::Integer(integer)) => Value::Float(integer as f64),
            Some(value @ Value::Float(_)) => value,
            _ => return Err("number"),
        },
        Value::Boolean(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            _ => return Err("boolean (true or false)"),
        },
        Value::Datetime(_) => match parse_toml(raw) {
            Some(value @ Value::Datetime(_)) => value,
            _ => return Err("TOML date-time"),
        },
        Value::Table(_) => match parse_toml(raw) {
            Some(value @ Value::Table(_)) => value,
            _ => return Err("inline table such as { key = \"value\" }"),
        },
        Value::Array(items) => return coerce_array(raw, items.first()),
    };
    Ok((value, None))
}

fn coerce_array(
    raw: &str,
    element: Option<&Value>,
) -> Result<(Value, Option<Value>), &'static str> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        return match parse_toml(trimmed) {
            Some(value @ Value::Array(_)) => Ok((value, None)),
            _ => Err("array such as [\"a\", \"b\"] or a,b"),
        };
    }
    // Comma-separated lists are the usual shape of list-valued environment variables.
    let items = trimmed
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty());
    match element {
        Some(hint) => {
            let values = items
                .map(|item| coerce(item, hint).map(|(value, _)| value))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| list_of(hint))?;
            Ok((Value::Array(values), None))
        }
        None => {
            let items: Vec<&str> = items.collect();
            let guessed: Vec<Value> = items.iter().map(|item| guess(item).0).collect();
            let strings: Vec<Value> = items
                .iter()
                .map(|item| Value::String((*item).to_owned()))
                .collect();
            let fallback = (guessed != strings).then_some(Value::Array(strings));
            Ok((Value::Array(guessed), fallback))
        }
    }
}

/// What a list whose items are like `hint` takes, for error messages.
fn list_of(hint: &Value) -> &'static str {
    match hint {
        Value::Integer(_) => "comma-separated list of integers",
        Value::Float(_) => "comma-separated list of numbers",
        Value::Boolean(_) => "comma-separated list of booleans",
        _ => "TOML array such as [{ key = \"value\" }]",
    }
}

/// Reads `raw` for a field with no default value: TOML syntax if it parses, else a string.
/// Returns the string reading to retry when the guess is not a string.
fn guess(raw: &str) -> (Value, Option<Value>) {
    match parse_toml(raw) {
        Some(value @ Value::String(_)) => (value, None),
        Some(value) => (value, Some(Value::String(raw.to_owned()))),
        None => (Value::String(raw.to_owned()), None),
    }
}

/// Parses a duration such as `"250ms"`, `"30s"`, `"5m"`, `"1h30m"` or `"2d"`.
///
/// Units: `ns`, `us`, `ms`, `s`, `m`, `h`, `d`. A bare `0` is zero; any other number needs a
/// unit, and fractions are not accepted (write `1500ms`, not `1.5s`).
pub fn parse_duration(input: &str) -> Result<Duration, ConfigError> {
    let error = |reason: String| ConfigError::Duration {
        value: input.to_owned(),
        reason,
    };
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(error("empty string; write e.g. \"30s\"".to_owned()));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(error(format!("expected a whole number at {rest:?}")));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| error(format!("{} is too large", &rest[..digits])))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let part = match unit {
            "ns" => Some(Duration::from_nanos(number)),
            "us" => Some(Duration::from_micros(number)),
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3_600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            "" => {
                return Err(error(format!(
                    "missing unit after {number}; use ns, us, ms, s, m, h or d"
                )));
            }
            other => {
                return Err(error(format!(
                    "unknown unit {other:?}; use ns, us, ms, s, m, h or d"
                )));
            }
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| error("too large".to_owned()))?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it, largest units first (`"1m30s"`).
pub fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    let secs = duration.as_secs();
    let nanos = duration.subsec_nanos();
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    parts
        .iter()
        .filter(|(amount, _)| *amount > 0)
        .map(|(amount, unit)| format!("{amount}{unit}"))
        .collect()
}

/// A [`Duration`] written in configuration as a short string (`"30s"`, `"5m"`, `"250ms"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// A duration of `secs` seconds, usable in `const` defaults.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds, usable in `const` defaults.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// The wrapped duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(duration: Duration) -> Self {
        Self(duration)
    }
}

impl From<HumanDuration> for Duration {
    fn from(duration: HumanDuration) -> Self {
        duration.0
    }
}

impl FromStr for HumanDuration {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Self)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        human_duration::serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        human_duration::deserialize(deserializer).map(Self)
    }
}

/// `#[serde(with = "isthmus_core::config::human_duration")]` for plain [`Duration`] fields.
pub mod human_duration {
    use super::{Deserializer, Duration, Serializer, Visitor, de, fmt, format_duration};

    /// Writes the duration as a string such as `"1m30s"`.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*duration))
    }

    /// Reads a string such as `"30s"`; numbers are refused because their unit is ambiguous.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"30s\", \"5m\" or \"250ms\"")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
            super::parse_duration(value).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestConfig {
        name: String,
        listen: Listen,
        federation: Federation,
        token: Option<String>,
        upstream_port: Option<u16>,
        tags: Vec<String>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Listen {
        address: String,
        port: u16,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Federation {
        enabled: bool,
        refresh_hint: HumanDuration,
        trust_domains: Vec<String>,
        weights: Vec<u32>,
    }

    impl Default for TestConfig {
        fn default() -> Self {
            Self {
                name: "gateway".to_owned(),
                listen: Listen {
                    address: "0.0.0.0".to_owned(),
                    port: 8443,
                },
                federation: Federation {
                    enabled: false,
                    refresh_hint: HumanDuration::from_secs(300),
                    trust_domains: Vec::new(),
                    weights: vec![1],
                },
                token: None,
                upstream_port: None,
                tags: Vec::new(),
            }
        }
    }

    impl Validate for TestConfig {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.listen.port == 0 {
                return Err(ConfigError::validation(
                    "listen.port",
                    "port 0 is not allowed",
                ));
            }
            Ok(())
        }
    }

    const BINDINGS: &[EnvBinding] = &[
        EnvBinding {
            name: "ISTHMUS_TEST_PORT",
            field: "listen.port",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_ADDRESS",
            field: "listen.address",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_FEDERATION",
            field: "federation.enabled",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_REFRESH_HINT",
            field: "federation.refresh_hint",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_TRUST_DOMAINS",
            field: "federation.trust_domains",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_WEIGHTS",
            field: "federation.weights",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_TOKEN",
            field: "token",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_UPSTREAM_PORT",
            field: "upstream_port",
        },
        EnvBinding {
            name: "ISTHMUS_TEST_TAGS",
            field: "tags",
        },
    ];

    const FILE: &str = "/etc/isthmus/gateway.toml";

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn load_test(
        file: Option<&str>,
        env_pairs: &[(&str, &str)],
        flag_pairs: &[(&str, &str)],
    ) -> Result<TestConfig, ConfigError> {
        load_layers(
            file.map(|contents| (Path::new(FILE), contents)),
            &env(env_pairs),
            BINDINGS,
            &flags(flag_pairs),
        )
    }

    #[test]
    fn defaults_alone_round_trip() {
        assert_eq!(load_test(None, &[], &[]).unwrap(), TestConfig::default());
    }

    #[test]
    fn file_beats_default_and_merges_tables() {
        let config = load_test(Some("[listen]\nport = 9000\n"), &[], &[]).unwrap();
        assert_eq!(config.listen.port, 9000);
        assert_eq!(config.listen.address, "0.0.0.0", "sibling default kept");
    }

    #[test]
    fn env_beats_file_and_parses_integers() {
        let config = load_test(
            Some("[listen]\nport = 9000\n"),
            &[("ISTHMUS_TEST_PORT", "9100")],
            &[],
        )
        .unwrap();
        assert_eq!(config.listen.port, 9100);
    }

    #[test]
    fn flags_beat_env() {
        let config = load_test(
            Some("[listen]\nport = 9000\n"),
            &[("ISTHMUS_TEST_PORT", "9100")],
            &[("listen.port", "9200")],
        )
        .unwrap();
        assert_eq!(config.listen.port, 9200);
    }

    #[test]
    fn env_parses_bool_duration_and_lists() {
        let config = load_test(
            None,
            &[
                ("ISTHMUS_TEST_FEDERATION", "true"),
                ("ISTHMUS_TEST_REFRESH_HINT", "30s"),
                ("ISTHMUS_TEST_TRUST_DOMAINS", "east.example, west.example"),
                ("ISTHMUS_TEST_WEIGHTS", "[3, 4]"),
                ("ISTHMUS_TEST_ADDRESS", "127.0.0.1"),
            ],
            &[],
        )
        .unwrap();
        assert!(config.federation.enabled);
        assert_eq!(
            config.federation.refresh_hint.get(),
            Duration::from_secs(30)
        );
        assert_eq!(
            config.federation.trust_domains,
            ["east.example", "west.example"]
        );
        assert_eq!(config.federation.weights, [3, 4]);
        assert_eq!(config.listen.address, "127.0.0.1");
    }

    #[test]
    fn fields_without_default_guess_type_then_fall_back_to_string() {
        let config = load_test(
            None,
            &[
                ("ISTHMUS_TEST_UPSTREAM_PORT", "53"),
                ("ISTHMUS_TEST_TOKEN", "12345"),
                ("ISTHMUS_TEST_TAGS", "blue,42"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(config.upstream_port, Some(53));
        assert_eq!(config.token.as_deref(), Some("12345"));
        assert_eq!(config.tags, ["blue", "42"]);
    }

    #[test]
    fn empty_env_value_counts_as_unset() {
        let config = load_test(None, &[("ISTHMUS_TEST_PORT", " ")], &[]).unwrap();
        assert_eq!(config.listen.port, 8443);
    }

    #[test]
    fn unknown_file_field_names_dotted_path_and_file() {
        let err = load_test(Some("[federation]\nrefresh_hnit = \"1m\"\n"), &[], &[]).unwrap_err();
        assert_eq!(err.field(), Some("federation.refresh_hnit"));
        let ConfigError::Invalid {
            message, origin, ..
        } = &err
        else {
            panic!("unexpected error {err:?}");
        };
        assert!(message.contains("unknown field"), "{message}");
        assert_eq!(*origin, Origin::File(PathBuf::from(FILE)));
        assert!(
            err.to_string()
                .starts_with("federation.refresh_hnit: unknown field")
        );
    }

    #[test]
    fn unknown_table_reports_the_file() {
        let err = load_test(Some("[bogus]\nx = 1\n"), &[], &[]).unwrap_err();
        assert_eq!(err.field(), Some("bogus"));
        assert!(err.to_string().contains(FILE), "{err}");
    }

    #[test]
    fn unknown_flag_field_names_the_flag() {
        let err = load_test(None, &[], &[("listen.prot", "1")]).unwrap_err();
        assert_eq!(err.field(), Some("listen.prot"));
        assert!(err.to_string().contains("command-line flag"), "{err}");
    }

    #[test]
    fn wrong_type_in_file_names_field() {
        let err = load_test(Some("[listen]\nport = \"high\"\n"), &[], &[]).unwrap_err();
        assert_eq!(err.field(), Some("listen.port"));
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn bad_duration_in_file_names_field_and_value() {
        let err = load_test(Some("[federation]\nrefresh_hint = \"5x\"\n"), &[], &[]).unwrap_err();
        assert_eq!(err.field(), Some("federation.refresh_hint"));
        assert!(err.to_string().contains("\"5x\""), "{err}");
    }

    #[test]
    fn env_value_of_wrong_type_names_variable_and_value() {
        let err = load_test(None, &[("ISTHMUS_TEST_PORT", "high")], &[]).unwrap_err();
        assert_eq!(err.field(), Some("listen.port"));
        let text = err.to_string();
        assert!(text.contains("ISTHMUS_TEST_PORT"), "{text}");
        assert!(text.contains("\"high\""), "{text}");
        assert!(text.contains("integer"), "{text}");
    }

    #[test]
    fn env_bool_must_be_true_or_false() {
        let err = load_test(None, &[("ISTHMUS_TEST_FEDERATION", "yes")], &[]).unwrap_err();
        assert_eq!(err.field(), Some("federation.enabled"));
    }

    #[test]
    fn env_list_items_take_the_element_type() {
        let err = load_test(None, &[("ISTHMUS_TEST_WEIGHTS", "1,b")], &[]).unwrap_err();
        assert_eq!(err.field(), Some("federation.weights"));
        assert!(err.to_string().contains("list of integers"), "{err}");
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let err = load_test(Some("name = \"a\"\nport = = 3\n"), &[], &[]).unwrap_err();
        let ConfigError::Syntax { line, column, .. } = err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(line, 2);
        assert!(column > 1);
    }

    #[test]
    fn unreadable_file_names_path() {
        let path = Path::new("/nonexistent/isthmus/gateway.toml");
        let err = load::<TestConfig, _>(Some(path), &env(&[]), BINDINGS, &[]).unwrap_err();
        assert!(matches!(err, ConfigError::ReadFile { .. }));
        assert!(
            err.to_string()
                .contains("/nonexistent/isthmus/gateway.toml")
        );
        assert_eq!(err.field(), None);
    }

    #[test]
    fn validation_error_names_field() {
        let err = load_test(None, &[], &[("listen.port", "0")]).unwrap_err();
        assert!(matches!(err, ConfigError::Validation { .. }));
        assert_eq!(err.field(), Some("listen.port"));
        assert_eq!(err.to_string(), "listen.port: port 0 is not allowed");
    }

    #[test]
    fn flag_path_through_a_value_is_rejected() {
        let err = load_test(None, &[], &[("listen.port.inner", "1")]).unwrap_err();
        assert!(matches!(err, ConfigError::FieldPath { .. }), "{err:?}");
        let err = load_test(None, &[], &[("listen..port", "1")]).unwrap_err();
        assert!(matches!(err, ConfigError::FieldPath { .. }), "{err:?}");
    }

    #[test]
    fn binding_without_prefix_is_a_bug() {
        const BAD: &[EnvBinding] = &[EnvBinding {
            name: "GATEWAY_PORT",
            field: "listen.port",
        }];
        let err = load_layers::<TestConfig, _>(None, &env(&[]), BAD, &[]).unwrap_err();
        assert!(err.to_string().starts_with("BUG:"), "{err}");
    }

    #[test]
    fn set_flag_parsing() {
        assert_eq!(
            parse_set_flag("listen.port=9000").unwrap(),
            ("listen.port".to_owned(), "9000".to_owned())
        );
        assert_eq!(
            parse_set_flag("token=a=b").unwrap(),
            ("token".to_owned(), "a=b".to_owned())
        );
        assert!(parse_set_flag("listen.port").is_err());
        assert!(parse_set_flag("=1").is_err());
    }

    #[test]
    fn redaction_hides_secrets_only() {
        let config = TestConfig {
            token: Some("s3cret".to_owned()),
            ..TestConfig::default()
        };
        let json = redacted_json(&config, &["token", "listen.missing", "upstream_port"]).unwrap();
        assert_eq!(json["token"], REDACTED);
        assert_eq!(json["listen"]["port"], 8443);
        assert!(json["upstream_port"].is_null());
        assert!(!json.to_string().contains("s3cret"));
    }

    #[test]
    fn duration_parsing() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3_600)),
            ("1h30m", Duration::from_secs(5_400)),
            ("1m 30s", Duration::from_secs(90)),
            ("2d", Duration::from_secs(172_800)),
            ("10us", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            (" 0 ", Duration::ZERO),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_duration(input).unwrap(), expected, "{input}");
        }
        for bad in [
            "",
            "30",
            "5x",
            "1.5s",
            "s",
            "-1s",
            "18446744073709551616s",
            "999999999999999d",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn duration_formatting_round_trips() {
        for duration in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(90),
            Duration::from_secs(86_400 + 61),
            Duration::new(3, 1_002_003),
        ] {
            let text = format_duration(duration);
            assert_eq!(parse_duration(&text).unwrap(), duration, "{text}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(HumanDuration::from_millis(1_500).to_string(), "1s500ms");
    }

    #[test]
    fn duration_serde() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Timeouts {
            idle: HumanDuration,
            #[serde(with = "human_duration")]
            connect: Duration,
        }
        let parsed: Timeouts = toml::from_str("idle = \"5m\"\nconnect = \"250ms\"").unwrap();
        assert_eq!(parsed.idle.get(), Duration::from_secs(300));
        assert_eq!(parsed.connect, Duration::from_millis(250));
        let text = toml::to_string(&parsed).unwrap();
        assert!(text.contains("idle = \"5m\""), "{text}");
        let err = toml::from_str::<Timeouts>("idle = 5\nconnect = \"1s\"").unwrap_err();
        assert!(err.message().contains("duration string"), "{err}");
    }
}
