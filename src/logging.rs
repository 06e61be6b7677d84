//! Structured JSON logs on stdout: one object per line with `ts`, `level` and `msg`, plus the
//! fields of the event. Logging is asynchronous so that no core waits on stdout.

use slog::{Drain, Logger};

/// Builds the node's root logger and the guard that flushes it when dropped.
///
/// When the log channel is full, records are dropped and the count of dropped records is logged
/// once the channel has room again, so a log storm cannot stall a core.
pub fn build(level: slog::Level) -> (Logger, slog_async::AsyncGuard) {
    let json = slog_json::Json::new(std::io::stdout())
        .add_default_keys()
        .set_newlines(true)
        .build()
        .fuse();
    let (drain, guard) = slog_async::Async::new(json)
        .chan_size(16_384)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .thread_name("nexus-log".into())
        .build_with_guard();
    let drain = drain.filter_level(level).fuse();
    (Logger::root(drain, slog::o!()), guard)
}

/// Counts repeats of one kind of error so that a flood of them logs once per interval.
#[derive(Debug, Default)]
pub struct RepeatCounter {
    suppressed: u64,
    last_logged: Option<std::time::Instant>,
}

impl RepeatCounter {
    /// Returns how many events were suppressed since the last logged one when this event should
    /// be logged now, or `None` when it should only be counted.
    pub fn record(&mut self, interval: std::time::Duration) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last_logged {
            Some(last) if now.duration_since(last) < interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
