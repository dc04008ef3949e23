//! Placement: which machine runs which replica, and how many machines each pool needs. A pure
//! function of the replicas, the pools' machine shapes and the machines that exist: replicas
//! stay where they run while they fit; the rest go, largest first, to the machine with the
//! fewest replicas of their resource (then the fullest that fits); what fits nowhere opens new
//! machines, up to the pool's maximum. A stateful replica whose volume exists goes only to a
//! machine in that volume's zone.

use crate::plan::ReplicaId;
use std::collections::{BTreeMap, BTreeSet};

/// What one machine of a pool offers replicas (its type's size less its reserve).
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub cpu: f64,
    pub memory_bytes: u64,
    pub gpus: BTreeMap<String, u32>,
}

/// A pool as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// What to call it in messages (`default (m6i.large)`).
    pub label: String,
    pub shape: Shape,
    pub min: u32,
    pub max: u32,
}

/// One replica to place.
#[derive(Debug, Clone, PartialEq)]
pub struct Want {
    pub id: ReplicaId,
    pub pool: String,
    pub cpu: f64,
    pub memory_bytes: u64,
    pub gpu: Option<(String, u32)>,
    /// The zone its volume is in (a stateful replica whose volume exists).
    pub zone: Option<String>,
}

/// A machine that exists.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub id: String,
    pub pool: String,
    pub zone: String,
    /// Joined and reporting: replicas may go here. Other machines are on their way in
    /// (booting), and count toward what the pool needs.
    pub usable: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// Replica → machine id, for the replicas that have a machine now.
    pub assigned: BTreeMap<ReplicaId, String>,
    /// Replicas waiting for machines that are booting or still to be asked for.
    pub waiting: Vec<ReplicaId>,
    /// Per pool: the machines it should have (never below its minimum).
    pub desired: BTreeMap<String, u32>,
    /// Usable machines with nothing to run, beyond what their pool needs: to be let go.
    pub surplus: Vec<String>,
    /// Why replicas cannot be placed even with every machine the pools allow.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone)]
struct Room {
    cpu: f64,
    memory: u64,
    gpus: BTreeMap<String, u32>,
}

impl Room {
    fn of(shape: &Shape) -> Room {
        Room {
            cpu: shape.cpu,
            memory: shape.memory_bytes,
            gpus: shape.gpus.clone(),
        }
    }

    fn fits(&self, want: &Want) -> bool {
        // A little slack for sums of fractions of cores.
        want.cpu <= self.cpu + 1e-9
            && want.memory_bytes <= self.memory
            && want
                .gpu
                .as_ref()
                .is_none_or(|(kind, n)| self.gpus.get(kind).copied().unwrap_or(0) >= *n)
    }

    fn take(&mut self, want: &Want) {
        self.cpu -= want.cpu;
        self.memory -= want.memory_bytes;
        if let Some((kind, n)) = &want.gpu
            && let Some(have) = self.gpus.get_mut(kind)
        {
            *have -= n;
        }
    }
}

/// Why `want` fits no machine of `pool` even when empty, if it does not.
pub fn never_fits(want: &Want, pool: &Pool) -> Option<String> {
    if Room::of(&pool.shape).fits(want) {
        return None;
    }
    let gpu = match &want.gpu {
        Some((kind, n)) => format!(
            ", {n} GPU {kind} (it has {})",
            pool.shape.gpus.get(kind).copied().unwrap_or(0)
        ),
        None => String::new(),
    };
    Some(format!(
        "{} needs cpu {}, memory {} MiB{gpu}; a machine of pool {} offers cpu {}, memory {} MiB after its reserve",
        want.id.resource,
        want.cpu,
        want.memory_bytes >> 20,
        pool.label,
        (pool.shape.cpu * 1000.0).round() / 1000.0,
        pool.shape.memory_bytes >> 20,
    ))
}

/// Places `wants` on `hosts` (keeping each on its machine in `previous` while it fits there).
pub fn place(
    pools: &BTreeMap<String, Pool>,
    wants: &[Want],
    hosts: &[Host],
    previous: &BTreeMap<ReplicaId, String>,
) -> Placement {
    let mut placement = Placement::default();
    let mut rooms: BTreeMap<&str, Room> = BTreeMap::new();
    for host in hosts.iter().filter(|h| h.usable) {
        if let Some(pool) = pools.get(&host.pool) {
            rooms.insert(&host.id, Room::of(&pool.shape));
        }
    }
    let host = |id: &str| hosts.iter().find(|h| h.id == id);
    // Replicas of each resource per machine: spread a resource over machines.
    let mut spread: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    let mut rest = Vec::new();
    for want in wants {
        let Some(pool) = pools.get(&want.pool) else {
            placement.problems.push(format!(
                "{}: pool {:?} is not configured (config key vm.pools)",
                want.id.resource, want.pool
            ));
            continue;
        };
        if let Some(problem) = never_fits(want, pool) {
            placement.problems.push(problem);
            continue;
        }
        let kept = previous.get(&want.id).and_then(|machine| {
            let host = host(machine)?;
            let room = rooms.get_mut(machine.as_str())?;
            let zone_ok = want.zone.as_ref().is_none_or(|z| *z == host.zone);
            (host.pool == want.pool && zone_ok && room.fits(want)).then(|| {
                room.take(want);
                machine.clone()
            })
        });
        match kept {
            Some(machine) => {
                *spread
                    .entry((
                        want.id.resource.as_str(),
                        host(&machine).map_or("", |h| &h.id),
                    ))
                    .or_default() += 1;
                placement.assigned.insert(want.id.clone(), machine);
            }
            None => rest.push(want),
        }
    }
    // Largest first: GPUs, then memory, then cpu; ordinals in order for a stable answer.
    rest.sort_by(|a, b| {
        let size = |w: &Want| (w.gpu.as_ref().map_or(0, |g| g.1), w.memory_bytes);
        size(b)
            .cmp(&size(a))
            .then(b.cpu.total_cmp(&a.cpu))
            .then(a.id.cmp(&b.id))
    });
    // Per pool: the rooms of machines still to come (booting ones are counted, not filled).
    let mut new_machines: BTreeMap<&str, Vec<(Option<String>, Room)>> = BTreeMap::new();
    for want in rest {
        let pool = &pools[&want.pool];
        let best = hosts
            .iter()
            .filter(|h| h.usable && h.pool == want.pool)
            .filter(|h| want.zone.as_ref().is_none_or(|z| *z == h.zone))
            .filter(|h| rooms.get(h.id.as_str()).is_some_and(|r| r.fits(want)))
            .min_by(|a, b| {
                let count = |h: &Host| {
                    spread
                        .get(&(want.id.resource.as_str(), h.id.as_str()))
                        .copied()
                        .unwrap_or(0)
                };
                let free = |h: &Host| rooms.get(h.id.as_str()).map_or(0.0, |r| r.cpu);
                count(a)
                    .cmp(&count(b))
                    .then(free(a).total_cmp(&free(b)))
                    .then(a.id.cmp(&b.id))
            });
        if let Some(host) = best {
            if let Some(room) = rooms.get_mut(host.id.as_str()) {
                room.take(want);
            }
            *spread
                .entry((want.id.resource.as_str(), host.id.as_str()))
                .or_default() += 1;
            placement.assigned.insert(want.id.clone(), host.id.clone());
            continue;
        }
        let coming = new_machines.entry(want.pool.as_str()).or_default();
        match coming
            .iter_mut()
            .find(|(zone, room)| room.fits(want) && (want.zone.is_none() || *zone == want.zone))
        {
            Some((zone, room)) => {
                room.take(want);
                if zone.is_none() {
                    zone.clone_from(&want.zone);
                }
            }
            None => {
                let mut room = Room::of(&pool.shape);
                room.take(want);
                coming.push((want.zone.clone(), room));
            }
        }
        placement.waiting.push(want.id.clone());
    }
    let busy: BTreeSet<&str> = placement.assigned.values().map(String::as_str).collect();
    for (name, pool) in pools {
        let in_pool: Vec<&Host> = hosts.iter().filter(|h| h.pool == *name).collect();
        let used = in_pool
            .iter()
            .filter(|h| h.usable && busy.contains(h.id.as_str()))
            .count() as u32;
        let booting = in_pool.iter().filter(|h| !h.usable).count() as u32;
        let more = new_machines
            .get(name.as_str())
            .map_or(0, |m| m.len() as u32);
        let needed = used + more.max(booting);
        if used + more > pool.max {
            placement.problems.push(format!(
                "pool {} needs {} machines for its replicas; max_machines is {} (config key vm.pools.{name}.max_machines)",
                pool.label,
                used + more,
                pool.max
            ));
        }
        // Booting machines are kept (they take the waiting replicas); idle usable ones only
        // to keep the pool at its minimum, the rest let go one by one by name (a group
        // shrunk by count picks its own victims).
        let keep_idle = pool.min.saturating_sub(needed) as usize;
        let surplus: Vec<String> = in_pool
            .iter()
            .filter(|h| h.usable && !busy.contains(h.id.as_str()))
            .skip(keep_idle)
            .map(|h| h.id.clone())
            .collect();
        let desired = (needed + keep_idle as u32).max(pool.min).min(pool.max);
        placement.surplus.extend(surplus);
        placement.desired.insert(name.clone(), desired);
    }
    placement
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn pool(cpu: f64, memory_gib: u64, max: u32) -> BTreeMap<String, Pool> {
        BTreeMap::from([(
            "default".to_string(),
            Pool {
                label: "default (t)".into(),
                shape: Shape {
                    cpu,
                    memory_bytes: memory_gib * GIB,
                    gpus: BTreeMap::new(),
                },
                min: 0,
                max,
            },
        )])
    }

    fn want(resource: &str, ordinal: u32, cpu: f64, memory_gib: u64) -> Want {
        Want {
            id: ReplicaId::new(resource, ordinal),
            pool: "default".into(),
            cpu,
            memory_bytes: memory_gib * GIB,
            gpu: None,
            zone: None,
        }
    }

    fn host(id: &str, zone: &str) -> Host {
        Host {
            id: id.into(),
            pool: "default".into(),
            zone: zone.into(),
            usable: true,
        }
    }

    #[test]
    fn no_machines_yet_asks_for_enough() {
        let wants: Vec<Want> = (0..5).map(|i| want("api", i, 1.0, 1)).collect();
        let placed = place(&pool(2.0, 8, 10), &wants, &[], &BTreeMap::new());
        assert!(placed.assigned.is_empty());
        assert_eq!(placed.waiting.len(), 5);
        assert_eq!(placed.desired["default"], 3);
        assert!(placed.problems.is_empty());
    }

    #[test]
    fn a_resource_spreads_over_machines_and_stays_put() {
        let hosts = [host("i-a", "z1"), host("i-b", "z2")];
        let wants: Vec<Want> = (0..2).map(|i| want("web", i, 0.5, 1)).collect();
        let placed = place(&pool(2.0, 8, 10), &wants, &hosts, &BTreeMap::new());
        let machines: BTreeSet<&String> = placed.assigned.values().collect();
        assert_eq!(machines.len(), 2, "{placed:?}");
        // Placed again with the first answer: nothing moves.
        let again = place(&pool(2.0, 8, 10), &wants, &hosts, &placed.assigned);
        assert_eq!(again.assigned, placed.assigned);
        assert_eq!(again.desired["default"], 2);
        assert!(again.surplus.is_empty());
    }

    #[test]
    fn a_stateful_replica_follows_its_volume_zone() {
        let hosts = [host("i-a", "z1"), host("i-b", "z2")];
        let mut db = want("db", 0, 0.5, 1);
        db.zone = Some("z2".into());
        let placed = place(&pool(2.0, 8, 10), &[db.clone()], &hosts, &BTreeMap::new());
        assert_eq!(placed.assigned[&db.id], "i-b");
        // Its machine in z2 gone: it waits for a new machine rather than moving zones.
        let placed = place(
            &pool(2.0, 8, 10),
            &[db.clone()],
            &hosts[..1],
            &BTreeMap::new(),
        );
        assert_eq!(placed.waiting, vec![db.id.clone()]);
        assert_eq!(placed.desired["default"], 1);
        assert_eq!(placed.surplus, vec!["i-a".to_string()]);
    }

    #[test]
    fn idle_machines_beyond_the_need_are_let_go_by_name() {
        let hosts = [host("i-a", "z1"), host("i-b", "z1"), host("i-c", "z1")];
        let wants = [want("web", 0, 0.5, 1)];
        let previous = BTreeMap::from([(wants[0].id.clone(), "i-b".to_string())]);
        let placed = place(&pool(2.0, 8, 10), &wants, &hosts, &previous);
        assert_eq!(placed.assigned[&wants[0].id], "i-b");
        assert_eq!(placed.surplus, vec!["i-a".to_string(), "i-c".to_string()]);
        assert_eq!(placed.desired["default"], 1);
        let mut pools = pool(2.0, 8, 10);
        pools.get_mut("default").unwrap().min = 2;
        let placed = place(&pools, &wants, &hosts, &previous);
        assert_eq!(placed.surplus, vec!["i-c".to_string()]);
        assert_eq!(placed.desired["default"], 2);
    }

    #[test]
    fn booting_machines_count_toward_the_need() {
        let mut booting = host("i-new", "z1");
        booting.usable = false;
        let wants = [want("web", 0, 1.5, 1)];
        let placed = place(&pool(2.0, 8, 10), &wants, &[booting], &BTreeMap::new());
        assert_eq!(placed.waiting.len(), 1);
        assert_eq!(placed.desired["default"], 1);
    }

    #[test]
    fn what_never_fits_is_named() {
        let placed = place(
            &pool(2.0, 8, 10),
            &[want("big", 0, 4.0, 1)],
            &[],
            &BTreeMap::new(),
        );
        assert_eq!(placed.problems.len(), 1);
        assert!(placed.problems[0].contains("big needs cpu 4"), "{placed:?}");
        let too_many: Vec<Want> = (0..4).map(|i| want("api", i, 2.0, 1)).collect();
        let placed = place(&pool(2.0, 8, 3), &too_many, &[], &BTreeMap::new());
        assert!(
            placed.problems[0].contains("needs 4 machines"),
            "{placed:?}"
        );
        assert_eq!(placed.desired["default"], 3);
    }

    #[test]
    fn gpus_are_counted() {
        let mut pools = pool(8.0, 32, 10);
        pools
            .get_mut("default")
            .unwrap()
            .shape
            .gpus
            .insert("l4".into(), 2);
        let wants: Vec<Want> = (0..3)
            .map(|i| Want {
                gpu: Some(("l4".into(), 1)),
                ..want("infer", i, 1.0, 1)
            })
            .collect();
        let placed = place(&pools, &wants, &[host("i-a", "z1")], &BTreeMap::new());
        assert_eq!(placed.assigned.len(), 2);
        assert_eq!(placed.waiting.len(), 1);
        assert_eq!(placed.desired["default"], 2);
    }

    proptest! {
        /// Whatever the replicas and machines: no machine is over-committed, every replica is
        /// placed or waiting or named in a problem, and desired stays within the bounds.
        #[test]
        fn never_overcommits(
            sizes in proptest::collection::vec((1u32..=8, 1u64..=8), 0..40),
            machines in 0usize..8,
            max in 1u32..12,
        ) {
            let pools = pool(4.0, 16, max);
            let wants: Vec<Want> = sizes
                .iter()
                .enumerate()
                .map(|(i, (cpu, mem))| want("r", i as u32, f64::from(*cpu) / 2.0, *mem))
                .collect();
            let hosts: Vec<Host> = (0..machines).map(|i| host(&format!("i-{i}"), "z")).collect();
            let placed = place(&pools, &wants, &hosts, &BTreeMap::new());
            for h in &hosts {
                let on: Vec<&Want> = wants
                    .iter()
                    .filter(|w| placed.assigned.get(&w.id) == Some(&h.id))
                    .collect();
                prop_assert!(on.iter().map(|w| w.cpu).sum::<f64>() <= 4.0 + 1e-9);
                prop_assert!(on.iter().map(|w| w.memory_bytes).sum::<u64>() <= 16 * GIB);
            }
            prop_assert_eq!(placed.assigned.len() + placed.waiting.len(), wants.len());
            let desired = placed.desired["default"];
            prop_assert!(desired <= max);
            prop_assert!(placed.surplus.iter().all(|s| !placed.assigned.values().any(|a| a == s)));
        }
    }
}
