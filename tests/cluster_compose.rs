//! The container files: docker-compose.yml must be valid and start three nodes on ports 3001 to
//! 3003 with the io_uring seccomp profile, the Dockerfile must build in two stages into a
//! non-root runtime image, and the seccomp profile must allow io_uring.
//!
//! There is no Docker engine on the test machines, so the image is never built and the cluster
//! never started here. `docker-compose config` (Debian's docker-compose 1.29) only parses and
//! normalises the file.

mod common;

use common::process;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn repository_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Returns `docker-compose config` split into its service blocks, by service name.
fn compose_services() -> Vec<(String, String)> {
    let mut command = Command::new("docker-compose");
    command
        .arg("--file")
        .arg(repository_file("docker-compose.yml"))
        .arg("config");
    let finished = process::run(command, common::EVENT_TIMEOUT);
    assert!(
        finished.status.success(),
        "docker-compose config failed (install it with `apt-get install docker-compose`):\n{}",
        finished.describe()
    );
    let mut services = Vec::new();
    let mut in_services = false;
    for line in finished.stdout.lines() {
        if !line.starts_with(' ') {
            in_services = line == "services:";
            continue;
        }
        if !in_services {
            continue;
        }
        match line.strip_prefix("  ") {
            Some(name) if !name.starts_with(' ') => {
                services.push((name.trim_end_matches(':').to_owned(), String::new()));
            }
            _ => {
                if let Some((_, block)) = services.last_mut() {
                    block.push_str(line.trim());
                    block.push('\n');
                }
            }
        }
    }
    services
}

#[test]
fn compose_file_defines_redis_and_three_nodes() {
    let services = compose_services();
    let names: Vec<&str> = services.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["node1", "node2", "node3", "redis"]);

    for (index, (name, block)) in services.iter().take(3).enumerate() {
        let port = 3001 + index;
        let expectations = [
            format!("- 0.0.0.0:{port}"),
            format!("published: {port}"),
            format!("target: {port}"),
            "NEXUS_REDIS_URL: redis://redis:6379".to_owned(),
            "seccomp:deploy/seccomp-io-uring.json".to_owned(),
            "hard: 67108864".to_owned(),
            "/health".to_owned(),
            "condition: service_healthy".to_owned(),
        ];
        for expected in expectations {
            assert!(
                block.contains(&expected),
                "{name} lacks {expected:?}:\n{block}"
            );
        }
    }
    let (_, redis) = &services[3];
    assert!(redis.contains("image: redis:7"), "{redis}");
    assert!(
        redis.contains("redis-cli"),
        "redis has no health check:\n{redis}"
    );
}

#[test]
fn dockerfile_stages_and_user() {
    let dockerfile = std::fs::read_to_string(repository_file("Dockerfile")).expect("Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert_eq!(stages[1], "FROM debian:bookworm-slim");
    let user = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("USER "));
    assert!(
        user.is_some_and(|user| user != "root" && user != "0"),
        "USER {user:?}"
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
}

#[test]
fn seccomp_profile_allows_io_uring() {
    let text = std::fs::read_to_string(repository_file("deploy/seccomp-io-uring.json"))
        .expect("deploy/seccomp-io-uring.json");
    let profile: Value = serde_json::from_str(&text).expect("the profile is JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let allowed: Vec<&str> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|rule| rule["action"] == "SCMP_ACT_ALLOW" && rule.get("includes").is_none())
        .filter(|rule| rule.get("args").is_none() && rule.get("excludes").is_none())
        .flat_map(|rule| rule["names"].as_array().expect("names").iter())
        .filter_map(Value::as_str)
        .collect();
    for syscall in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "mlock",
        "epoll_wait",
    ] {
        assert!(
            allowed.contains(&syscall),
            "{syscall} is not allowed unconditionally"
        );
    }
    assert!(
        !allowed.contains(&"mount"),
        "mount must stay behind CAP_SYS_ADMIN"
    );
}
