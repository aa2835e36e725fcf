//! "Has the pod cache synced?", for any number of reconciles at once.
//!
//! kube's `Store::wait_until_ready` is a `futures` oneshot behind the store: its receiver keeps a
//! single waker, so of several tasks waiting at once only the one that polled last is woken when
//! the store becomes ready; the others sleep until something else wakes them (in the controller,
//! the 30 s timeout around the wait). That is what a new leader meets when it starts with several
//! TailscaleNodes already there: their first reconciles all wait for the pod cache, and all but
//! one stall for 30 s. Here one task waits on the store and a `watch` channel, which wakes every
//! receiver, tells the reconciles.

use kube::runtime::reflector::{Lookup, Store};
use tokio::sync::watch;

/// Readiness of a reflector store, awaited by many tasks at once.
#[derive(Debug, Clone)]
pub struct Synced(watch::Receiver<bool>);

impl Synced {
    /// Spawns the one task that waits on `store`; it ends when the store is ready or its writer
    /// is dropped.
    pub fn of<K>(store: Store<K>) -> Self
    where
        K: 'static + Lookup + Clone + Send + Sync,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                let _ = tx.send(true);
            }
        });
        Self(rx)
    }

    /// Waits until the store is ready: `true`, or `false` when it never will be (the writer was
    /// dropped: the controller stopped).
    pub async fn wait(&self) -> bool {
        self.0.clone().wait_for(|ready| *ready).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher::Event;
    use tokio::time::Instant;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(30);

    type Waiter = tokio::task::JoinHandle<(bool, Instant)>;

    /// Starts `n` waiters, each on a task of its own (as reconciles are), and lets them all poll.
    /// Each answers what its wait returned (`false` after [`PATIENCE`]) and when.
    async fn waiters<F, Fut>(n: usize, wait: F) -> Vec<Waiter>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let w = wait();
                tokio::spawn(async move {
                    let answer = tokio::time::timeout(PATIENCE, w).await.unwrap_or(false);
                    (answer, Instant::now())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        handles
    }

    /// What each waiter answered, if it answered within a second of `since`.
    async fn answers(handles: Vec<Waiter>, since: Instant) -> Vec<Option<bool>> {
        let mut out = Vec::new();
        for h in handles {
            let (answer, at) = h.await.unwrap();
            out.push((at.duration_since(since) < Duration::from_secs(1)).then_some(answer));
        }
        out
    }

    fn init_done(writer: &mut Writer<Pod>) {
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
    }

    /// The upstream behaviour this module works around (if kube fixes it, this fails: then
    /// `Synced` may go).
    #[tokio::test(start_paused = true)]
    async fn kubes_store_wakes_only_the_last_of_several_waiters() {
        let (store, mut writer) = reflector::store::<Pod>();
        let handles = waiters(3, || {
            let s = store.clone();
            async move { s.wait_until_ready().await.is_ok() }
        })
        .await;
        let ready_at = Instant::now();
        init_done(&mut writer);
        let answers = answers(handles, ready_at).await;
        assert_eq!(answers.iter().filter(|a| **a == Some(true)).count(), 1, "{answers:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn every_waiter_is_released_when_the_store_is_ready() {
        let (store, mut writer) = reflector::store::<Pod>();
        let synced = Synced::of(store);
        let handles = waiters(16, || {
            let s = synced.clone();
            async move { s.wait().await }
        })
        .await;
        let ready_at = Instant::now();
        init_done(&mut writer);
        assert_eq!(answers(handles, ready_at).await, vec![Some(true); 16]);
        // And a late waiter passes at once.
        assert!(synced.wait().await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_writer_releases_the_waiters_with_false() {
        let (store, writer) = reflector::store::<Pod>();
        let synced = Synced::of(store);
        let handles = waiters(2, || {
            let s = synced.clone();
            async move { s.wait().await }
        })
        .await;
        let dropped_at = Instant::now();
        drop(writer);
        assert_eq!(answers(handles, dropped_at).await, vec![Some(false); 2]);
    }
}
