//! The daemon's log lines for `/logs`: a `tracing` layer that hands each
//! event to whoever listens, and costs one atomic load when nobody does.

use std::fmt::Write;
use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Lines a slow reader may fall behind by before it misses some.
const BACKLOG: usize = 1024;

/// One log line, as `/logs` sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

/// Where log lines go: made once per process, read by the API.
#[derive(Clone)]
pub struct LogFeed {
    sender: broadcast::Sender<LogLine>,
}

impl LogFeed {
    /// The process's feed.
    pub fn global() -> &'static LogFeed {
        static FEED: OnceLock<LogFeed> = OnceLock::new();
        FEED.get_or_init(|| LogFeed {
            sender: broadcast::channel(BACKLOG).0,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.sender.subscribe()
    }

    /// The layer to install beside the daemon's own log output.
    pub fn layer(&self) -> FeedLayer {
        FeedLayer {
            sender: Arc::new(self.sender.clone()),
        }
    }

    pub fn send(&self, line: LogLine) {
        let _ = self.sender.send(line);
    }
}

pub struct FeedLayer {
    sender: Arc<broadcast::Sender<LogLine>>,
}

impl<S: Subscriber> Layer<S> for FeedLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let mut text = String::new();
        let mut visitor = Line(&mut text);
        event.record(&mut visitor);
        let _ = self.sender.send(LogLine {
            level: *event.metadata().level(),
            text: format!("{}: {text}", event.metadata().target()),
        });
    }
}

/// The message first, then `key=value` for every other field.
struct Line<'a>(&'a mut String);

impl Visit for Line<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(self.0);
            let _ = write!(self.0, "{value:?}");
            self.0.push_str(&rest);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let rest = std::mem::take(self.0);
            self.0.push_str(value);
            self.0.push_str(&rest);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// The Clash level names: `debug`, `info`, `warning`, `error`.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        _ => "debug",
    }
}

/// Whether a line passes `?level=` (`silent` passes none).
pub fn passes(line: Level, wanted: &str) -> bool {
    let least = match wanted {
        "silent" => return false,
        "error" => Level::ERROR,
        "warning" | "warn" => Level::WARN,
        "debug" | "trace" => Level::DEBUG,
        _ => Level::INFO,
    };
    // tracing orders levels by verbosity: ERROR < WARN < INFO < DEBUG.
    line <= least
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn events_reach_listeners_with_their_fields_and_levels() {
        let feed = LogFeed {
            sender: broadcast::channel(16).0,
        };
        let mut lines = feed.subscribe();
        let subscriber = tracing_subscriber::registry().with(feed.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(rule = 3, "a rule went quiet");
            tracing::debug!("detail");
        });
        let first = lines.try_recv().unwrap();
        assert_eq!(first.level, Level::WARN);
        assert!(first.text.ends_with("a rule went quiet rule=3"), "{}", first.text);
        assert_eq!(lines.try_recv().unwrap().level, Level::DEBUG);
        assert!(passes(Level::WARN, "info") && passes(Level::ERROR, "warning"));
        assert!(!passes(Level::INFO, "warning") && !passes(Level::DEBUG, "info"));
        assert!(!passes(Level::ERROR, "silent"));
        assert_eq!(level_name(Level::WARN), "warning");
    }
}
