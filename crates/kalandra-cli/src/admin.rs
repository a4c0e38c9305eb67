//! `kalandra admin …`: the operator's commands over the server's admin API
//! (plain HTTP/1.1 on the admin listener, bearer token).
//!
//! The token comes from `--token-file` (e.g. `kalandra-data/admin-token`)
//! or `KALANDRA_ADMIN_TOKEN`; the listener from `--url` or
//! `KALANDRA_ADMIN_URL`. Each command prints the API's JSON answer. Exit
//! codes: 0 success, 1 other failure (and a broken audit chain for `audit
//! verify`), 3 admin listener unreachable, 4 refused (400, 401, 403, 409,
//! 429), 5 not found (404).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Largest answer read from the admin API.
const RESPONSE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// `kalandra admin` arguments.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The admin listener, `http://host:port`.
    #[arg(long, env = "KALANDRA_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    url: String,
    /// File holding the operator (or read-only) token; else `KALANDRA_ADMIN_TOKEN`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// List rooms.
    Rooms {
        /// Show one room in detail instead.
        #[arg(long, value_parser = room_id)]
        room: Option<String>,
    },
    /// List a room's members with their roles.
    Members {
        /// The room (32 hex digits).
        #[arg(long, value_parser = room_id)]
        room: String,
    },
    /// Grant a role (moderator).
    Grant {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        /// The user (16 hex digits).
        #[arg(value_parser = user_id)]
        user: String,
        /// The role.
        #[arg(long, default_value = "moderator")]
        role: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke a role.
    Revoke {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        /// The user.
        #[arg(value_parser = user_id)]
        user: String,
        /// The role.
        #[arg(long, default_value = "moderator")]
        role: String,
    },
    /// Kick a member (a server Remove proposal; the room waits for a commit).
    Kick {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        /// The member.
        #[arg(value_parser = user_id)]
        user: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Ban a user (kicking them if a member).
    Ban {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        /// The user.
        #[arg(value_parser = user_id)]
        user: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
        /// Ban length in ms; without it, until lifted.
        #[arg(long)]
        duration_ms: Option<u64>,
    },
    /// Lift a ban.
    Unban {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        /// The user.
        #[arg(value_parser = user_id)]
        user: String,
    },
    /// Erase the content of a log entry (its data key is destroyed; the
    /// index stays, history carries a placeholder).
    Redact {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        /// The entry's log index.
        log_index: u64,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// A room's retention period: application frames older than it are
    /// erased by the server's retention passes.
    Retention {
        /// The room.
        #[arg(long, value_parser = room_id)]
        room: String,
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// This server's domain and federation key (what peer domains
    /// configure), and the link state of each configured peer domain.
    Federation,
    /// Write a consistent copy of the server's database, while it runs,
    /// into its configured backup directory (operator token only).
    Backup {
        /// File name in the server's backup directory (letters, digits,
        /// `.`, `_`, `-`; no path), e.g. `kalandra-20250101T0300Z.redb`.
        #[arg(value_parser = backup_name)]
        name: String,
        /// Seconds to wait for the copy to be written.
        #[arg(long, default_value_t = BACKUP_WAIT_SECS_DEFAULT)]
        wait_secs: u64,
    },
}

/// Default wait for `admin backup`: a large database takes minutes.
const BACKUP_WAIT_SECS_DEFAULT: u64 = 3_600;
/// Longest backup file name the server accepts.
const BACKUP_NAME_CHARS_MAX: usize = 128;

/// A backup file name as the server takes it: 1 to 128 characters of
/// `A-Za-z0-9._-`, the first a letter or digit (so never a path).
fn backup_name(text: &str) -> Result<String, String> {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-');
    let valid = text.len() <= BACKUP_NAME_CHARS_MAX
        && text.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && text.bytes().all(allowed);
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "a backup name is 1 to {BACKUP_NAME_CHARS_MAX} of A-Z a-z 0-9 . _ - starting with a letter or \
             digit (a file name in the server's backup directory, not a path), not {text:?}"
        ))
    }
}

#[derive(Subcommand, Debug)]
enum RetentionCommand {
    /// Show the period and the sweep position.
    Get,
    /// Set or change the period.
    Set {
        /// The period in ms.
        retention_ms: u64,
    },
    /// Remove the period: entries are kept until redacted.
    Clear,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Print the audit log with its head (JSON).
    Export,
    /// Verify the server's audit chain; exit 1 if it is broken.
    Verify,
}

/// A room id as the API takes it: 32 hex digits, sent in lower case.
fn room_id(text: &str) -> Result<String, String> {
    hex_id(text, 32, "a room id")
}

/// A user id as the API takes it: 16 hex digits, sent in lower case.
fn user_id(text: &str) -> Result<String, String> {
    hex_id(text, 16, "a user id")
}

fn hex_id(text: &str, digits: usize, what: &str) -> Result<String, String> {
    let text = text.trim();
    if text.len() == digits && text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!("{what} is {digits} hex digits, not {text:?}"))
    }
}

/// A failed admin request, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin listener could not be reached.
    #[error("cannot reach the admin API at {url}: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// The API answered with an error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The stable error code.
        code: String,
        /// The message.
        message: String,
    },
    /// The audit chain is broken.
    #[error("audit log broken: {0}")]
    AuditBroken(String),
}

impl AdminError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::Unreachable { .. } => 3,
            AdminError::Api { status: 404, .. } => 5,
            AdminError::Api { status: 400..=499, .. } => 4,
            AdminError::Api { .. } | AdminError::AuditBroken(_) => 1,
        }
    }
}

/// A client of the admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    url: String,
    authority: String,
    token: String,
    timeout: Duration,
}

impl AdminClient {
    /// A client for `url` (`http://host:port`) with `token`.
    pub fn new(url: &str, token: &str, timeout: Duration) -> anyhow::Result<AdminClient> {
        let authority = url
            .strip_prefix("http://")
            .context("the admin URL must start with http://")?
            .trim_end_matches('/')
            .to_owned();
        anyhow::ensure!(
            !authority.is_empty() && !authority.contains('/'),
            "the admin URL is http://host:port"
        );
        Ok(AdminClient { url: url.to_owned(), authority, token: token.trim().to_owned(), timeout })
    }

    /// Sends a request and returns the JSON answer, or the API's error.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let body = body.map(serde_json::Value::to_string);
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|source| AdminError::Unreachable { url: self.url.clone(), source })?;
            let mut request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {}\r\n",
                self.authority, self.token
            );
            match &body {
                Some(body) => request.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )),
                None => request.push_str("Content-Length: 0\r\n\r\n"),
            }
            stream.write_all(request.as_bytes()).await?;
            let mut raw = Vec::new();
            stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw).await?;
            Ok::<_, anyhow::Error>(raw)
        };
        let raw = tokio::time::timeout(self.timeout, exchange)
            .await
            .context("the admin API did not answer in time")??;
        let (status, body) = parse_response(&raw)?;
        let value: serde_json::Value =
            serde_json::from_slice(&body).with_context(|| format!("the answer ({status}) is not JSON"))?;
        if status != 200 {
            let text = |key: &str| value[key].as_str().unwrap_or_default().to_owned();
            return Err(AdminError::Api { status, code: text("code"), message: text("message") }.into());
        }
        Ok(value)
    }
}

/// Status and body of an HTTP/1.1 response (identity or chunked body).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|window| window == b"\r\n\r\n").context("no HTTP header end")?;
    let head = std::str::from_utf8(&raw[..split]).context("HTTP header is not UTF-8")?;
    let mut body = &raw[split + 4..];
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let end = body.windows(2).position(|w| w == b"\r\n").context("truncated chunk")?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[..end])?.trim(), 16)?;
        body = &body[end + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        anyhow::ensure!(body.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn token(args: &AdminArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.token_file {
        return std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    }
    std::env::var("KALANDRA_ADMIN_TOKEN").context("give --token-file or set KALANDRA_ADMIN_TOKEN")
}

/// Runs one `kalandra admin` command, printing the answer.
pub async fn run(args: &AdminArgs, timeout: Duration) -> anyhow::Result<()> {
    let timeout = match &args.command {
        AdminCommand::Backup { wait_secs, .. } => Duration::from_secs(*wait_secs),
        _ => timeout,
    };
    let client = AdminClient::new(&args.url, &token(args)?, timeout)?;
    let body = |value: serde_json::Value| Some(value);
    let (method, path, payload) = match &args.command {
        AdminCommand::Rooms { room: None } => ("GET", "/v1/rooms".to_owned(), None),
        AdminCommand::Rooms { room: Some(room) } => ("GET", format!("/v1/rooms/{room}"), None),
        AdminCommand::Members { room } => ("GET", format!("/v1/rooms/{room}/members"), None),
        AdminCommand::Grant { room, user, role, reason } => (
            "POST",
            format!("/v1/rooms/{room}/roles"),
            body(serde_json::json!({ "user_id": user, "role": role, "reason": reason })),
        ),
        AdminCommand::Revoke { room, user, role } => {
            ("DELETE", format!("/v1/rooms/{room}/roles/{user}/{role}"), None)
        }
        AdminCommand::Kick { room, user, reason } => (
            "POST",
            format!("/v1/rooms/{room}/kick"),
            body(serde_json::json!({ "user_id": user, "reason": reason })),
        ),
        AdminCommand::Ban { room, user, reason, duration_ms } => (
            "POST",
            format!("/v1/rooms/{room}/bans"),
            body(serde_json::json!({ "user_id": user, "reason": reason, "duration_ms": duration_ms })),
        ),
        AdminCommand::Unban { room, user } => ("DELETE", format!("/v1/rooms/{room}/bans/{user}"), None),
        AdminCommand::Redact { room, log_index, reason } => (
            "POST",
            format!("/v1/rooms/{room}/redact"),
            body(serde_json::json!({ "log_index": log_index, "reason": reason })),
        ),
        AdminCommand::Retention { room, command: RetentionCommand::Get } => {
            ("GET", format!("/v1/rooms/{room}/retention"), None)
        }
        AdminCommand::Retention { room, command: RetentionCommand::Set { retention_ms } } => (
            "PUT",
            format!("/v1/rooms/{room}/retention"),
            body(serde_json::json!({ "retention_ms": retention_ms })),
        ),
        AdminCommand::Retention { room, command: RetentionCommand::Clear } => {
            ("DELETE", format!("/v1/rooms/{room}/retention"), None)
        }
        AdminCommand::Audit { command: AuditCommand::Export } => ("GET", "/v1/audit/export".to_owned(), None),
        AdminCommand::Audit { command: AuditCommand::Verify } => ("GET", "/v1/audit/verify".to_owned(), None),
        AdminCommand::Backup { name, .. } => {
            ("POST", "/v1/backup".to_owned(), body(serde_json::json!({ "name": name })))
        }
        AdminCommand::Federation => ("GET", "/v1/federation".to_owned(), None),
    };
    let answer = client.request(method, &path, payload.as_ref()).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if matches!(args.command, AdminCommand::Audit { command: AuditCommand::Verify })
        && answer["valid"].as_bool() != Some(true)
    {
        let error = answer["error"].as_str().unwrap_or("unknown").to_owned();
        return Err(AdminError::AuditBroken(error).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_and_without_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, b"{\"a\":1}".to_vec()));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn urls_must_be_plain_http_host_and_port() {
        assert!(AdminClient::new("http://127.0.0.1:9090/", "t", Duration::from_secs(1)).is_ok());
        assert!(AdminClient::new("https://127.0.0.1:9090", "t", Duration::from_secs(1)).is_err());
        assert!(AdminClient::new("http://127.0.0.1:9090/v1", "t", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn ids_are_checked_and_sent_in_lower_case() {
        assert_eq!(user_id(" 3F2A9C0E11D4B7A2 ").unwrap(), "3f2a9c0e11d4b7a2");
        assert_eq!(room_id(&"AB".repeat(16)).unwrap(), "ab".repeat(16));
        assert!(user_id("3f2a").is_err() && user_id("3f2a9c0e11d4b7zz").is_err());
        assert!(room_id("3f2a9c0e11d4b7a2").is_err());
    }

    #[test]
    fn backup_names_are_file_names_not_paths() {
        assert_eq!(backup_name("kalandra-20250101T0300Z.redb").unwrap(), "kalandra-20250101T0300Z.redb");
        assert!(backup_name(&"a".repeat(BACKUP_NAME_CHARS_MAX)).is_ok());
        for name in ["", ".", "..", "../x", "a/b", "/tmp/x", ".hidden", "-x", "a b", &"a".repeat(129)] {
            assert!(backup_name(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn exit_codes_follow_the_cli_classes() {
        let api = |status| AdminError::Api { status, code: String::new(), message: String::new() };
        assert_eq!(api(404).exit_code(), 5);
        assert_eq!(api(401).exit_code(), 4);
        assert_eq!(api(409).exit_code(), 4);
        assert_eq!(api(503).exit_code(), 1);
        assert_eq!(AdminError::AuditBroken(String::new()).exit_code(), 1);
    }
}
