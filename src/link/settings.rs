//! The link's settings: the Redis URL taken apart, and the intervals from the node's config.

use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};

use super::topology::Endpoint;
use crate::config::Config;

/// URL scheme that names the seed nodes of a Redis Cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Redis deployment the node connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One Redis server: classic pub/sub.
    Single(Endpoint),
    /// A Redis Cluster, found through these seed nodes: sharded pub/sub.
    Cluster(Vec<Endpoint>),
}

/// Credentials and database sent when a connection opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// ACL user name, for `AUTH user password`.
    pub username: Option<String>,
    /// Password, for `AUTH`.
    pub password: Option<String>,
    /// Database of the registry keys; pub/sub ignores databases.
    pub db: i64,
}

/// Everything the link needs from the node's configuration.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Server or cluster seeds.
    pub mode: Mode,
    /// Credentials.
    pub auth: Auth,
    /// Prefix of every channel and key the link uses.
    pub prefix: String,
    /// This node's id, for the registry key and connection names.
    pub node_id: String,
    /// Time between PINGs on each pub/sub connection.
    pub ping_interval: Duration,
    /// Time allowed to connect, and for Redis to reply to a command, before the connection counts
    /// as dead.
    pub timeout: Duration,
    /// Time between registry writes; the key expires after three of them.
    pub registry_interval: Duration,
}

impl LinkSettings {
    /// Builds the settings from a configuration with a Redis URL, or `None` without one.
    pub fn from_config(config: &Config) -> Result<Option<LinkSettings>, String> {
        let Some(url) = &config.redis_url else {
            return Ok(None);
        };
        let (mode, auth) = parse_url(url)?;
        Ok(Some(LinkSettings {
            mode,
            auth,
            prefix: config.redis_prefix.clone(),
            node_id: config.node_id.clone(),
            ping_interval: config.redis_ping_interval,
            timeout: config.redis_timeout,
            registry_interval: config.registry_interval,
        }))
    }

    /// Returns the registry key of this node.
    pub fn registry_key(&self) -> String {
        format!("{}node:{}", self.prefix, self.node_id)
    }
}

/// Parses `redis://[user:password@]host[:port][/db]` or
/// `redis+cluster://[user:password@]host:port[,host:port...]`.
pub fn parse_url(url: &str) -> Result<(Mode, Auth), String> {
    let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
        let (endpoint, auth) = parse_single(url)?;
        return Ok((Mode::Single(endpoint), auth));
    };
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    let mut seeds = Vec::new();
    let mut auth = Auth::default();
    for host in hosts.split(',') {
        let (endpoint, seed_auth) = parse_single(&format!("redis://{credentials}{host}"))?;
        seeds.push(endpoint);
        auth = seed_auth;
    }
    if auth.db != 0 {
        return Err("a Redis Cluster has only database 0".to_owned());
    }
    Ok((Mode::Cluster(seeds), auth))
}

fn parse_single(url: &str) -> Result<(Endpoint, Auth), String> {
    let info = url
        .into_connection_info()
        .map_err(|error| error.to_string())?;
    let endpoint = match info.addr {
        ConnectionAddr::Tcp(host, port) => Endpoint { host, port },
        ConnectionAddr::TcpTls { .. } => return Err("TLS (rediss://) is not supported".to_owned()),
        ConnectionAddr::Unix(_) => return Err("Unix sockets are not supported".to_owned()),
    };
    let auth = Auth {
        username: info.redis.username,
        password: info.redis.password,
        db: info.redis.db,
    };
    Ok((endpoint, auth))
}

/// Returns `url` with its credentials hidden, for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, hosts))) => format!("{scheme}://***@{hosts}"),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn single_server_url_parses() {
        let (mode, auth) = parse_url("redis://:secret@127.0.0.1:6380/2").unwrap();
        assert_eq!(mode, Mode::Single(endpoint("127.0.0.1", 6380)));
        assert_eq!(auth.password.as_deref(), Some("secret"));
        assert_eq!(auth.db, 2);
        let (mode, _) = parse_url("redis://localhost").unwrap();
        assert_eq!(mode, Mode::Single(endpoint("localhost", 6379)));
    }

    #[test]
    fn cluster_url_lists_seeds() {
        let (mode, auth) = parse_url("redis+cluster://u:p@h1:7000,h2:7001").unwrap();
        assert_eq!(
            mode,
            Mode::Cluster(vec![endpoint("h1", 7000), endpoint("h2", 7001)])
        );
        assert_eq!(auth.username.as_deref(), Some("u"));
        assert_eq!(auth.password.as_deref(), Some("p"));
    }

    #[test]
    fn unsupported_urls_are_rejected() {
        for url in [
            "rediss://h:1",
            "redis+unix:///tmp/r.sock",
            "http://h",
            "redis+cluster://h:1/3",
            "nonsense",
        ] {
            assert!(parse_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn redaction_hides_credentials() {
        assert_eq!(redact("redis://u:pw@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
