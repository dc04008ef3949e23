//! A proxy on 127.0.0.1 in front of a cloud API server (moto) that throttles one action: the
//! first `times` requests whose form body names `Action=<action>` are answered as AWS answers
//! an exceeded rate (HTTP 400, error code `Throttling`); everything else passes through.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

const THROTTLED: &str = "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>throttled-by-test</RequestId></ErrorResponse>";

pub struct Throttle {
    pub port: u16,
    answered: Arc<AtomicU32>,
}

impl Throttle {
    pub fn start(upstream: u16, action: &str, times: u32) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let left = Arc::new(AtomicU32::new(times));
        let answered = Arc::new(AtomicU32::new(0));
        let marker = format!("Action={action}&");
        let (l, a) = (left, answered.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (left, answered, marker) = (l.clone(), a.clone(), marker.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, upstream, &marker, &left, &answered);
                });
            }
        });
        Throttle { port, answered }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests were answered with throttling.
    pub fn throttled(&self) -> u32 {
        self.answered.load(Ordering::SeqCst)
    }
}

/// One client connection: requests in turn (keep-alive), each throttled or relayed.
fn serve(
    client: TcpStream,
    upstream: u16,
    marker: &str,
    left: &AtomicU32,
    answered: &AtomicU32,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    loop {
        let Some(crate::faults::RequestHead {
            bytes: head,
            length,
            ..
        }) = crate::faults::read_head(&mut reader)?
        else {
            return Ok(());
        };
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let text = String::from_utf8_lossy(&body);
        let named = text.contains(marker) || text.ends_with(marker.trim_end_matches('&'));
        let throttle = named
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if throttle {
            answered.fetch_add(1, Ordering::SeqCst);
            write!(
                client,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{THROTTLED}",
                THROTTLED.len()
            )?;
            continue;
        }
        let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
        server.write_all(&head)?;
        server.write_all(&body)?;
        let mut answer = Vec::new();
        server.read_to_end(&mut answer)?;
        // Framed by its Content-Length: the client may send its next request on this
        // connection.
        client.write_all(&answer)?;
    }
}
