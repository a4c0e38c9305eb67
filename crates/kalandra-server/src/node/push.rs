//! Push notifications for members who are not connected.
//!
//! A sender may attach a push payload to an `Application` frame (sealed with
//! the room's push key, see client-core's `push` module; the server cannot
//! read it). When the frame is durable, the room core offers one
//! [`PushNotification`] per member without an authenticated connection to a
//! bounded [`PushQueue`], whose worker hands them to a [`PushSink`]. A full
//! queue drops the notification (and counts it): pushes are best effort, the
//! message itself is in the log.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kalandra_proto::{RoomId, SenderId};
use tokio::sync::mpsc;

use crate::admin::metrics::Metrics;

/// Notifications waiting for the sink.
pub const PUSH_QUEUE_NOTIFICATIONS_MAX: usize = 16_384;
/// Notifications a [`MemoryPushSink`] keeps.
pub const MEMORY_SINK_NOTIFICATIONS_MAX: usize = 65_536;

/// One push for one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushNotification {
    /// Who it is for.
    pub recipient: SenderId,
    /// The room of the message.
    pub room_id: RoomId,
    /// The message's log index (the app fetches it with a sync from there).
    pub log_index: u64,
    /// The sealed push payload, forwarded as the sender made it.
    pub payload: Bytes,
}

/// Why a sink could not deliver a notification.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The sink refused or failed.
    #[error("push sink: {0}")]
    Sink(String),
}

/// Where notifications go (an APNs/FCM gateway, a webhook, a test buffer).
pub trait PushSink: Send + Sync + 'static {
    /// Delivers one notification.
    fn deliver(
        &self,
        notification: PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + '_>>;
}

/// A sink that keeps what it is given, for tests and local development.
#[derive(Debug, Default)]
pub struct MemoryPushSink {
    delivered: Mutex<Vec<PushNotification>>,
}

impl MemoryPushSink {
    /// Everything delivered so far, taken out of the sink.
    pub fn take(&self) -> Vec<PushNotification> {
        std::mem::take(&mut *self.delivered.lock().expect("sink lock"))
    }
}

impl PushSink for MemoryPushSink {
    fn deliver(
        &self,
        notification: PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + '_>> {
        let mut delivered = self.delivered.lock().expect("sink lock");
        let result = if delivered.len() < MEMORY_SINK_NOTIFICATIONS_MAX {
            delivered.push(notification);
            Ok(())
        } else {
            Err(PushError::Sink("memory sink is full".into()))
        };
        Box::pin(async move { result })
    }
}

/// Time one webhook delivery may take.
pub const WEBHOOK_TIMEOUT_MS: u64 = 5_000;

/// Posts each notification as JSON to an `http://` URL: a push gateway on a
/// trusted network, which talks to APNs or FCM. The body is
/// `{"recipient": "<sender id, 16 hex digits>", "room_id": "<32 hex digits>",
/// "log_index": <number>, "payload": "<push payload, hex>"}`; any 2xx status
/// is success.
#[derive(Debug, Clone)]
pub struct WebhookSink {
    authority: String,
    path: String,
}

impl WebhookSink {
    /// A sink posting to `url` (`http://host:port/path`).
    pub fn new(url: &str) -> Result<WebhookSink, PushError> {
        let uri: hyper::Uri = url.parse().map_err(|e| PushError::Sink(format!("webhook URL {url}: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(PushError::Sink(format!("webhook URL {url}: only http:// is supported")));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| PushError::Sink(format!("webhook URL {url}: no host")))?
            .to_string();
        let authority = if authority.contains(':') { authority } else { format!("{authority}:80") };
        let path = uri.path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(WebhookSink { authority, path })
    }

    fn body(notification: &PushNotification) -> Bytes {
        Bytes::from(format!(
            r#"{{"recipient":"{:016x}","room_id":"{}","log_index":{},"payload":"{}"}}"#,
            notification.recipient.0,
            notification.room_id,
            notification.log_index,
            hex::encode(&notification.payload)
        ))
    }

    async fn post(&self, notification: PushNotification) -> Result<(), PushError> {
        let failed =
            |what: &str, error: &dyn std::fmt::Display| PushError::Sink(format!("webhook {what}: {error}"));
        let stream =
            tokio::net::TcpStream::connect(&self.authority).await.map_err(|e| failed("connect", &e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| failed("handshake", &e))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Self::body(&notification)))
            .map_err(|e| failed("request", &e))?;
        let response = sender.send_request(request).await.map_err(|e| failed("request", &e));
        driver.abort();
        let status = response?.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(PushError::Sink(format!("webhook answered {status}")))
        }
    }
}

impl PushSink for WebhookSink {
    fn deliver(
        &self,
        notification: PushNotification,
    ) -> Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + '_>> {
        Box::pin(async move {
            let timeout = std::time::Duration::from_millis(WEBHOOK_TIMEOUT_MS);
            tokio::time::timeout(timeout, self.post(notification))
                .await
                .map_err(|_| PushError::Sink("webhook timed out".into()))?
        })
    }
}

/// The bounded queue in front of a sink, drained by one worker task.
#[derive(Clone)]
pub struct PushQueue {
    sender: mpsc::Sender<PushNotification>,
    metrics: Option<Metrics>,
}

impl PushQueue {
    /// Starts the worker that hands queued notifications to `sink`.
    pub fn start(sink: Arc<dyn PushSink>) -> PushQueue {
        PushQueue::start_counted(sink, None)
    }

    /// Like [`PushQueue::start`], counting deliveries and drops in `metrics`.
    pub fn start_counted(sink: Arc<dyn PushSink>, metrics: Option<Metrics>) -> PushQueue {
        let (sender, mut receiver) = mpsc::channel::<PushNotification>(PUSH_QUEUE_NOTIFICATIONS_MAX);
        let counted = metrics.clone();
        tokio::spawn(async move {
            while let Some(notification) = receiver.recv().await {
                let recipient = notification.recipient;
                match sink.deliver(notification).await {
                    Ok(()) => counted.iter().for_each(Metrics::push_delivered),
                    Err(error) => {
                        counted.iter().for_each(|metrics| metrics.push_dropped(false));
                        tracing::warn!(recipient = recipient.0, %error, "push not delivered");
                    }
                }
            }
        });
        PushQueue { sender, metrics }
    }

    /// Queues a notification; `false` if the queue is full (it is dropped).
    pub fn offer(&self, notification: PushNotification) -> bool {
        let queued = self.sender.try_send(notification).is_ok();
        if !queued {
            self.metrics.iter().for_each(|metrics| metrics.push_dropped(true));
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::routing::post;

    use super::*;

    fn notification() -> PushNotification {
        PushNotification {
            recipient: SenderId(0x0102_0304_0506_0708),
            room_id: RoomId([0xAB; 16]),
            log_index: 42,
            payload: Bytes::from_static(&[1, 2, 255]),
        }
    }

    async fn receiver(status: axum::http::StatusCode) -> (String, Arc<Mutex<Vec<String>>>) {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        let app = axum::Router::new().route(
            "/push",
            post(move |body: String| {
                let sink = Arc::clone(&sink);
                async move {
                    sink.lock().unwrap().push(body);
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{address}/push"), received)
    }

    #[tokio::test]
    async fn the_webhook_receives_each_notification_as_json() {
        let (url, received) = receiver(axum::http::StatusCode::NO_CONTENT).await;
        let sink = WebhookSink::new(&url).unwrap();
        sink.deliver(notification()).await.unwrap();
        let bodies = received.lock().unwrap().clone();
        assert_eq!(
            bodies,
            vec![format!(
                r#"{{"recipient":"0102030405060708","room_id":"{}","log_index":42,"payload":"0102ff"}}"#,
                "ab".repeat(16)
            )]
        );
    }

    #[tokio::test]
    async fn a_refusing_or_absent_webhook_is_an_error() {
        let (url, _) = receiver(axum::http::StatusCode::SERVICE_UNAVAILABLE).await;
        let error = WebhookSink::new(&url).unwrap().deliver(notification()).await.unwrap_err();
        assert!(error.to_string().contains("503"), "{error}");
        // Nothing listens on this port once the listener is dropped.
        let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let error =
            WebhookSink::new(&format!("http://127.0.0.1:{port}/x")).unwrap().deliver(notification()).await;
        assert!(matches!(error, Err(PushError::Sink(message)) if message.contains("connect")));
    }

    #[test]
    fn only_plain_http_urls_with_a_host_are_accepted() {
        assert!(WebhookSink::new("https://gateway.example/push").is_err());
        assert!(WebhookSink::new("not a url").is_err());
        assert!(WebhookSink::new("/relative").is_err());
        let sink = WebhookSink::new("http://127.0.0.1:8080/a?b=c").unwrap();
        assert_eq!((sink.authority.as_str(), sink.path.as_str()), ("127.0.0.1:8080", "/a?b=c"));
        assert_eq!(WebhookSink::new("http://gateway").unwrap().authority, "gateway:80");
    }
}
