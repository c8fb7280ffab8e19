//! Logging setup: `tracing` with a reloadable filter (the admin API's
//! `/logging` changes it at run time) in text or JSON.

use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Chatty dependencies are quiet unless asked for by name.
pub const DEFAULT_FILTER: &str = "info,quinn=warn,quinn_proto=warn,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,kube=warn,rustls=warn";

/// Output format of logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}; use \"text\" or \"json\""
            )),
        }
    }
}

/// Changes the log filter at run time.
#[derive(Clone)]
pub struct LogControl {
    handle: Arc<reload::Handle<EnvFilter, Registry>>,
    current: Arc<std::sync::Mutex<String>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

impl LogControl {
    /// The filter in force, e.g. `info,quinn=warn`.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the filter (`RUST_LOG` syntax). A bad filter changes
    /// nothing and says why.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter)
            .map_err(|e| format!("invalid log filter {filter:?}: {e}; use e.g. \"info\" or \"info,isthmus_gateway=debug\""))?;
        self.handle.reload(parsed).map_err(|e| e.to_string())?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_owned();
        Ok(())
    }
}

/// Installs the global subscriber. `filter` defaults to `RUST_LOG`, then
/// [`DEFAULT_FILTER`]. Logs go to stderr. Returns `None` if a subscriber
/// was already installed (tests, or a second call).
pub fn init(filter: Option<&str>, format: LogFormat) -> Option<LogControl> {
    let text = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let env_filter = EnvFilter::try_new(&text).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (layer, handle) = reload::Layer::new(env_filter);
    let registry = tracing_subscriber::registry().with(layer);
    let installed = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    installed.ok()?;
    Some(LogControl {
        handle: Arc::new(handle),
        current: Arc::new(std::sync::Mutex::new(text)),
    })
}
