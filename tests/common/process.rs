//! Child processes with deadlines: the node itself and the client scripts in tests/interop.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Spawns `command` so that the kernel kills it if the test process dies first.
///
/// NOTE: PR_SET_PDEATHSIG fires when the spawning thread exits, so a child must not outlive the
/// test thread that spawned it. Every helper here kills its child before returning or on drop.
pub fn spawn(command: &mut Command) -> Child {
    // SAFETY: the closure runs between fork and exec and calls only prctl(2), which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {command:?}: {e}"))
}

/// Exit status and output of a process that ran to its end.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Formats the status and output for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` to its end and panics if it takes longer than `timeout`.
pub fn run(mut command: Command, timeout: Duration) -> Finished {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut command);
    let stdout = read_all(child.stdout.take().expect("stdout is piped"));
    let stderr = read_all(child.stderr.take().expect("stderr is piped"));
    let status = wait_with_deadline(&mut child, timeout);
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Finished {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{command:?} still running after {timeout:?}; killed it\n--- stdout ---\n{stdout}\n\
             --- stderr ---\n{stderr}"
        ),
    }
}

/// Waits up to `timeout` for `child`; kills and reaps it and returns None if it is still running.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waitpid failed") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A running client script whose stdout is read line by line.
///
/// Dropping it sends SIGCONT (in case a test stopped it) and SIGKILL, then reaps it.
pub struct Script {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: JoinHandle<String>,
}

impl Script {
    pub fn start(mut command: Command) -> Script {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut command);
        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = read_all(child.stderr.take().expect("stderr is piped"));
        Script {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Returns the next stdout line, waiting up to `timeout`; panics with the output on timeout
    /// or when the script exits first.
    pub fn next_line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no line from the script within {timeout:?}\n{}",
                    self.finish()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the script closed stdout early\n{}", self.finish())
            }
        }
    }

    /// Sends `signal` to the script.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits up to `timeout` for the script to exit and returns its status and all its output.
    /// At the deadline it kills the script and returns None as the status.
    pub fn wait(mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let status = wait_with_deadline(&mut self.child, timeout);
        (status, self.finish())
    }

    /// Kills the script if needed and formats everything it printed.
    fn finish(&mut self) -> String {
        self.kill();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let stderr = std::mem::replace(&mut self.stderr, thread::spawn(String::new));
        let stderr = stderr.join().unwrap_or_default();
        format!(
            "--- script stdout ---\n{}\n--- script stderr ---\n{stderr}",
            self.seen.join("\n")
        )
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: as in `signal`; a stopped process must be continued to die promptly.
            unsafe { libc::kill(self.pid(), libc::SIGCONT) };
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        self.kill();
    }
}
