//! Public endpoints: one TCP listener per endpoint on the customer's publish address, forwarding
//! each connection to a running replica (round robin, skipping replicas that refuse). Replicas
//! publish their ports on loopback only, so during a rolling update the old and the new replica
//! both serve and the endpoint never goes dark.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

struct Route {
    backends: Arc<RwLock<Vec<SocketAddr>>>,
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
    pub async fn update(&self, wanted: BTreeMap<SocketAddr, Vec<SocketAddr>>) -> Vec<String> {
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
                Err(e) => errors.push(format!("public endpoint {listen}: {e}")),
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

async fn serve(listener: TcpListener, backends: Arc<RwLock<Vec<SocketAddr>>>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let candidates = backends.read().map(|b| b.clone()).unwrap_or_default();
        let start = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            for i in 0..candidates.len() {
                let backend = candidates[(start + i) % candidates.len()];
                let connect = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    TcpStream::connect(backend),
                );
                if let Ok(Ok(mut upstream)) = connect.await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return;
                }
            }
        });
    }
}
