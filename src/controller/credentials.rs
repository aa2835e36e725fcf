//! Resolving a TailscaleNode's credentials (its own, or the operator default) into a key API.
//! Clients are cached per credential content, so an OAuth token is reused for its lifetime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::desired::secret_value;
use super::status::Problem;
use crate::api::{Credentials, TailscaleNode};
use crate::tsapi::{ConfigError, KeyApi, ResolvedCredentials};

/// Builds a key API for resolved credentials (fails only on unusable settings such as a bad URL).
pub type ApiFactory = Arc<dyn Fn(&ResolvedCredentials) -> Result<Arc<dyn KeyApi>, ConfigError> + Send + Sync>;

/// The operator-wide default credentials: a spec-shaped value whose Secrets live in `namespace`.
#[derive(Debug, Clone)]
pub struct DefaultCredentials {
    /// Namespace of the default credential Secret (the operator's).
    pub namespace: String,
    /// Which credentials.
    pub credentials: Credentials,
}

/// Key APIs by credential content.
pub struct CredentialCache {
    factory: ApiFactory,
    apis: Mutex<HashMap<String, Arc<dyn KeyApi>>>,
    /// The last key API that worked for each node (namespace/name): cleanup still deletes devices
    /// when the credential Secret is gone first, e.g. while the namespace is being deleted.
    last_good: Mutex<HashMap<String, Arc<dyn KeyApi>>>,
}

impl CredentialCache {
    /// A cache that builds clients with `factory`.
    pub fn new(factory: ApiFactory) -> Self {
        CredentialCache {
            factory,
            apis: Mutex::new(HashMap::new()),
            last_good: Mutex::new(HashMap::new()),
        }
    }

    /// The key API that last worked for `node`, if any.
    pub fn last_known(&self, node: &TailscaleNode) -> Option<Arc<dyn KeyApi>> {
        let map = self.last_good.lock().ok()?;
        map.get(&node_key(node)).cloned()
    }

    /// The key API for `node`, or the problem the user must fix.
    pub async fn for_node(
        &self,
        client: &Client,
        node: &TailscaleNode,
        default: Option<&DefaultCredentials>,
    ) -> Result<Arc<dyn KeyApi>, Problem> {
        let ns = node.metadata.namespace.clone().unwrap_or_default();
        let (creds, ns) = match (&node.spec.credentials, default) {
            (Some(c), _) => (c.clone(), ns),
            (None, Some(d)) => (d.credentials.clone(), d.namespace.clone()),
            (None, None) => {
                return Err(Problem {
                    reason: "NoCredentials",
                    message: "spec.credentials is empty and the operator has no default credentials".into(),
                });
            }
        };
        let resolved = resolve(client, &ns, &creds).await?;
        let key = resolved.cache_key();
        let mut apis = self.apis.lock().map_err(|_| Problem {
            reason: "InternalError",
            message: "credential cache poisoned".into(),
        })?;
        let api = match apis.get(&key) {
            Some(api) => api.clone(),
            None => {
                let api = (self.factory)(&resolved).map_err(|e| Problem {
                    reason: "InvalidCredentials",
                    message: format!("the credentials cannot be used: {e}"),
                })?;
                apis.insert(key, api.clone());
                api
            }
        };
        drop(apis);
        if let Ok(mut last) = self.last_good.lock() {
            last.insert(node_key(node), api.clone());
        }
        Ok(api)
    }
}

async fn fetch(client: &Client, ns: &str, name: &str) -> Result<Secret, Problem> {
    let secret: Option<Secret> = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| Problem {
            reason: "SecretUnreadable",
            message: format!("reading Secret {ns}/{name}: {e}"),
        })?;
    secret.ok_or_else(|| Problem {
        reason: "SecretMissing",
        message: format!("credential Secret {ns}/{name} does not exist"),
    })
}

fn value(secret: &Secret, ns: &str, name: &str, key: &str) -> Result<String, Problem> {
    secret_value(secret, key).ok_or_else(|| Problem {
        reason: "SecretKeyMissing",
        message: format!("credential Secret {ns}/{name} has no key {key:?}"),
    })
}

async fn read(client: &Client, ns: &str, name: &str, key: &str) -> Result<String, Problem> {
    value(&fetch(client, ns, name).await?, ns, name, key)
}

/// Reads the Secrets that `creds` names in `ns`.
pub async fn resolve(client: &Client, ns: &str, creds: &Credentials) -> Result<ResolvedCredentials, Problem> {
    if let Some(o) = &creds.oauth {
        let api_url = o.api_url.clone().unwrap_or_else(|| "https://api.tailscale.com".into());
        let tailnet = o.tailnet.clone().unwrap_or_else(|| "-".into());
        if let (Some(client_id), Some(audience)) = (&o.client_id, &o.audience) {
            return Ok(ResolvedCredentials::Federated {
                client_id: client_id.clone(),
                audience: audience.clone(),
                api_url,
                tailnet,
            });
        }
        let name = o.secret_name.as_deref().unwrap_or_default();
        let id_key = o.client_id_key.as_deref().unwrap_or("client_id");
        let secret_key = o.client_secret_key.as_deref().unwrap_or("client_secret");
        // One read for both values.
        let secret = fetch(client, ns, name).await?;
        return Ok(ResolvedCredentials::OAuth {
            client_id: value(&secret, ns, name, id_key)?,
            client_secret: value(&secret, ns, name, secret_key)?,
            api_url,
            tailnet,
        });
    }
    if let Some(h) = &creds.headscale {
        let key = h.api_key_key.as_deref().unwrap_or("api-key");
        return Ok(ResolvedCredentials::Headscale {
            url: h.url.clone(),
            api_key: read(client, ns, &h.api_key_secret_name, key).await?,
            user: h.user.clone(),
        });
    }
    if let Some(a) = &creds.auth_key {
        let key = a.key.as_deref().unwrap_or("authkey");
        return Ok(ResolvedCredentials::Static {
            key: read(client, ns, &a.secret_name, key).await?,
        });
    }
    Err(Problem {
        reason: "NoCredentials",
        message: "spec.credentials names no credential source".into(),
    })
}

fn node_key(node: &TailscaleNode) -> String {
    format!(
        "{}/{}",
        node.metadata.namespace.as_deref().unwrap_or_default(),
        node.metadata.name.as_deref().unwrap_or_default()
    )
}

/// ID tokens for workload identity federation: short-lived tokens of the operator's own
/// ServiceAccount (the TokenRequest API), bound to the audience the OAuth client trusts.
pub struct ServiceAccountTokens {
    api: Api<k8s_openapi::api::core::v1::ServiceAccount>,
    name: String,
}

impl ServiceAccountTokens {
    /// Tokens of ServiceAccount `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        ServiceAccountTokens {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }
}

/// Lifetime asked for each token: the exchange happens at once, and the access token it buys
/// is cached for its own lifetime.
const ID_TOKEN_SECONDS: i64 = 600;

impl crate::tsapi::IdTokenSource for ServiceAccountTokens {
    fn id_token<'a>(
        &'a self,
        audience: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<String, crate::tsapi::ApiError>> {
        Box::pin(async move {
            use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
            let req = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: Some(vec![audience.to_string()]),
                    expiration_seconds: Some(ID_TOKEN_SECONDS),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let answer = self
                .api
                .create_token_request(&self.name, &kube::api::PostParams::default(), &req)
                .await
                .map_err(|e| {
                    crate::tsapi::ApiError::Transport(format!(
                        "requesting a token of ServiceAccount {}: {e}",
                        self.name
                    ))
                })?;
            answer
                .status
                .and_then(|s| s.token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| crate::tsapi::ApiError::Decode("the TokenRequest answer holds no token".into()))
        })
    }
}
