//! The subcommands: `serve` (the default), `migrate`, `purge --before DATE`,
//! `user add|list|disable|enable|passwd`, `token --sub NAME`, `healthcheck`. Arguments are parsed by hand; a bad one is exit code 2 with the usage.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::app::Stores;
use crate::auth::Tokens;
use crate::retention::parse_cutoff;
use crate::settings::{AuthSettings, DbSettings, DEFAULT_LISTEN_ADDR};

pub const USAGE: &str = "\
usage: ivr-server [COMMAND]

commands:
  serve                   run the API (the default); settings come from environment variables
  migrate                 create or update the database schema (calls and users) and exit
  purge --before DATE     delete the calls that ended before DATE, with their history, and print
                          how many (DATE: RFC 3339, 2026-01-31 or 2026-01-31T12:00:00Z); calls not
                          ended are never deleted. CALL_RETENTION_DAYS does this every hour
  user add NAME           add a user; the password is prompted for, or read as one line from stdin
  user list               list users
  user disable NAME       refuse NAME's password and tokens from now on
  user enable NAME        undo `user disable`
  user passwd NAME        set NAME's password (prompted for, or one line from stdin)
  token --sub NAME        print an access token for NAME, signed with SECRET_KEY (no database needed;
                          a server with a database accepts it only if NAME is an enabled user)
  healthcheck             exit 0 if the server at LISTEN_ADDR answers GET /healthz with 200 (for a
                          container's HEALTHCHECK; needs no other setting)
  help                    this text

See the settings table in the README (DATABASE_URL, SECRET_KEY, ARI_*, ...).";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Serve,
    Migrate,
    Purge { before: time::OffsetDateTime },
    UserAdd(String),
    UserList,
    UserDisable(String),
    UserEnable(String),
    UserPasswd(String),
    Token { sub: String },
    Healthcheck,
    Help,
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let args: Vec<String> = args.into_iter().collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] | ["serve"] => Ok(Command::Serve),
        ["migrate"] => Ok(Command::Migrate),
        ["purge", "--before", date] => Ok(Command::Purge { before: parse_cutoff(date)? }),
        ["purge", arg] if arg.starts_with("--before=") => Ok(Command::Purge { before: parse_cutoff(&arg[9..])? }),
        ["purge", ..] => Err("`purge` takes: --before DATE (e.g. 2026-01-31 or 2026-01-31T12:00:00Z)".into()),
        ["healthcheck"] => Ok(Command::Healthcheck),
        ["help" | "--help" | "-h"] => Ok(Command::Help),
        ["user", "add", name] => Ok(Command::UserAdd((*name).into())),
        ["user", "list"] => Ok(Command::UserList),
        ["user", "disable", name] => Ok(Command::UserDisable((*name).into())),
        ["user", "enable", name] => Ok(Command::UserEnable((*name).into())),
        ["user", "passwd", name] => Ok(Command::UserPasswd((*name).into())),
        ["user", ..] => Err("`user` takes: add NAME | list | disable NAME | enable NAME | passwd NAME".into()),
        ["token", "--sub", sub] if !sub.is_empty() => Ok(Command::Token { sub: (*sub).into() }),
        ["token", arg] if arg.starts_with("--sub=") && arg.len() > 6 => Ok(Command::Token { sub: arg[6..].into() }),
        ["token", ..] => Err("`token` takes: --sub NAME".into()),
        [other, ..] => Err(format!("unknown command {other:?}")),
    }
}

/// Runs every command but `serve` and `help`. The error is one line for the user.
pub async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve | Command::Help => Err("not a maintenance command".into()),
        Command::Token { sub } => {
            let auth = AuthSettings::from_env().map_err(|e| e.to_string())?;
            let token = Tokens::new(&auth).issue(&sub).map_err(|e| format!("cannot sign: {e}"))?;
            println!("{}", token.access_token);
            eprintln!("(valid for {} s; send it as `Authorization: Bearer <token>`)", token.expires_in);
            Ok(())
        }
        Command::Healthcheck => {
            let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| DEFAULT_LISTEN_ADDR.into());
            let addr: SocketAddr =
                listen.parse().map_err(|_| "setting LISTEN_ADDR: must be an IP address and port".to_string())?;
            healthcheck(addr, Duration::from_secs(2))
        }
        Command::Migrate => {
            let stores = open().await?;
            stores.close().await;
            eprintln!("the database schema is up to date");
            Ok(())
        }
        Command::Purge { before } => {
            let stores = open().await?;
            let purged = stores.calls.purge_ended(before).await;
            stores.close().await;
            let purged = purged.map_err(|e| format!("purge failed: {e}"))?;
            println!("{purged}");
            let before = before.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            eprintln!("{purged} call(s) that ended before {before} deleted, with their history");
            Ok(())
        }
        command => {
            let stores = open().await?;
            let users = stores.users.as_ref().ok_or("no users with DISABLE_DB=true")?;
            let result = match command {
                Command::UserAdd(name) => {
                    let password = read_password(&format!("password for {name}: "))?;
                    users.add(&name, &password).await.map(|()| format!("user {name} added"))
                }
                Command::UserList => users.list().await.map(|list| {
                    for user in &list {
                        let state = if user.disabled { "disabled" } else { "enabled" };
                        println!("{}\t{state}\t{}", user.username, user.created_at);
                    }
                    format!("{} user(s)", list.len())
                }),
                Command::UserDisable(name) => {
                    users.set_disabled(&name, true).await.map(|()| format!("user {name} disabled"))
                }
                Command::UserEnable(name) => {
                    users.set_disabled(&name, false).await.map(|()| format!("user {name} enabled"))
                }
                Command::UserPasswd(name) => {
                    let password = read_password(&format!("new password for {name}: "))?;
                    users.set_password(&name, &password).await.map(|()| format!("password of {name} changed"))
                }
                _ => unreachable!("handled above"),
            };
            stores.close().await;
            let message = result.map_err(|e| e.to_string())?;
            eprintln!("{message}");
            Ok(())
        }
    }
}

/// `GET /healthz` on the server listening at `addr` (an unspecified address such as `0.0.0.0` is
/// reached over loopback), within `limit` for each of connect, write and read.
fn healthcheck(mut addr: SocketAddr, limit: Duration) -> Result<(), String> {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let failed = |e: std::io::Error| format!("{addr}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, limit).map_err(failed)?;
    stream.set_read_timeout(Some(limit)).map_err(failed)?;
    stream.set_write_timeout(Some(limit)).map_err(failed)?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(failed)?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(failed)?;
    match &head {
        b"HTTP/1.1 200" | b"HTTP/1.0 200" => Ok(()),
        _ => Err(format!("{addr}: /healthz answered {:?}", String::from_utf8_lossy(&head))),
    }
}

async fn open() -> Result<Stores, String> {
    let db = DbSettings::from_env().map_err(|e| e.to_string())?;
    if db.database_url.is_none() {
        return Err("DISABLE_DB=true: there is no database to work on".into());
    }
    Stores::open(&db).await.map_err(|e| e.to_string())
}

/// A password: prompted for twice without echo on a terminal, else one line of stdin.
fn read_password(prompt: &str) -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let first = prompt_hidden(prompt)?;
    let second = prompt_hidden("again: ")?;
    if first != second {
        return Err("the two passwords differ".into());
    }
    Ok(first)
}

fn prompt_hidden(prompt: &str) -> Result<String, String> {
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{prompt}");
    let _ = stderr.flush();
    let _echo = EchoOff::new();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read the password: {e}"))?;
    let _ = writeln!(stderr);
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Terminal echo off while it lives (Unix; elsewhere a no-op).
struct EchoOff {
    #[cfg(unix)]
    saved: Option<libc::termios>,
}

impl EchoOff {
    #[cfg(unix)]
    fn new() -> Self {
        // SAFETY: tcgetattr/tcsetattr on stdin's descriptor with a zeroed, then filled, termios.
        unsafe {
            let mut term: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut term) != 0 {
                return EchoOff { saved: None };
            }
            let saved = term;
            term.c_lflag &= !libc::ECHO;
            term.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &term) != 0 {
                return EchoOff { saved: None };
            }
            EchoOff { saved: Some(saved) }
        }
    }

    #[cfg(not(unix))]
    fn new() -> Self {
        EchoOff {}
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(saved) = &self.saved {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn commands() {
        assert_eq!(p(&[]), Ok(Command::Serve));
        assert_eq!(p(&["serve"]), Ok(Command::Serve));
        assert_eq!(p(&["migrate"]), Ok(Command::Migrate));
        assert_eq!(p(&["user", "add", "alice"]), Ok(Command::UserAdd("alice".into())));
        assert_eq!(p(&["user", "list"]), Ok(Command::UserList));
        assert_eq!(p(&["user", "disable", "bob"]), Ok(Command::UserDisable("bob".into())));
        assert_eq!(p(&["user", "passwd", "bob"]), Ok(Command::UserPasswd("bob".into())));
        assert_eq!(p(&["token", "--sub", "dev"]), Ok(Command::Token { sub: "dev".into() }));
        assert_eq!(p(&["token", "--sub=dev"]), Ok(Command::Token { sub: "dev".into() }));
        assert_eq!(p(&["healthcheck"]), Ok(Command::Healthcheck));
        let midnight = time::Date::from_calendar_date(2026, time::Month::January, 31).unwrap().midnight().assume_utc();
        assert_eq!(p(&["purge", "--before", "2026-01-31"]), Ok(Command::Purge { before: midnight }));
        assert_eq!(p(&["purge", "--before=2026-01-31T01:00:00+01:00"]), Ok(Command::Purge { before: midnight }));
        let e = p(&["purge", "--before", "last week"]).unwrap_err();
        assert!(e.contains("\"last week\" is not a date") && e.contains("RFC 3339"), "{e}");
        for bad in [&["purge"][..], &["purge", "--before"], &["purge", "2026-01-31"]] {
            assert!(p(bad).unwrap_err().contains("--before DATE"), "{bad:?}");
        }
        for bad in [&["token"][..], &["token", "--sub"], &["user"], &["user", "add"], &["frobnicate"], &["serve", "x"]]
        {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    /// A server that answers `status_line` to one request.
    fn answering(status_line: &'static str) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 256];
            let _ = conn.read(&mut request);
            let _ = conn.write_all(format!("{status_line}\r\ncontent-length: 0\r\n\r\n").as_bytes());
        });
        addr
    }

    #[test]
    fn healthcheck_wants_a_200_from_healthz() {
        let limit = Duration::from_secs(5);
        assert_eq!(healthcheck(answering("HTTP/1.1 200 OK"), limit), Ok(()));
        let err = healthcheck(answering("HTTP/1.1 503 Service Unavailable"), limit).unwrap_err();
        assert!(err.contains("503"), "{err}");
        // Nothing listens on a port just released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(healthcheck(closed, limit).is_err());
        // 0.0.0.0 is reached over loopback.
        let mut any = answering("HTTP/1.1 200 OK");
        any.set_ip([0, 0, 0, 0].into());
        assert_eq!(healthcheck(any, limit), Ok(()));
    }
}
