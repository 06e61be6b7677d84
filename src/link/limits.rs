//! The check of `max_message_size` against Redis' output buffer limit for pub/sub clients.
//!
//! Redis disconnects a pub/sub client whose pending output passes the hard limit at once, or
//! stays above the soft limit for the soft period (`client-output-buffer-limit pubsub 32mb 8mb
//! 60` by default). A message larger than the hard limit would cut every subscribed node off
//! each time it is published, so the link warns at its first connection when the limits are too
//! small for `max_message_size`.

use std::io;

use slog::{debug, info, warn, Logger};

use super::connection::{self, Connection};
use super::driver::Context;
use super::resp::{self, Reply};

/// Returns an upper estimate of one pub/sub push, in bytes: the client's message plus the
/// delivery envelope, WebSocket and link headers, RESP framing and the topic twice (channel name
/// and envelope).
fn largest_push(max_message_size: usize, max_topic_length: usize) -> u64 {
    (max_message_size + 2 * max_topic_length + 256) as u64
}

/// Returns the hard and soft pub/sub limits, in bytes (0: no limit), from the reply to
/// `CONFIG GET client-output-buffer-limit`.
pub fn pubsub_limits(reply: &Reply) -> Option<(u64, u64)> {
    let value = reply.as_array()?.get(1)?.as_bytes()?;
    let value = std::str::from_utf8(value).ok()?;
    let mut words = value.split_whitespace();
    words.find(|word| *word == "pubsub")?;
    let hard = words.next()?.parse().ok()?;
    let soft = words.next()?.parse().ok()?;
    Some((hard, soft))
}

/// Reads the limits over a fresh connection, before it subscribes, and logs a warning when one
/// message of `max_message_size` bytes passes them. Redis setups that disable CONFIG only get a
/// debug line. An I/O error means the connection is unusable.
pub async fn check_pubsub_limits(
    ctx: &Context,
    connection: &mut Connection,
    log: &Logger,
) -> io::Result<()> {
    let timeout = ctx.settings.timeout;
    let mut command = Vec::new();
    resp::push_command(
        &mut command,
        &["CONFIG", "GET", "client-output-buffer-limit"],
    );
    connection::write_all(&mut connection.writer, &command, timeout).await?;
    let reply = tokio::time::timeout(timeout, connection.reader.next())
        .await
        .map_err(|_| connection::timed_out("CONFIG GET"))??;
    let Some((hard, soft)) = pubsub_limits(&reply) else {
        debug!(log, "redis pub/sub buffer limits unknown"; "reply" => ?reply);
        return Ok(());
    };

    let config = &ctx.node.config;
    let largest = largest_push(config.max_message_size, config.max_topic_length);
    let fields = slog::o!("max_message_size" => config.max_message_size,
        "pubsub_hard_limit" => hard, "pubsub_soft_limit" => soft);
    if hard > 0 && largest > hard {
        warn!(
            log.new(fields),
            "max_message_size exceeds the Redis pub/sub hard output buffer limit: \
            Redis disconnects a node as soon as such a message is delivered to it"
        );
    } else if soft > 0 && largest > soft {
        warn!(
            log.new(fields),
            "max_message_size exceeds the Redis pub/sub soft output buffer limit: \
            a node that receives such messages for the soft period is disconnected"
        );
    } else {
        info!(
            log.new(fields),
            "redis pub/sub buffer limits fit max_message_size"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_reply(value: &str) -> Reply {
        Reply::Array(Some(vec![
            Reply::Bulk(Some(b"client-output-buffer-limit".to_vec())),
            Reply::Bulk(Some(value.as_bytes().to_vec())),
        ]))
    }

    #[test]
    fn pubsub_limits_parse_from_config_get() {
        let reply =
            config_reply("normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60");
        assert_eq!(pubsub_limits(&reply), Some((33_554_432, 8_388_608)));
        assert_eq!(pubsub_limits(&config_reply("normal 0 0 0")), None);
        assert_eq!(
            pubsub_limits(&Reply::Error("ERR unknown command".into())),
            None
        );
    }

    #[test]
    fn default_message_size_fits_default_limits() {
        assert!(largest_push(65_536, 255) < 8_388_608);
        assert!(largest_push(64 << 20, 255) > 33_554_432);
    }
}
