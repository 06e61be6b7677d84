//! Opening a Redis connection (TCP, AUTH, SELECT, CLIENT SETNAME) and the reconnect backoff.

use std::io;
use std::time::Duration;

use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::resp::{self, Reply, RespReader};
use super::settings::Auth;
use super::topology::Endpoint;

/// First reconnect delay, before jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// Maximum reconnect delay, before jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The reading side of a connection.
pub type Reader = RespReader<OwnedReadHalf>;

/// An open, authenticated Redis connection.
pub struct Connection {
    /// Replies and pushes from Redis.
    pub reader: Reader,
    /// Commands to Redis.
    pub writer: OwnedWriteHalf,
}

/// Connects to `endpoint` and prepares the connection: AUTH when `auth` has a password, SELECT
/// when it names a database other than 0, and CLIENT SETNAME `name` so that `CLIENT LIST` shows
/// which node and role the connection serves. Each step must finish within `timeout`.
pub async fn open(
    endpoint: &Endpoint,
    auth: &Auth,
    name: &str,
    timeout: Duration,
) -> io::Result<Connection> {
    let address = (endpoint.host.as_str(), endpoint.port);
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| timed_out("connect"))??;
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut connection = Connection {
        reader: RespReader::new(read),
        writer: write,
    };

    let mut setup: Vec<Vec<&[u8]>> = Vec::new();
    let db = auth.db.to_string();
    if let Some(password) = &auth.password {
        match &auth.username {
            Some(user) => setup.push(vec![b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => setup.push(vec![b"AUTH", password.as_bytes()]),
        }
    }
    if auth.db != 0 {
        setup.push(vec![b"SELECT", db.as_bytes()]);
    }
    setup.push(vec![b"CLIENT", b"SETNAME", name.as_bytes()]);

    let mut out = Vec::new();
    for command in &setup {
        resp::push_command(&mut out, command);
    }
    write_all(&mut connection.writer, &out, timeout).await?;
    for command in &setup {
        let reply = tokio::time::timeout(timeout, connection.reader.next())
            .await
            .map_err(|_| timed_out("connection setup"))??;
        if let Reply::Error(error) = reply {
            let verb = String::from_utf8_lossy(command[0]);
            return Err(io::Error::other(format!("{verb} failed: {error}")));
        }
    }
    Ok(connection)
}

/// Writes `bytes`, failing when Redis does not take them within `timeout`.
pub async fn write_all(
    writer: &mut OwnedWriteHalf,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    tokio::time::timeout(timeout, writer.write_all(bytes))
        .await
        .map_err(|_| timed_out("write"))?
}

/// Builds the error for a step that did not finish in time.
pub fn timed_out(step: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("Redis {step} timed out"))
}

/// Exponential reconnect delays with jitter, so that nodes that lost Redis together do not all
/// reconnect in the same instant.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Returns the delay before the next attempt: 100 ms doubled per failure in a row, at most
    /// 5 s, of which a random half is taken off.
    pub fn next_delay(&mut self) -> Duration {
        let doubled = BACKOFF_BASE.saturating_mul(1 << self.failures.min(16));
        let ceiling = doubled.min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        let jitter = rand::thread_rng().gen_range(0.0..=0.5);
        ceiling.mul_f64(1.0 - jitter)
    }

    /// Starts over after a connection proved healthy.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(
            first >= BACKOFF_BASE / 2 && first <= BACKOFF_BASE,
            "{first:?}"
        );
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= BACKOFF_MAX, "{delay:?}");
        }
        let late = backoff.next_delay();
        assert!(late >= BACKOFF_MAX / 2, "{late:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_BASE);
    }
}
