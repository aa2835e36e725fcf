//! The controller's API client, fenced: every write (any method but GET and HEAD) passes only
//! while this replica's [`Fence`] is current, checked the moment the request leaves. The
//! per-write checks in the reconcile cover the writes to other systems (a key API); this covers
//! every apiserver write, including those of a reconcile that was in flight when the process was
//! frozen (SIGSTOP, a VM pause) or cut off past its renew deadline, which would otherwise resume
//! and write as a leader it no longer is. Reads and watches pass always.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::{Method, Request, Response};
use kube::Client;
use kube::client::Body;

use super::fence::Fence;

/// A write refused because the fence is not current.
#[derive(Debug, thiserror::Error)]
#[error("not the leader (lease not renewed within the renew deadline): {method} refused before sending")]
pub struct NotLeader {
    /// The refused request's method.
    pub method: Method,
}

/// The tower service behind a fenced [`Client`].
#[derive(Clone)]
struct Fenced {
    client: Client,
    fence: Fence,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

impl tower::Service<Request<Body>> for Fenced {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Answer {
        let read = matches!(*req.method(), Method::GET | Method::HEAD);
        if !read && !self.fence.is_current() {
            let refused = NotLeader {
                method: req.method().clone(),
            };
            return Box::pin(std::future::ready(Err(kube::Error::Service(Box::new(refused)))));
        }
        let client = self.client.clone();
        Box::pin(async move { client.send(req).await })
    }
}

/// `client`, with its writes fenced by `fence`.
pub fn fenced(client: Client, fence: Fence) -> Client {
    let namespace = client.default_namespace().to_string();
    Client::new(Fenced { client, fence }, namespace)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    use kube::api::PostParams;

    use super::*;
    use crate::controller::election::Timings;

    /// A client of an apiserver that is not there: a request that is sent fails to connect.
    fn dead_client() -> Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Client::try_from(config).unwrap()
    }

    fn refused(e: &kube::Error) -> bool {
        matches!(e, kube::Error::Service(s) if s.is::<NotLeader>())
    }

    #[tokio::test]
    async fn writes_wait_for_the_lease_and_reads_pass() {
        let timings = Timings::new(Duration::from_secs(10), Duration::from_secs(7), Duration::from_secs(2)).unwrap();
        let fence = Fence::lease(timings);
        let api: Api<ConfigMap> = Api::namespaced(fenced(dead_client(), fence.clone()), "default");
        // Not (yet) the leader: the write is refused without being sent.
        let write = api
            .create(&PostParams::default(), &ConfigMap::default())
            .await
            .unwrap_err();
        assert!(refused(&write), "{write:?}");
        // A read is sent (and fails to connect: nothing listens there).
        let read = api.get("x").await.unwrap_err();
        assert!(!refused(&read), "{read:?}");
        // Leading: the write is sent.
        fence.acquired(tokio::time::Instant::now());
        let write = api
            .create(&PostParams::default(), &ConfigMap::default())
            .await
            .unwrap_err();
        assert!(!refused(&write), "{write:?}");
        // Revoked (stepped down): refused again.
        fence.revoke();
        let write = api.delete("x", &Default::default()).await.unwrap_err();
        assert!(refused(&write), "{write:?}");
    }

    #[tokio::test]
    async fn without_election_every_write_passes() {
        let api: Api<ConfigMap> = Api::namespaced(fenced(dead_client(), Fence::always()), "default");
        let write = api
            .create(&PostParams::default(), &ConfigMap::default())
            .await
            .unwrap_err();
        assert!(!refused(&write), "{write:?}");
    }
}
