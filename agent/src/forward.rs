//! TCP forwarding. Public endpoints: one listener per endpoint on the customer's publish
//! address, forwarding each connection to a running replica (round robin, skipping replicas
//! that refuse). Replicas publish their ports on loopback only, so during a rolling update the
//! old and the new replica both serve and the endpoint never goes dark.
//!
//! Links across machines (VM pools) use the same listeners with [`Upstream::Peer`]: the
//! connection goes to another machine's [`LinkServer`], which checks the pool's links secret
//! and hands it to a replica running there. A peer with no such replica says so and the next
//! backend is tried.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long connecting to a backend (and a peer's answer to the greeting) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest greeting a link server reads: the secret, a resource name, a port.
const MAX_GREETING: usize = 256;
const GREETING_PREFIX: &str = "OUTPOST-LINK/1";

/// Where a forwarded connection goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// A replica's port published on this machine.
    Local(SocketAddr),
    /// Another machine's link server, greeted with a [`greeting`] for the replica wanted.
    Peer {
        address: SocketAddr,
        greeting: Arc<str>,
    },
}

/// What a connection to a peer's link server opens with: the links secret, then the resource
/// and the port wanted there.
pub fn greeting(secret: &str, resource: &str, port: u16) -> Arc<str> {
    format!("{GREETING_PREFIX} {secret} {resource} {port}\n").into()
}

struct Route {
    backends: Arc<RwLock<Vec<Upstream>>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
pub struct Forwarder {
    routes: Mutex<BTreeMap<SocketAddr, Route>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(routes) = self.routes.lock() {
            routes.values().for_each(|r| r.task.abort());
        }
    }
}

impl Forwarder {
    /// Sets the listeners and their backends; listeners no longer wanted close. Returns one
    /// message per listener that could not be opened.
    pub async fn update(&self, wanted: BTreeMap<SocketAddr, Vec<Upstream>>) -> Vec<String> {
        let mut errors = Vec::new();
        let missing: Vec<SocketAddr> = {
            let mut routes = self
                .routes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            routes.retain(|listen, route| {
                let keep = wanted.contains_key(listen);
                if !keep {
                    route.task.abort();
                }
                keep
            });
            for (listen, backends) in &wanted {
                if let Some(route) = routes.get(listen)
                    && let Ok(mut current) = route.backends.write()
                {
                    *current = backends.clone();
                }
            }
            wanted
                .keys()
                .filter(|listen| !routes.contains_key(listen))
                .copied()
                .collect()
        };
        for listen in missing {
            match TcpListener::bind(listen).await {
                Ok(listener) => {
                    let backends = Arc::new(RwLock::new(wanted[&listen].clone()));
                    let task = tokio::spawn(serve(listener, backends.clone()));
                    self.routes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(listen, Route { backends, task });
                }
                Err(e) => errors.push(format!("{listen}: {e}")),
            }
        }
        errors
    }

    pub fn listening(&self) -> Vec<SocketAddr> {
        self.routes
            .lock()
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default()
    }
}

async fn serve(listener: TcpListener, backends: Arc<RwLock<Vec<Upstream>>>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let candidates = backends.read().map(|b| b.clone()).unwrap_or_default();
        let start = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            for i in 0..candidates.len() {
                if let Some(mut upstream) =
                    connect(&candidates[(start + i) % candidates.len()]).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
            }
        });
    }
}

/// A connection to `backend` ready to carry the client's bytes, or `None` when it refuses.
async fn connect(backend: &Upstream) -> Option<TcpStream> {
    let address = match backend {
        Upstream::Local(address) | Upstream::Peer { address, .. } => *address,
    };
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .ok()?
        .ok()?;
    if let Upstream::Peer { greeting, .. } = backend {
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, async {
            stream.write_all(greeting.as_bytes()).await?;
            stream.read_u8().await
        });
        if !matches!(answer.await, Ok(Ok(b'+'))) {
            return None;
        }
    }
    Some(stream)
}

/// The machine's end of links across machines: accepts connections from peers that present
/// the links secret and hands each to a local replica of the resource and port it names.
#[derive(Default)]
pub struct LinkServer {
    secret: RwLock<String>,
    /// (resource, container port) → where its running replicas answer on this machine.
    replicas: RwLock<BTreeMap<(String, u16), Vec<SocketAddr>>>,
    next: AtomicUsize,
}

impl LinkServer {
    /// What peers must present, and the replicas they may reach.
    pub fn set(&self, secret: &str, replicas: BTreeMap<(String, u16), Vec<SocketAddr>>) {
        if let Ok(mut current) = self.secret.write() {
            secret.clone_into(&mut current);
        }
        if let Ok(mut current) = self.replicas.write() {
            *current = replicas;
        }
    }

    /// Serves peers on `listener` for ever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((peer, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(self.clone().answer(peer));
        }
    }

    async fn answer(self: Arc<Self>, mut peer: TcpStream) {
        let Ok(Some(line)) = tokio::time::timeout(CONNECT_TIMEOUT, read_line(&mut peer)).await
        else {
            return;
        };
        let candidates = self.admit(&line);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..candidates.len() {
            let backend = Upstream::Local(candidates[(start + i) % candidates.len()]);
            if let Some(mut upstream) = connect(&backend).await {
                if peer.write_u8(b'+').await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut peer, &mut upstream).await;
                }
                return;
            }
        }
        let _ = peer.write_u8(b'-').await;
    }

    /// The replicas a greeting may reach: none for a wrong secret or a port not served here.
    fn admit(&self, line: &str) -> Vec<SocketAddr> {
        let words: Vec<&str> = line.split(' ').collect();
        let [GREETING_PREFIX, secret, resource, port] = words[..] else {
            return Vec::new();
        };
        let known = self.secret.read().map(|s| s.clone()).unwrap_or_default();
        if known.is_empty()
            || !outpost_bundle_format::crypto::secrets_equal(secret.as_bytes(), known.as_bytes())
        {
            return Vec::new();
        }
        let Ok(port) = port.parse::<u16>() else {
            return Vec::new();
        };
        self.replicas
            .read()
            .ok()
            .and_then(|r| r.get(&(resource.to_string(), port)).cloned())
            .unwrap_or_default()
    }
}

/// One `\n`-terminated line of at most [`MAX_GREETING`] bytes, read a byte at a time so
/// nothing after it is consumed.
async fn read_line(stream: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.ok()?;
        if byte == b'\n' {
            return String::from_utf8(line).ok();
        }
        if line.len() == MAX_GREETING {
            return None;
        }
        line.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica: echoes what it gets, prefixed with its name.
    async fn replica(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 64];
                    let n = stream.read(&mut buffer).await.unwrap_or(0);
                    let mut answer = name.as_bytes().to_vec();
                    answer.extend_from_slice(&buffer[..n]);
                    let _ = stream.write_all(&answer).await;
                });
            }
        });
        address
    }

    /// A machine's link server offering `offered` as `db:5432`.
    async fn link_server(secret: &str, offered: Vec<SocketAddr>) -> SocketAddr {
        let server = Arc::new(LinkServer::default());
        server.set(
            secret,
            BTreeMap::from([(("db".to_string(), 5432), offered)]),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(server.serve(listener));
        address
    }

    /// Through a link listener whose upstreams are `upstreams`: what comes back for "hello".
    async fn call(upstreams: Vec<Upstream>) -> String {
        let forwarder = Forwarder::default();
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap();
        drop(probe);
        assert!(
            forwarder
                .update(BTreeMap::from([(listen, upstreams)]))
                .await
                .is_empty()
        );
        let mut stream = TcpStream::connect(listen).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut answer = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await;
        answer
    }

    fn peer(address: SocketAddr, secret: &str) -> Upstream {
        Upstream::Peer {
            address,
            greeting: greeting(secret, "db", 5432),
        }
    }

    #[tokio::test]
    async fn a_peer_hands_a_link_to_its_replica_and_refuses_a_wrong_secret() {
        let db = replica("db-0:").await;
        let empty = link_server("s3cret", vec![]).await;
        let serving = link_server("s3cret", vec![db]).await;
        // The first peer runs no replica: the next one serves.
        assert_eq!(
            call(vec![peer(empty, "s3cret"), peer(serving, "s3cret")]).await,
            "db-0:hello"
        );
        assert_eq!(call(vec![peer(serving, "wrong")]).await, "");
        // A greeting for a port the peer does not offer reaches nothing.
        let other_port = Upstream::Peer {
            address: serving,
            greeting: greeting("s3cret", "db", 22),
        };
        assert_eq!(call(vec![other_port]).await, "");
        assert_eq!(call(vec![Upstream::Local(db)]).await, "db-0:hello");
    }

    #[tokio::test]
    async fn a_greeting_without_an_end_is_cut_off() {
        let db = replica("db-0:").await;
        let serving = link_server("s3cret", vec![db]).await;
        let mut stream = TcpStream::connect(serving).await.unwrap();
        stream.write_all(&[b'x'; MAX_GREETING + 1]).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
        assert!(read.await.is_ok(), "the link server closes the connection");
        assert!(answer.is_empty(), "{answer:?}");
    }
}
