//! Links across machines. On one host, a resource reaches the resources it links by name on the
//! stack's network. In a pool, the linked resource may run on another machine, so on a node
//! each link name resolves (`/etc/hosts`) to the machine's own address on the stack's network,
//! where a listener per port of the linked resource forwards to this machine's replicas of it,
//! or, when it runs none, to the link servers of the machines that do
//! ([`crate::forward::LinkServer`]). Only linked resources are offered to peers, and only to
//! callers presenting the links secret the agent hands every machine.
//!
//! The agent's half ([`peers`]) says which machines run what; the node's half ([`routes`])
//! turns that and what runs locally into listeners.

use super::nodes::{Links, Node};
use crate::forward::{Upstream, greeting};
use crate::plan::ReplicaState;
use crate::runtime::{Instance, Slot};
use outpost_bundle_format::stack::Stack;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// The resources some resource of `stack` links.
fn linked(stack: &Stack) -> BTreeSet<&str> {
    stack
        .resources
        .iter()
        .flat_map(|r| r.container.links.iter().map(String::as_str))
        .collect()
}

/// For each machine: per linked resource, the link servers of the other machines that run it
/// (assigned a replica of it, or still reporting one healthy while a rollout moves it).
pub fn peers(
    stack: &Stack,
    nodes: &BTreeMap<String, Node>,
) -> BTreeMap<String, BTreeMap<String, Vec<SocketAddr>>> {
    let linked = linked(stack);
    let mut runs: BTreeMap<&str, Vec<(&str, SocketAddr)>> = BTreeMap::new();
    for (machine, node) in nodes {
        let Some(address) = node.links else { continue };
        let reported = node
            .report
            .iter()
            .flat_map(|r| r.replicas.iter().filter(|r| r.healthy).map(|r| &r.replica));
        let resources: BTreeSet<&str> = node
            .assignment
            .replicas
            .iter()
            .chain(reported)
            .map(|r| r.resource.as_str())
            .filter(|r| linked.contains(r))
            .collect();
        for resource in resources {
            runs.entry(resource)
                .or_default()
                .push((machine.as_str(), address));
        }
    }
    nodes
        .keys()
        .map(|machine| {
            let peers = runs
                .iter()
                .map(|(resource, on)| {
                    let others = on
                        .iter()
                        .filter(|(m, _)| m != machine)
                        .map(|(_, address)| *address)
                        .collect();
                    (resource.to_string(), others)
                })
                .collect();
            (machine.clone(), peers)
        })
        .collect()
}

/// What a node's link listeners and its link server serve.
#[derive(Debug, Default, PartialEq)]
pub struct Routes {
    /// Listener (at the host address, on the linked resource's port) → where it forwards.
    pub listeners: BTreeMap<SocketAddr, Vec<Upstream>>,
    /// (resource, port) → this machine's running replicas of a linked resource, for peers.
    pub offered: BTreeMap<(String, u16), Vec<SocketAddr>>,
}

/// The node's routes: a linked resource this machine runs is reached here, else on its peers.
pub fn routes(stack: &Stack, host: IpAddr, instances: &[Instance], links: &Links) -> Routes {
    let linked = linked(stack);
    let mut offered: BTreeMap<(String, u16), Vec<SocketAddr>> = BTreeMap::new();
    for instance in instances {
        let resource = &instance.replica.id.resource;
        if instance.slot != Slot::Primary
            || instance.replica.state != ReplicaState::Running
            || !linked.contains(resource.as_str())
        {
            continue;
        }
        for (port, address) in &instance.addresses {
            offered
                .entry((resource.clone(), *port))
                .or_default()
                .push(*address);
        }
    }
    let mut listeners = BTreeMap::new();
    for resource in stack
        .resources
        .iter()
        .filter(|r| linked.contains(r.container.name.as_str()))
    {
        let name = &resource.container.name;
        for port in &resource.container.ports {
            let backends = match offered.get(&(name.clone(), *port)) {
                Some(local) => local.iter().copied().map(Upstream::Local).collect(),
                None => links
                    .peers
                    .get(name)
                    .into_iter()
                    .flatten()
                    .map(|address| Upstream::Peer {
                        address: *address,
                        greeting: greeting(&links.secret, name, *port),
                    })
                    .collect(),
            };
            listeners.insert(SocketAddr::new(host, *port), backends);
        }
    }
    Routes { listeners, offered }
}

/// The routes in one line for the node's log (without the secret).
pub fn describe(routes: &Routes) -> String {
    let listeners: Vec<String> = routes
        .listeners
        .iter()
        .map(|(listen, upstreams)| {
            let to: Vec<String> = upstreams
                .iter()
                .map(|upstream| match upstream {
                    Upstream::Local(address) => format!("replica {address}"),
                    Upstream::Peer { address, .. } => format!("peer {address}"),
                })
                .collect();
            format!("{listen} -> [{}]", to.join(", "))
        })
        .collect();
    let offered: Vec<String> = routes
        .offered
        .iter()
        .map(|((resource, port), replicas)| format!("{resource}:{port} ({})", replicas.len()))
        .collect();
    format!(
        "link listeners {}; offered to peers: {}",
        listeners.join(", "),
        if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        }
    )
}
