//! A fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (the registry, git's
//! smart HTTP). Requests pass through untouched until a fault is injected; then every request
//! whose request line contains the fault's pattern gets the fault instead of (or on top of) the
//! server's answer. Each connection carries one request (`Connection: close`).

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a matching request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This status, with a short body; the server is not asked.
    Status(u16),
    /// 429 with `Retry-After` in seconds.
    TooMany { retry_after: u64 },
    /// The server's head and half its body, then a TCP reset.
    ResetMidBody,
    /// The server's head (its `Content-Length`) and half its body, then a clean close.
    ShortBody,
    /// The server's head, then its body one byte a second until the fault is cleared.
    Drip,
    /// 307 to the same URL, every time.
    RedirectLoop,
    /// 200 with a 10 MB header line.
    HugeHeader,
    /// The server's answer with `Content-Type: text/html`.
    WrongContentType,
}

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    fault: Option<(Fault, String)>,
    /// Bumped when a fault is cleared: drips in progress stop.
    generation: u64,
    /// When each faulted request arrived.
    faulted: Vec<Instant>,
    /// Run once after relaying the next request whose line contains the pattern.
    after: Option<(String, Hook)>,
}

pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

/// Held (written) while an `after_next` hook runs: other requests wait for it.
static GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, upstream, &state);
                });
            }
        });
        FaultProxy { port, state }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// From now on, requests whose request line contains `pattern` get `fault`.
    pub fn inject(&self, fault: Fault, pattern: &str) {
        let mut state = self.state.lock().unwrap();
        state.fault = Some((fault, pattern.to_string()));
        state.faulted.clear();
    }

    /// Back to relaying; drips in progress end (their connections close).
    pub fn clear(&self) {
        let mut state = self.state.lock().unwrap();
        state.fault = None;
        state.generation += 1;
    }

    /// When each request faulted since the last `inject` arrived.
    pub fn faulted(&self) -> Vec<Instant> {
        self.state.lock().unwrap().faulted.clone()
    }

    /// Runs `hook` once, after relaying the next request whose line contains `pattern` and
    /// before answering anything else.
    pub fn after_next(&self, pattern: &str, hook: impl FnOnce() + Send + 'static) {
        self.state.lock().unwrap().after = Some((pattern.to_string(), Box::new(hook)));
    }
}

/// One connection: one request, relayed or faulted.
fn serve(client: TcpStream, upstream: u16, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let Some(RequestHead {
        bytes: head,
        line: request_line,
        length,
        chunked,
    }) = read_head(&mut reader)?
    else {
        return Ok(());
    };
    let body = if chunked {
        read_chunked(&mut reader)?
    } else {
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    };
    let (fault, generation) = {
        let mut state = state.lock().unwrap();
        let fault = match &state.fault {
            Some((fault, pattern)) if request_line.contains(pattern.as_str()) => Some(*fault),
            _ => None,
        };
        if fault.is_some() {
            state.faulted.push(Instant::now());
        }
        (fault, state.generation)
    };
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let short = |status: u16, extra: &str| {
        let body = format!("fault injected: {status}\n");
        format!(
            "HTTP/1.1 {status} Injected\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    match fault {
        Some(Fault::Status(status)) => return client.write_all(short(status, "").as_bytes()),
        Some(Fault::TooMany { retry_after }) => {
            let extra = format!("Retry-After: {retry_after}\r\n");
            return client.write_all(short(429, &extra).as_bytes());
        }
        Some(Fault::RedirectLoop) => {
            let extra = format!("Location: {path}\r\n");
            return client.write_all(short(307, &extra).as_bytes());
        }
        Some(Fault::HugeHeader) => {
            client.write_all(b"HTTP/1.1 200 OK\r\nX-Filler: ")?;
            let filler = vec![b'a'; 1 << 20];
            for _ in 0..10 {
                client.write_all(&filler)?;
            }
            return client.write_all(b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        _ => {}
    }
    // Relayed, then maybe spoiled.
    drop(GATE.read().unwrap());
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(&head)?;
    if chunked {
        write!(server, "{:x}\r\n", body.len())?;
        server.write_all(&body)?;
        server.write_all(b"\r\n0\r\n\r\n")?;
    } else {
        server.write_all(&body)?;
    }
    let mut answer = Vec::new();
    server.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |at| at + 4);
    let (answer_head, answer_body) = answer.split_at(split);
    match fault {
        Some(Fault::ResetMidBody) => {
            client.write_all(answer_head)?;
            client.write_all(&answer_body[..answer_body.len() / 2])?;
            client.flush()?;
            std::thread::sleep(Duration::from_millis(100));
            // SO_LINGER 0: the close sends a reset, not a FIN.
            socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO))?;
            drop(client);
        }
        Some(Fault::ShortBody) => {
            client.write_all(answer_head)?;
            client.write_all(&answer_body[..answer_body.len() / 2])?;
        }
        Some(Fault::Drip) => {
            client.write_all(answer_head)?;
            for byte in answer_body {
                if state.lock().unwrap().generation != generation {
                    break;
                }
                client.write_all(&[*byte])?;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Some(Fault::WrongContentType) => {
            let text = String::from_utf8_lossy(answer_head);
            let rewritten: String = text
                .split_inclusive("\r\n")
                .map(|line| {
                    if line.to_ascii_lowercase().starts_with("content-type:") {
                        "Content-Type: text/html\r\n"
                    } else {
                        line
                    }
                })
                .collect();
            client.write_all(rewritten.as_bytes())?;
            client.write_all(answer_body)?;
        }
        _ => {
            let hook = {
                let mut state = state.lock().unwrap();
                match &state.after {
                    Some((pattern, _)) if request_line.contains(pattern.as_str()) => {
                        state.after.take().map(|(_, hook)| hook)
                    }
                    _ => None,
                }
            };
            let Some(hook) = hook else {
                return client.write_all(&answer);
            };
            let _gate = GATE.write().unwrap();
            client.write_all(&answer)?;
            drop(client);
            hook();
        }
    }
    Ok(())
}

/// A request's head, rewritten to close the connection after the answer.
pub(crate) struct RequestHead {
    pub bytes: Vec<u8>,
    /// `METHOD PATH VERSION`.
    pub line: String,
    pub length: usize,
    pub chunked: bool,
}

/// Reads a request's head; None when the client closed the connection first.
pub(crate) fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<RequestHead>> {
    let mut head = RequestHead {
        bytes: Vec::new(),
        line: String::new(),
        length: 0,
        chunked: false,
    };
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if head.line.is_empty() {
            head.line = line.trim_end().to_string();
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            head.length = value.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            head.chunked = true;
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.bytes.extend_from_slice(b"Connection: close\r\n\r\n");
            return Ok(Some(head));
        }
        head.bytes.extend_from_slice(line.as_bytes());
    }
}

/// A chunked request body, de-chunked.
fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size =
            usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}
