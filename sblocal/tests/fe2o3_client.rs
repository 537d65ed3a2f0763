//! The broker against `fe2o3-amqp`, the client library the product is built on: `$cbs`
//! put-token, a sender, and a peek-lock receiver settling in two steps, over real TCP.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fe2o3_amqp::connection::Connection;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::Session;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::{Message, Modified};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use sblocal::auth::{AuthError, Grant, Rights, TokenValidator};
use sblocal::broker::Broker;
use sblocal::config::QueueSpec;

struct OwnerToken;

impl TokenValidator for OwnerToken {
    fn validate(&self, token: &str, _entity_path: &str) -> Result<Grant, AuthError> {
        if token != "owner" {
            return Err(AuthError::BadSignature);
        }
        Ok(Grant {
            rights: Rights {
                send: true,
                listen: true,
                manage: true,
            },
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            subject: "test".into(),
        })
    }
}

async fn start_broker() -> (Arc<Broker>, String) {
    let broker = Broker::new(
        vec![QueueSpec::with_defaults("queue.1")],
        Arc::new(OwnerToken),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "amqp://localhost:{}",
        listener.local_addr().expect("addr").port()
    );
    let serving = broker.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let broker = serving.clone();
            tokio::spawn(async move { broker.serve_connection(stream).await });
        }
    });
    (broker, url)
}

#[tokio::test]
async fn fe2o3_client_sends_and_settles_in_peek_lock() {
    let (broker, url) = start_broker().await;
    let mut connection = Connection::builder()
        .container_id("fe2o3-test")
        .sasl_profile(SaslProfile::Anonymous)
        .open(url.as_str())
        .await
        .expect("connection");
    let mut session = Session::begin(&mut connection).await.expect("session");
    let mut cbs = CbsClient::attach(&mut session).await.expect("cbs");
    cbs.put_token(
        "sb://localhost/queue.1",
        CbsToken::new("owner", "jwt", None),
    )
    .await
    .expect("put-token accepted");
    assert!(
        cbs.put_token(
            "sb://localhost/queue.1",
            CbsToken::new("forged", "jwt", None)
        )
        .await
        .is_err(),
        "a bad token is refused"
    );

    let mut sender = Sender::attach(&mut session, "sender", "amqps://localhost:5671/queue.1")
        .await
        .expect("sender");
    for body in ["first", "second"] {
        let outcome = sender.send(Message::from(body)).await.expect("send");
        assert!(outcome.is_accepted());
    }

    let mut receiver = Receiver::builder()
        .name("receiver")
        .source("queue.1")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .attach(&mut session)
        .await
        .expect("receiver");
    let first = receiver.recv::<String>().await.expect("first");
    assert_eq!(first.body(), "first");
    assert_eq!(first.delivery_tag().len(), 16, "lock-token tag");
    receiver.accept(&first).await.expect("complete");

    let second = receiver.recv::<String>().await.expect("second");
    let abandon = Modified {
        delivery_failed: Some(true),
        undeliverable_here: None,
        message_annotations: None,
    };
    receiver.modify(&second, abandon).await.expect("abandon");
    let again = receiver.recv::<String>().await.expect("redelivered");
    assert_eq!(again.body(), "second");
    assert_eq!(
        again.message().header.as_ref().map(|h| h.delivery_count),
        Some(1)
    );
    receiver.accept(&again).await.expect("complete");

    receiver.close().await.expect("close receiver");
    sender.close().await.expect("close sender");
    cbs.close().await.expect("close cbs");
    session.end().await.expect("end");
    connection.close().await.expect("close");
    assert_eq!(
        broker.queue_stats("queue.1").map(|s| s.active_messages),
        Some(0)
    );
}
