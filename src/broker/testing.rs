//! Setup shared by unit tests that need a broker with messages in it.

use std::path::Path;
use std::sync::Arc;

use super::{Broker, BrokerConfig, NewMessage, QueueSettings};

/// A broker in `dir` with queue `queue` (default settings) holding `messages` messages
/// with the bodies `m0`, `m1`, ...
pub(crate) async fn broker_with_queue(dir: &Path, queue: &str, messages: usize) -> Arc<Broker> {
    let config = BrokerConfig {
        data_dir: dir.to_path_buf(),
        ..BrokerConfig::default()
    };
    let broker = Broker::open(config).await.unwrap();
    broker
        .create_queue(queue, QueueSettings::default())
        .await
        .unwrap();
    let batch = (0..messages)
        .map(|i| NewMessage {
            body: bytes::Bytes::from(format!("m{i}")),
            ..NewMessage::default()
        })
        .collect();
    broker.publish(queue, batch).await.unwrap();
    broker
}
