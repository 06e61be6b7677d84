//! The `GET /health` report, served by whichever core accepted the request.

use std::sync::atomic::Ordering;

use crate::core::Core;
use crate::link::LinkHealth;

/// Returns the JSON body of the health report.
///
/// `status` is `ok`, `degraded` when a configured cluster link is down (the node still serves
/// its local clients), or `stopping` during shutdown.
pub fn report(core: &Core) -> String {
    let node = &core.node;
    let (link, reason) = match node.link.health() {
        LinkHealth::Standalone => ("standalone", None),
        LinkHealth::Up => ("up", None),
        LinkHealth::Down(reason) => ("down", Some(reason)),
    };
    let status = if node.shutting_down.load(Ordering::Relaxed) {
        "stopping"
    } else if reason.is_some() {
        "degraded"
    } else {
        "ok"
    };
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(format!(r#"{{"status":"{status}","node_id":"#).as_bytes());
    crate::protocol::push_json_string(&mut body, &node.config.node_id);
    let connections = node.connections.load(Ordering::Relaxed);
    let uptime = node.started.elapsed().as_secs();
    let cores = node.cores.len();
    body.extend_from_slice(
        format!(r#","connections":{connections},"cores":{cores},"uptime_seconds":{uptime},"link":"{link}""#).as_bytes(),
    );
    if let Some(reason) = reason {
        body.extend_from_slice(br#","reason":"#);
        crate::protocol::push_json_string(&mut body, &reason);
    }
    body.push(b'}');
    String::from_utf8(body).unwrap_or_default()
}
