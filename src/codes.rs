//! Client-visible error codes and WebSocket close codes, in one place.
//!
//! Each code is documented with what a client should do about it; docs/protocol.md carries the
//! same table for client authors.

/// A request the node could not carry out. Sent as an error frame; the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The text is not valid JSON. The client should fix its encoder, not resend.
    InvalidJson,
    /// Not a JSON object, or a field has the wrong type. The client should fix the request.
    InvalidRequest,
    /// `action` is not a known action. The node may be older than the client.
    UnknownAction,
    /// SUBSCRIBE, UNSUBSCRIBE or PUBLISH without `topic`.
    MissingTopic,
    /// The topic or pattern breaks the topic rules.
    InvalidTopic,
    /// The topic is longer than `max_topic_length`.
    TopicTooLong,
    /// PUBLISH to a topic that contains a wildcard segment.
    WildcardPublish,
    /// PUBLISH without `data`.
    MissingData,
    /// UNSUBSCRIBE of a pattern this connection does not hold. The state is already as requested.
    NotSubscribed,
    /// SUBSCRIBE beyond `max_subscriptions` for one connection.
    TooManySubscriptions,
    /// A binary message while the binary protocol is not enabled.
    BinaryNotSupported,
    /// PUBLISH while the cluster link is down. The client should retry later or elsewhere.
    ClusterUnavailable,
}

impl ErrorCode {
    /// Returns the stable machine-readable name sent in the `code` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::MissingTopic => "missing_topic",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::TopicTooLong => "topic_too_long",
            ErrorCode::WildcardPublish => "wildcard_publish",
            ErrorCode::MissingData => "missing_data",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::ClusterUnavailable => "cluster_unavailable",
        }
    }
}

/// WebSocket close codes the node sends (RFC 6455 section 7.4, plus our own 4xxx codes).
pub mod close {
    /// The client closed normally and the node echoes the close.
    pub const NORMAL: u16 = 1000;
    /// The node is shutting down; reconnect, to another node if there is one.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol; a client library bug, so do not reconnect in a loop.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message or close reason was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message was larger than `max_message_size`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The node hit an internal error; reconnect with backoff.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The connection's outbound queue passed `max_outbound_queue`: the client reads too slowly.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// Nothing was received within `pong_timeout` after a ping.
    pub const HEARTBEAT_TIMEOUT: u16 = 4001;
}
