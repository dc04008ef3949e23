//! Carrying out a plan's actions in parallel, safely. Resources roll at the same time unless
//! one links another: a resource waits only for the resources it links (earlier in the
//! dependency order; a link cycle is broken there). Within a resource, new replicas and
//! restarts go at once, replaces in batches within the resource's budget (a stateless replace
//! runs a surge replica; a stateful one stops its ordinal first), and removals after its
//! updates; pruned resources go last. Every step holds one of `max_parallel` permits, so the
//! engine sees a bounded number of calls and health waits. After the first failure no new
//! step starts; the steps in flight finish, so nothing is abandoned half done.

use super::RolloutError;
use crate::config::RolloutConfig;
use crate::plan::{Action, Desired};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{Semaphore, watch};

/// How much of a plan may run at once.
#[derive(Debug, Clone)]
pub struct Parallelism {
    pub steps: usize,
    pub surge: crate::config::Budget,
    pub unavailable: crate::config::Budget,
}

impl Parallelism {
    pub fn of(rollout: &RolloutConfig) -> Parallelism {
        Parallelism {
            steps: usize::try_from(rollout.max_parallel.max(1)).unwrap_or(1),
            surge: rollout.max_surge,
            unavailable: rollout.max_unavailable,
        }
    }

    /// One step at a time, in plan order.
    pub fn serial() -> Parallelism {
        Parallelism {
            steps: 1,
            surge: crate::config::Budget::Count(1),
            unavailable: crate::config::Budget::Count(1),
        }
    }
}

/// What happened to a plan: the indices of the actions done (in plan order), and the first
/// failure, after which nothing new was started.
#[derive(Debug)]
pub struct Outcome {
    pub done: Vec<usize>,
    pub error: Option<RolloutError>,
}

/// The actions of one resource, and whom it waits for.
struct Group {
    /// Positions (in `groups`) of the resources it links that come before it.
    waits_for: Vec<usize>,
    /// Creates, starts and replaces, in plan order.
    updates: Vec<usize>,
    /// Replaces (and for a stateful resource creates and starts too, so ordinals come up in
    /// order as a StatefulSet's do) in flight at once.
    budget: usize,
    stateful: bool,
    removes: Vec<usize>,
}

/// Splits `actions` by resource in `desired`'s order; pruned resources' removals come last,
/// as a group of their own that waits for every other.
fn groups(actions: &[Action], desired: &Desired, parallelism: &Parallelism) -> Vec<Group> {
    let names: Vec<&str> = desired
        .resources
        .iter()
        .map(|r| r.container.name.as_str())
        .collect();
    let mut groups: Vec<Group> = desired
        .resources
        .iter()
        .enumerate()
        .map(|(position, resource)| Group {
            waits_for: resource
                .container
                .links
                .iter()
                .filter_map(|link| names.iter().position(|n| n == link))
                .filter(|&linked| linked < position)
                .collect(),
            updates: Vec::new(),
            budget: if resource.container.stateful {
                parallelism.unavailable.of(resource.replicas, false)
            } else {
                parallelism.surge.of(resource.replicas, true)
            },
            stateful: resource.container.stateful,
            removes: Vec::new(),
        })
        .collect();
    let pruned = groups.len();
    groups.push(Group {
        waits_for: (0..pruned).collect(),
        updates: Vec::new(),
        budget: 1,
        stateful: false,
        removes: Vec::new(),
    });
    for (index, action) in actions.iter().enumerate() {
        let position = names
            .iter()
            .position(|n| *n == action.replica().resource)
            .unwrap_or(pruned);
        let group = &mut groups[position];
        match action {
            Action::Remove { .. } => group.removes.push(index),
            _ => group.updates.push(index),
        }
    }
    groups
}

struct Shared<'a, F> {
    actions: &'a [Action],
    step: F,
    permits: Semaphore,
    failed: AtomicBool,
    error: Mutex<Option<RolloutError>>,
    done: Mutex<Vec<usize>>,
}

impl<'a, F, Fut> Shared<'a, F>
where
    F: Fn(usize, &'a Action) -> Fut,
    Fut: Future<Output = Result<(), RolloutError>>,
{
    /// Runs action `index` once a permit (and, for a replace, one of `budget`) is free,
    /// unless a step failed meanwhile.
    async fn run(&self, index: usize, budget: &Semaphore, stateful: bool) {
        let action = &self.actions[index];
        let _budgeted = match action {
            Action::Replace { .. } => budget.acquire().await.ok(),
            Action::Create { .. } | Action::Start { .. } if stateful => budget.acquire().await.ok(),
            _ => None,
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return;
        };
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        match (self.step)(index, action).await {
            Ok(()) => lock(&self.done).push(index),
            Err(e) => {
                self.failed.store(true, Ordering::SeqCst);
                lock(&self.error).get_or_insert(e);
            }
        }
    }

    /// One resource's steps: updates within its budget, then removals.
    async fn group(&self, group: &Group) -> Result<(), ()> {
        let budget = Semaphore::new(group.budget);
        let updates = group.updates.iter();
        futures_util::future::join_all(updates.map(|&i| self.run(i, &budget, group.stateful)))
            .await;
        let unbounded = Semaphore::new(Semaphore::MAX_PERMITS);
        let removes = group.removes.iter();
        futures_util::future::join_all(removes.map(|&i| self.run(i, &unbounded, false))).await;
        if self.failed.load(Ordering::SeqCst) {
            Err(())
        } else {
            Ok(())
        }
    }
}

/// Runs `work(i)` for every unit `i` at once, each as soon as the units `waits_for[i]` lists
/// (which must come before it) are done; after a failure, units not yet started are skipped.
/// Returns the first error.
pub async fn after_links<E, F, Fut>(waits_for: &[Vec<usize>], work: F) -> Result<(), E>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let finished: Vec<watch::Sender<bool>> =
        waits_for.iter().map(|_| watch::channel(false).0).collect();
    let failed = AtomicBool::new(false);
    let first: Mutex<Option<E>> = Mutex::new(None);
    let (finished, failed, first, work) = (&finished, &failed, &first, &work);
    futures_util::future::join_all(
        waits_for
            .iter()
            .enumerate()
            .map(|(unit, waits)| async move {
                for &before in waits.iter().filter(|&&b| b < unit) {
                    // The senders live as long as this call: waiting cannot fail.
                    let _ = finished[before].subscribe().wait_for(|done| *done).await;
                }
                if !failed.load(Ordering::SeqCst)
                    && let Err(e) = work(unit).await
                {
                    failed.store(true, Ordering::SeqCst);
                    lock(first).get_or_insert(e);
                }
                finished[unit].send_replace(true);
            }),
    )
    .await;
    match lock(first).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Carries out `actions` (a plan for `desired`) through `step`, as parallel as `parallelism`
/// allows.
pub async fn carry_out<'a, F, Fut>(
    actions: &'a [Action],
    desired: &Desired<'_>,
    parallelism: &Parallelism,
    step: F,
) -> Outcome
where
    F: Fn(usize, &'a Action) -> Fut,
    Fut: Future<Output = Result<(), RolloutError>>,
{
    if parallelism.steps <= 1 {
        // One at a time: in plan order, as the planner wrote it.
        let mut done = Vec::new();
        for (index, action) in actions.iter().enumerate() {
            if let Err(e) = step(index, action).await {
                return Outcome {
                    done,
                    error: Some(e),
                };
            }
            done.push(index);
        }
        return Outcome { done, error: None };
    }
    let groups = groups(actions, desired, parallelism);
    let shared = Shared {
        actions,
        step,
        permits: Semaphore::new(parallelism.steps.max(1)),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        done: Mutex::new(Vec::new()),
    };
    let waits: Vec<Vec<usize>> = groups.iter().map(|g| g.waits_for.clone()).collect();
    let (shared_ref, groups_ref) = (&shared, &groups);
    // The failure itself is in `shared`.
    let _ = after_links(&waits, |position| shared_ref.group(&groups_ref[position])).await;
    let mut done = std::mem::take(&mut *lock(&shared.done));
    done.sort_unstable();
    let error = lock(&shared.error).take();
    Outcome { done, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{ReplicaId, plan};
    use outpost_bundle_format::Digest;
    use outpost_bundle_format::stack::Stack;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    const STACK: &str = r#"
name: shop
permissionProfiles: {none: {}}
resources:
  - lifecycle: live
    container: {name: db, code: {image: "r.example/db@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}, cpu: 1, memory: 1Gi, ports: [5432], replicas: 3, persistentStorage: 1Gi, permissions: none}
  - lifecycle: live
    container: {name: cache, code: {image: "r.example/cache@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}, cpu: 1, memory: 1Gi, ports: [6379], replicas: 4, permissions: none}
  - lifecycle: live
    container: {name: web, code: {image: "r.example/web@sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"}, cpu: 1, memory: 1Gi, ports: [80], replicas: 8, links: [db, cache], permissions: none}
"#;

    /// Per step, when it started and ended (ms of a paused clock); the most steps in flight.
    struct Trace {
        spans: BTreeMap<ReplicaId, (u64, u64)>,
        most_in_flight: usize,
    }

    /// Carries out `actions`, each step taking 100 ms, and traces them.
    async fn traced(actions: &[Action], desired: &Desired<'_>, rollout: &RolloutConfig) -> Trace {
        let spans = Mutex::new(BTreeMap::new());
        let in_flight = Mutex::new((0usize, 0usize));
        let start = tokio::time::Instant::now();
        let (spans_ref, flight_ref) = (&spans, &in_flight);
        let outcome = carry_out(
            actions,
            desired,
            &Parallelism::of(rollout),
            |_, action| async move {
                {
                    let mut flight = lock(flight_ref);
                    flight.0 += 1;
                    flight.1 = flight.1.max(flight.0);
                }
                let began = start.elapsed().as_millis() as u64;
                tokio::time::sleep(Duration::from_millis(100)).await;
                lock(flight_ref).0 -= 1;
                let ended = start.elapsed().as_millis() as u64;
                lock(spans_ref).insert(action.replica().clone(), (began, ended));
                Ok(())
            },
        )
        .await;
        assert!(outcome.error.is_none());
        assert_eq!(outcome.done, (0..actions.len()).collect::<Vec<_>>());
        Trace {
            spans: spans.into_inner().unwrap(),
            most_in_flight: in_flight.into_inner().unwrap().1,
        }
    }

    fn setup(text: &str, observed: Vec<crate::plan::ObservedReplica>) -> (Stack, Vec<Action>) {
        let stack = Stack::from_yaml(text).unwrap().1;
        let desired = Desired::new(&stack, Digest::of(b"r"), &BTreeMap::new());
        let actions = plan(&desired, &observed, chrono::Utc::now()).actions;
        (stack, actions)
    }

    #[tokio::test(start_paused = true)]
    async fn independent_resources_start_together_and_linked_ones_wait() {
        let (stack, actions) = setup(STACK, vec![]);
        let desired = Desired::new(&stack, Digest::of(b"r"), &BTreeMap::new());
        let trace = traced(&actions, &desired, &RolloutConfig::default()).await;
        let spans = &trace.spans;
        let of = |r: &str, o: u32| spans[&ReplicaId::new(r, o)];
        // db and cache (no links) start at once: every replica of the stateless cache, the
        // stateful db one ordinal after the other (within max_unavailable, 1).
        for o in 0..3 {
            assert_eq!(of("db", o).0, 100 * u64::from(o), "{spans:?}");
        }
        for o in 0..4 {
            assert_eq!(of("cache", o).0, 0);
        }
        // web waits for both, then creates all eight together.
        for o in 0..8 {
            assert_eq!(of("web", o).0, 300, "{spans:?}");
        }
        assert_eq!(trace.most_in_flight, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn replaces_keep_to_their_budgets_and_the_global_bound() {
        let (stack, _) = setup(STACK, vec![]);
        // Everything runs with another configuration: every replica is replaced.
        let desired = Desired::new(&stack, Digest::of(b"r"), &BTreeMap::new());
        let observed: Vec<_> = desired
            .resources
            .iter()
            .flat_map(|r| {
                (0..r.replicas).map(|o| crate::plan::ObservedReplica {
                    id: ReplicaId::new(&r.container.name, o),
                    config_hash: "old".into(),
                    state: crate::plan::ReplicaState::Running,
                    started_at: None,
                })
            })
            .collect();
        let actions = plan(&desired, &observed, chrono::Utc::now()).actions;
        let config = RolloutConfig {
            max_parallel: 3,
            ..RolloutConfig::default()
        };
        let trace = traced(&actions, &desired, &config).await;
        let spans = &trace.spans;
        // At no instant more than the budget of one resource: db (stateful) one ordinal at a
        // time, cache 25% of 4 = 1, web 25% of 8 = 2; and never more than 3 steps in all.
        for (resource, budget) in [("db", 1), ("cache", 1), ("web", 2)] {
            let mine: Vec<(u64, u64)> = spans
                .iter()
                .filter(|(id, _)| id.resource == resource)
                .map(|(_, span)| *span)
                .collect();
            for &(began, _) in &mine {
                let overlapping = mine
                    .iter()
                    .filter(|(b, e)| *b <= began && began < *e)
                    .count();
                assert!(
                    overlapping <= budget,
                    "{resource}: {overlapping} at {began}: {mine:?}"
                );
            }
        }
        assert!(trace.most_in_flight <= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_nothing_new_starts_and_steps_in_flight_finish() {
        let (stack, actions) = setup(STACK, vec![]);
        let desired = Desired::new(&stack, Digest::of(b"r"), &BTreeMap::new());
        let started = Arc::new(Mutex::new(Vec::new()));
        let outcome = carry_out(
            &actions,
            &desired,
            &Parallelism::of(&RolloutConfig::default()),
            |index, action| {
                let started = started.clone();
                async move {
                    lock(&started).push(index);
                    tokio::time::sleep(Duration::from_millis(
                        10 * (1 + u64::from(action.replica().ordinal)),
                    ))
                    .await;
                    if action.replica() == &ReplicaId::new("db", 0) {
                        return Err(RolloutError::new("db-0 never became healthy"));
                    }
                    Ok(())
                }
            },
        )
        .await;
        assert_eq!(
            outcome.error.unwrap().to_string(),
            "db-0 never became healthy"
        );
        let started = lock(&started).clone();
        // db and cache were in flight together and finished; web, which links db, never began.
        assert!(
            started
                .iter()
                .all(|&i| actions[i].replica().resource != "web"),
            "{started:?}"
        );
        assert_eq!(outcome.done.len(), started.len() - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn serial_runs_in_plan_order() {
        let (stack, actions) = setup(STACK, vec![]);
        let desired = Desired::new(&stack, Digest::of(b"r"), &BTreeMap::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        carry_out(&actions, &desired, &Parallelism::serial(), |index, _| {
            let order = order.clone();
            async move {
                lock(&order).push(index);
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }
        })
        .await;
        assert_eq!(*lock(&order), (0..actions.len()).collect::<Vec<_>>());
    }
}
