//! [`RocketMqWriter`]: a thin rocketmq-client-rust producer for the traffic generator
//! (`mqc-kit produce`) and the tests, with the side's ACL, TLS and namespace settings.

use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::compression::compression_type::CompressionType;
use rocketmq_model::common::message::message_single::Message as RmqMessage;
use rocketmq_model::result::SendStatus;

use super::client::{self, boxed, explain, ClientHome};
use super::Codec;
use crate::source::config::RocketMqSideConfig;

/// Why [`RocketMqWriter`] could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The producer could not start (bad settings, name server unreachable).
    #[error("rocketmq producer cannot start: {0}")]
    Start(String),
    /// The message cannot be built, e.g. a property name reserved by RocketMQ (`KEYS`, `TAGS`).
    #[error("rocketmq message is invalid: {0}")]
    Invalid(String),
    /// The broker did not store the message (or did not say so in time).
    #[error("rocketmq send failed: {0}")]
    Send(String),
}

impl WriterError {
    /// Whether sending the same message again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WriterError::Send(_))
    }
}

/// How the writer compresses bodies, as a producer configured so would (tests of the source's
/// codecs). The client's LZ4 is a size-prefixed block, not the Java client's frame.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// The codec.
    pub codec: Codec,
    /// Bodies of at least this many bytes are compressed (the client's default: 4,096).
    pub over_bytes: u32,
}

/// A thin RocketMQ producer: one message at a time, sent synchronously, with user properties
/// (which carry the cross-broker message id, as the source reads it).
pub struct RocketMqWriter {
    home: ClientHome,
    producer: DefaultMQProducer,
}

impl RocketMqWriter {
    /// Starts a plain producer in `group` against the name server(s) `name_server`
    /// (`host:port[;…]`).
    pub async fn connect(name_server: &str, group: &str) -> Result<RocketMqWriter, WriterError> {
        Self::connect_side(&RocketMqSideConfig::plain(name_server, "", ""), group, None).await
    }

    /// Starts a producer in `group` with the name server, ACL, TLS and namespace settings of a
    /// `[side.rocketmq]` table (its topic and consumer group are not used), compressing bodies
    /// as `compression` says (absent: the client's default, zlib from 4 KiB).
    pub async fn connect_side(
        side: &RocketMqSideConfig,
        group: &str,
        compression: Option<Compression>,
    ) -> Result<RocketMqWriter, WriterError> {
        let home = ClientHome::new("writer", 1).map_err(WriterError::Start)?;
        let mut builder = DefaultMQProducer::builder(home.runtime.clone())
            .client_config(client::client_config(side))
            .producer_group(group)
            .name_server_addr(side.name_server.as_str())
            .use_tls(side.tls);
        if let Some(hook) = client::acl_hook(side) {
            builder = builder.rpc_hook(hook);
        }
        if let Some(c) = compression {
            builder = builder
                .compress_type(match c.codec {
                    Codec::Zlib => CompressionType::Zlib,
                    Codec::Zstd => CompressionType::Zstd,
                    Codec::Lz4 => CompressionType::LZ4,
                })
                .compress_msg_body_over_howmuch(c.over_bytes);
        }
        let mut producer = builder.build();
        if let Err(e) = boxed(producer.start()).await {
            home.shutdown().await;
            return Err(WriterError::Start(format!(
                "group `{group}` via name server {} ({}): {}",
                side.name_server,
                client::describe(side),
                explain(&e)
            )));
        }
        Ok(RocketMqWriter { home, producer })
    }

    /// Sends one message and waits until the broker stored it. `keys` (may be empty) is the
    /// message key the broker indexes; `properties` are user properties.
    pub async fn send(
        &self,
        topic: &str,
        tag: Option<&str>,
        keys: &str,
        properties: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), WriterError> {
        let mut builder = RmqMessage::builder().topic(topic).body_slice(body);
        if let Some(tag) = tag {
            builder = builder.tags(tag);
        }
        if !keys.is_empty() {
            builder = builder.key(keys);
        }
        for (name, value) in properties {
            builder = builder
                .raw_property(*name, *value)
                .map_err(|e| WriterError::Invalid(e.to_string()))?;
        }
        let msg = builder
            .build()
            .map_err(|e| WriterError::Invalid(e.to_string()))?;
        match boxed(self.producer.send(msg)).await {
            Ok(Some(result)) if result.send_status == SendStatus::SendOk => Ok(()),
            Ok(Some(result)) => Err(WriterError::Send(format!(
                "topic `{topic}`: broker answered {:?}",
                result.send_status
            ))),
            Ok(None) => Err(WriterError::Send(format!(
                "topic `{topic}`: no send result"
            ))),
            Err(e) => Err(WriterError::Send(format!(
                "topic `{topic}`: {}",
                explain(&e)
            ))),
        }
    }

    /// Stops the producer and its runtime.
    pub async fn shutdown(mut self) {
        boxed(self.producer.shutdown()).await;
        self.home.shutdown().await;
    }
}
