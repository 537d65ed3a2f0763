//! The HTTP side: `GET /health`, the ATOM endpoint and the token endpoint on both listeners, and
//! the fault-injection / stats routes under `/$admin/` on the plain HTTP listener only.
//!
//! Admin routes (no authentication: the listener binds to loopback by default):
//! - `POST /$admin/drop-connections` — close every AMQP connection now;
//! - `POST /$admin/refuse-connections?seconds=N` — accept and immediately close new AMQP
//!   connections for N seconds (0 ends it);
//! - `POST /$admin/server-busy?seconds=N` — answer sends with `com.microsoft:server-busy`;
//! - `POST /$admin/silent-cbs?seconds=N` — leave `$cbs` put-token requests unanswered;
//! - `POST /$admin/token-lifetime?seconds=N` — lifetime of access tokens issued from now on
//!   (0 restores the default);
//! - `POST /$admin/expire-locks` — expire every message lock now;
//! - `GET /$admin/stats` — request counters and queue counts as JSON.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::atom::{self, AtomState};
use crate::broker::Broker;
use crate::entra::{self, Entra};
use crate::faults::{Counters, Faults};

/// How long a client may take to complete a TLS handshake before it is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the admin routes touch.
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
}

/// Routes both listeners serve.
pub fn common_routes(atom: Arc<AtomState>, entra: Arc<Entra>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(entra::routes(entra))
        .merge(atom::routes(atom))
}

/// The admin and fault-injection routes (plain HTTP listener only).
pub fn admin_routes(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/$admin/stats", get(stats))
        .route("/$admin/drop-connections", post(drop_connections))
        .route("/$admin/refuse-connections", post(refuse_connections))
        .route("/$admin/server-busy", post(server_busy))
        .route("/$admin/silent-cbs", post(silent_cbs))
        .route("/$admin/token-lifetime", post(token_lifetime))
        .route("/$admin/expire-locks", post(expire_locks))
        .with_state(state)
}

/// `?seconds=N`; a missing or negative value is refused with 400 by the extractor.
#[derive(Debug, Deserialize)]
struct Seconds {
    seconds: u64,
}

impl Seconds {
    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }
}

async fn stats(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let counters = &state.counters;
    let queues: serde_json::Map<String, serde_json::Value> = state
        .broker
        .queue_names()
        .into_iter()
        .filter_map(|name| {
            let stats = state.broker.queue_stats(&name)?;
            Some((
                name,
                json!({
                    "active_messages": stats.active_messages,
                    "dead_letter_messages": stats.dead_letter_messages,
                    "scheduled_messages": stats.scheduled_messages,
                    "size_in_bytes": stats.size_in_bytes,
                }),
            ))
        })
        .collect();
    Json(json!({
        "atom_requests": Counters::get(&counters.atom_requests),
        "token_requests": Counters::get(&counters.token_requests),
        "tokens_issued": Counters::get(&counters.tokens_issued),
        "amqp_connections": Counters::get(&counters.amqp_connections),
        "amqp_connections_refused": Counters::get(&counters.amqp_connections_refused),
        "refusing_connections_for_seconds": state.faults.refusing_for().as_secs_f64(),
        "token_lifetime_override_seconds": state.faults.token_lifetime_override().map(|d| d.as_secs()),
        "queues": queues,
    }))
}

async fn drop_connections(State(state): State<Arc<AdminState>>) -> &'static str {
    tracing::warn!("fault: dropping every AMQP connection");
    state.broker.drop_all_connections();
    "dropped\n"
}

async fn refuse_connections(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<Seconds>,
) -> &'static str {
    let duration = query.duration();
    tracing::warn!(?duration, "fault: refusing new AMQP connections");
    state.faults.refuse_connections_for(duration);
    "refusing\n"
}

async fn server_busy(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<Seconds>,
) -> &'static str {
    let duration = query.duration();
    tracing::warn!(?duration, "fault: server busy");
    state.broker.server_busy_for(duration);
    "busy\n"
}

async fn silent_cbs(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<Seconds>,
) -> &'static str {
    let duration = query.duration();
    tracing::warn!(?duration, "fault: $cbs requests unanswered");
    state.broker.silent_cbs_for(duration);
    "silent\n"
}

async fn token_lifetime(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<Seconds>,
) -> &'static str {
    let duration = query.duration();
    let lifetime = (!duration.is_zero()).then_some(duration);
    tracing::warn!(?lifetime, "fault: access token lifetime");
    state.faults.set_token_lifetime(lifetime);
    "ok
"
}

async fn expire_locks(State(state): State<Arc<AdminState>>) -> &'static str {
    tracing::warn!("fault: expiring every message lock");
    state.broker.expire_all_locks();
    "expired\n"
}

/// Serves `router` over plain HTTP until the task is dropped.
pub async fn serve_plain(listener: TcpListener, router: Router) {
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "HTTP listener failed");
    }
}

/// Serves `router` over HTTPS (HTTP/1.1) until the task is dropped; each connection's handshake
/// runs in its own task so a slow client cannot stall the accept loop.
pub async fn serve_tls(listener: TcpListener, acceptor: TlsAcceptor, router: Router) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(%error, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Without it, a response written after the TLS session tickets waited for the
        // client's delayed ACK: 40 ms on some token requests.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "HTTPS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "HTTPS handshake timed out");
                        return;
                    }
                };
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "HTTPS connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{sign_sas, JwtValidator, Rights, SasRule, SasValidator, Validator};
    use crate::config::QueueSpec;
    use crate::entra::EntraSettings;
    use crate::identities::Identities;
    use crate::jwt::{self, SigningKey};
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use std::time::SystemTime;
    use tower::ServiceExt;

    const KEY: &str = "dGVzdC1rZXk=";

    struct Fixture {
        router: Router,
        counters: Arc<Counters>,
        faults: Arc<Faults>,
        entra: Arc<Entra>,
        issuer_key: SigningKey,
    }

    fn fixture() -> Fixture {
        let identities = Arc::new(Identities::defaults());
        let faults = Arc::new(Faults::default());
        let counters = Arc::new(Counters::default());
        let issuer_key = SigningKey::generate().expect("key");
        let entra = Arc::new(Entra::new(EntraSettings {
            authority: "https://localhost:1".into(),
            oidc_issuer: "https://localhost:1/oidc".into(),
            issuer_key: issuer_key.verifying_key(),
            token_key: SigningKey::generate().expect("key"),
            identities: identities.clone(),
            default_lifetime: Duration::from_secs(3600),
            faults: faults.clone(),
            counters: counters.clone(),
        }));
        let validator = Arc::new(Validator::new(
            SasValidator::new(vec![
                SasRule {
                    key_name: "root".into(),
                    key: KEY.into(),
                    rights: Rights::ALL,
                },
                SasRule {
                    key_name: "listen".into(),
                    key: KEY.into(),
                    rights: Rights {
                        listen: true,
                        ..Rights::default()
                    },
                },
            ]),
            Some(JwtValidator::new(
                vec![entra.token_verifying_key()],
                entra.access_token_issuer(),
                identities,
            )),
        ));
        let broker = Broker::new(vec![QueueSpec::with_defaults("queue.1")], validator.clone());
        let atom = Arc::new(AtomState {
            broker: broker.clone(),
            validator,
            counters: counters.clone(),
            started_at: SystemTime::now(),
        });
        let admin = admin_routes(Arc::new(AdminState {
            broker,
            faults: faults.clone(),
            counters: counters.clone(),
        }));
        Fixture {
            router: common_routes(atom, entra.clone()).merge(admin),
            counters,
            faults,
            entra,
            issuer_key,
        }
    }

    async fn call(router: &Router, request: Request<Body>) -> (StatusCode, String) {
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn get(uri: &str, authorization: Option<&str>) -> Request<Body> {
        let mut builder = Request::get(uri).header(header::HOST, "localhost:5300");
        if let Some(value) = authorization {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        builder.body(Body::empty()).expect("request")
    }

    fn post(uri: &str) -> Request<Body> {
        Request::post(uri).body(Body::empty()).expect("request")
    }

    fn sas(key_name: &str, resource: &str) -> String {
        sign_sas(resource, key_name, KEY, jwt::unix_now() as u64 + 300)
    }

    #[tokio::test]
    async fn health_answers() {
        let f = fixture();
        assert_eq!(
            call(&f.router, get("/health", None)).await,
            (StatusCode::OK, "ok".into())
        );
    }

    #[tokio::test]
    async fn atom_entry_needs_manage_and_every_request_counts() {
        let f = fixture();
        let uri = "/queue.1?api-version=2021-05";
        let (status, body) = call(&f.router, get(uri, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("<Code>401</Code>"), "{body}");
        let listen_only = sas("listen", "http://localhost:5300/");
        let (status, _) = call(&f.router, get(uri, Some(&listen_only))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let root = sas("root", "https://elsewhere:1");
        let (status, body) = call(&f.router, get(uri, Some(&root))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("<title type=\"text\">queue.1</title>"),
            "{body}"
        );
        assert!(body.contains("<d2p1:ActiveMessageCount>0</d2p1:ActiveMessageCount>"));
        assert_eq!(Counters::get(&f.counters.atom_requests), 3);
    }

    #[tokio::test]
    async fn missing_queue_is_an_empty_feed() {
        let f = fixture();
        let root = sas("root", "sb://localhost");
        let (status, body) =
            call(&f.router, get("/nothing?api-version=2021-05", Some(&root))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.starts_with("<feed") && !body.contains("<entry"),
            "{body}"
        );
    }

    async fn access_token_for(f: &Fixture, identity: &str) -> String {
        let client_id = f
            .entra
            .identities()
            .by_name(identity)
            .expect("known")
            .client_id
            .clone();
        let assertion = Entra::service_account_token(
            &f.issuer_key,
            "https://localhost:1/oidc",
            &format!("system:serviceaccount:default:{identity}"),
            crate::identities::TOKEN_EXCHANGE_AUDIENCE,
            300,
        )
        .expect("mint");
        let form = format!(
            "grant_type=client_credentials&client_id={client_id}&scope=https%3A%2F%2Fservicebus.azure.net%2F.default&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}"
        );
        let request = Request::post(format!("/{}/oauth2/v2.0/token", f.entra.tenant_id))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form))
            .expect("request");
        let (status, body) = call(&f.router, request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["token_type"], "Bearer");
        json["access_token"].as_str().expect("token").to_string()
    }

    #[tokio::test]
    async fn bearer_tokens_from_the_token_endpoint_authorise_by_role() {
        let f = fixture();
        let uri = "/queue.1?api-version=2021-05";
        let owner = access_token_for(&f, "servicebusdemo-scaler").await;
        let (status, _) = call(&f.router, get(uri, Some(&format!("Bearer {owner}")))).await;
        assert_eq!(status, StatusCode::OK);
        let sender = access_token_for(&f, "servicebusdemo-producer").await;
        let (status, body) = call(&f.router, get(uri, Some(&format!("Bearer {sender}")))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("Manage"), "{body}");
        assert_eq!(Counters::get(&f.counters.tokens_issued), 2);
    }

    #[tokio::test]
    async fn token_endpoint_errors_are_entra_shaped() {
        let f = fixture();
        let request = Request::post(format!("/{}/oauth2/v2.0/token", f.entra.tenant_id))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("grant_type=client_credentials"))
            .expect("request");
        let (status, body) = call(&f.router, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["error"], "invalid_request");
        assert_eq!(json["error_codes"][0], 900144);
        assert!(json["error_description"]
            .as_str()
            .is_some_and(|d| d.starts_with("AADSTS900144:")));
    }

    #[tokio::test]
    async fn discovery_documents_point_at_their_keys() {
        let f = fixture();
        let (status, body) = call(
            &f.router,
            get("/oidc/.well-known/openid-configuration", None),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["jwks_uri"], "https://localhost:1/oidc/openid/v1/jwks");
        let (_, keys) = call(&f.router, get("/oidc/openid/v1/jwks", None)).await;
        let keys: serde_json::Value = serde_json::from_str(&keys).expect("json");
        assert_eq!(keys["keys"][0]["kid"], f.issuer_key.kid());
    }

    #[tokio::test]
    async fn fault_routes_flip_the_switches() {
        let f = fixture();
        let (status, _) = call(&f.router, post("/$admin/refuse-connections?seconds=30")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(f.faults.refusing_connections());
        let (status, _) = call(&f.router, post("/$admin/refuse-connections")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        call(&f.router, post("/$admin/refuse-connections?seconds=0")).await;
        assert!(!f.faults.refusing_connections());
        call(&f.router, post("/$admin/token-lifetime?seconds=7")).await;
        assert_eq!(
            f.faults.token_lifetime_override(),
            Some(Duration::from_secs(7))
        );
        for route in ["drop-connections", "expire-locks"] {
            let (status, _) = call(&f.router, post(&format!("/$admin/{route}"))).await;
            assert_eq!(status, StatusCode::OK, "{route}");
        }
        for route in ["server-busy", "silent-cbs"] {
            let (status, _) = call(&f.router, post(&format!("/$admin/{route}?seconds=0"))).await;
            assert_eq!(status, StatusCode::OK, "{route}");
        }
        let (status, body) = call(&f.router, get("/$admin/stats", None)).await;
        assert_eq!(status, StatusCode::OK);
        let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(stats["token_lifetime_override_seconds"], 7);
        assert_eq!(stats["queues"]["queue.1"]["active_messages"], 0);
    }
}
