//! RocketMQ remoting: length-prefixed frames with a JSON header, request/response matched by
//! `opaque`, one multiplexed TCP connection per address (the broker's held pulls and every other
//! request share it, as with the Java client).
//!
//! A frame is `u32 length | u32 (serialize type << 24 | header length) | header | body`, all big
//! endian; only the JSON header type (0) is spoken. Requests the broker sends on its own (a
//! consumer group changed: `NOTIFY_CONSUMER_IDS_CHANGED`) go to the [`Remoting`]'s request
//! channel; one that expects an answer is told its code is not supported.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The protocol version sent in every request: 5.3.3 (`MQVersion.Version.V5_3_3.ordinal()`).
/// Brokers gate a few old behaviours on it; every 4.x and 5.x broker accepts a newer one.
const VERSION: i32 = 479;
/// The response bit of a header's `flag`.
const FLAG_RESPONSE: i32 = 1;
/// The one-way bit: the sender expects no answer.
const FLAG_ONEWAY: i32 = 2;
/// Largest frame accepted (the broker's own limit is 16 MiB by default).
const MAX_FRAME: usize = 64 << 20;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `REQUEST_CODE_NOT_SUPPORTED`: the answer to a request this client does not serve.
const NOT_SUPPORTED: i32 = 3;

/// Why a request got no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemotingError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to {addr} lost: {reason}")]
    Closed { addr: String, reason: String },
    #[error("no answer from {addr} to request {code} within {after:?}")]
    Timeout {
        addr: String,
        code: i32,
        after: Duration,
    },
    #[error("{0}")]
    Protocol(String),
}

/// A header as written: borrows the command's fields instead of copying them per request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutHeader<'a> {
    code: i32,
    language: &'a str,
    version: i32,
    opaque: i32,
    flag: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    remark: Option<&'a str>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    ext_fields: &'a HashMap<String, String>,
}

/// A header as read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    code: i32,
    #[serde(default)]
    opaque: i32,
    #[serde(default)]
    flag: i32,
    #[serde(default)]
    remark: Option<String>,
    #[serde(default)]
    ext_fields: HashMap<String, String>,
}

/// One request or response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Command {
    /// Request code, or response code in a response (0: success).
    pub code: i32,
    pub flag: i32,
    pub opaque: i32,
    pub remark: Option<String>,
    /// The custom header's fields, as strings.
    pub fields: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Command {
    pub fn request(code: i32) -> Command {
        Command {
            code,
            ..Command::default()
        }
    }

    /// Adds a header field.
    pub fn field(mut self, name: &str, value: impl ToString) -> Command {
        self.fields.insert(name.to_owned(), value.to_string());
        self
    }

    pub fn with_body(mut self, body: Vec<u8>) -> Command {
        self.body = body;
        self
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    /// A header field parsed as a number.
    pub fn number(&self, name: &str) -> Result<i64, RemotingError> {
        let raw = self.fields.get(name).ok_or_else(|| {
            RemotingError::Protocol(format!("response {} has no `{name}` field", self.code))
        })?;
        raw.parse().map_err(|_| {
            RemotingError::Protocol(format!("response field `{name}` is not a number: {raw}"))
        })
    }

    /// The response's remark, or "" (brokers explain failures there).
    pub fn remark(&self) -> &str {
        self.remark.as_deref().unwrap_or("")
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let header = OutHeader {
            code: self.code,
            language: "OTHER",
            version: VERSION,
            opaque: self.opaque,
            flag: self.flag,
            remark: self.remark.as_deref(),
            ext_fields: &self.fields,
        };
        let header = serde_json::to_vec(&header).expect("a header serializes");
        let mut frame = Vec::with_capacity(8 + header.len() + self.body.len());
        frame.extend_from_slice(&((4 + header.len() + self.body.len()) as u32).to_be_bytes());
        frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&self.body);
        frame
    }

    /// Decodes a frame without its length prefix.
    pub fn decode(mut frame: Vec<u8>) -> Result<Command, RemotingError> {
        if frame.len() < 4 {
            return Err(RemotingError::Protocol("frame shorter than 4 bytes".into()));
        }
        let mark = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let (kind, len) = (mark >> 24, (mark & 0x00ff_ffff) as usize);
        if kind != 0 {
            return Err(RemotingError::Protocol(format!(
                "header serialize type {kind} (only JSON, 0, is spoken)"
            )));
        }
        if 4 + len > frame.len() {
            return Err(RemotingError::Protocol(format!(
                "header of {len} bytes in a frame of {}",
                frame.len()
            )));
        }
        let header: Header = serde_json::from_slice(&frame[4..4 + len])
            .map_err(|e| RemotingError::Protocol(format!("bad header: {e}")))?;
        let body = frame.split_off(4 + len);
        Ok(Command {
            code: header.code,
            flag: header.flag,
            opaque: header.opaque,
            remark: header.remark,
            fields: header.ext_fields,
            body,
        })
    }
}

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<Command>>>>;

/// One connection: a writer task fed by a channel, a reader task that completes the pending
/// requests. Closed for good at the first error; the next request opens a new one.
struct Conn {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    closed: CancellationToken,
    why: Arc<Mutex<String>>,
}

impl Conn {
    async fn open(
        addr: &str,
        requests: mpsc::UnboundedSender<(String, Command)>,
    ) -> Result<Conn, RemotingError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| RemotingError::Connect {
                addr: addr.to_owned(),
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })?
            .map_err(|e| RemotingError::Connect {
                addr: addr.to_owned(),
                reason: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (frames, mut frames_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let pending: Pending = Arc::default();
        let closed = CancellationToken::new();
        let why = Arc::new(Mutex::new(String::new()));
        let close = {
            let (pending, closed, why) = (pending.clone(), closed.clone(), why.clone());
            move |reason: String| {
                {
                    let mut w = why.lock().unwrap_or_else(PoisonError::into_inner);
                    if w.is_empty() {
                        *w = reason;
                    }
                }
                closed.cancel();
                // Dropping the senders fails every request still waiting.
                pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
            }
        };
        {
            let (close, closed) = (close.clone(), closed.clone());
            tokio::spawn(async move {
                let mut wr = BufWriter::with_capacity(64 << 10, wr);
                loop {
                    let frame = tokio::select! {
                        _ = closed.cancelled() => return,
                        f = frames_rx.recv() => match f { Some(f) => f, None => return },
                    };
                    let mut res = wr.write_all(&frame).await;
                    while res.is_ok() {
                        match frames_rx.try_recv() {
                            Ok(f) => res = wr.write_all(&f).await,
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = res.and(wr.flush().await) {
                        close(format!("write: {e}"));
                        return;
                    }
                }
            });
        }
        {
            let (pending, closed, frames, addr) = (
                pending.clone(),
                closed.clone(),
                frames.clone(),
                addr.to_owned(),
            );
            tokio::spawn(async move {
                let mut rd = BufReader::with_capacity(256 << 10, rd);
                let reason = loop {
                    let frame = tokio::select! {
                        _ = closed.cancelled() => return,
                        f = read_frame(&mut rd) => f,
                    };
                    let cmd = match frame.and_then(Command::decode) {
                        Ok(cmd) => cmd,
                        Err(e) => break e.to_string(),
                    };
                    if cmd.is_response() {
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&cmd.opaque);
                        if let Some(w) = waiter {
                            let _ = w.send(cmd);
                        }
                    } else {
                        if cmd.flag & FLAG_ONEWAY == 0 {
                            let answer = Command {
                                code: NOT_SUPPORTED,
                                flag: FLAG_RESPONSE,
                                opaque: cmd.opaque,
                                remark: Some(format!("request code {} not supported", cmd.code)),
                                ..Command::default()
                            };
                            let _ = frames.send(answer.encode());
                        }
                        let _ = requests.send((addr.clone(), cmd));
                    }
                };
                close(reason);
            });
        }
        Ok(Conn {
            frames,
            pending,
            closed,
            why,
        })
    }
}

async fn read_frame<R: AsyncReadExt + Unpin>(rd: &mut R) -> Result<Vec<u8>, RemotingError> {
    let len = rd
        .read_u32()
        .await
        .map_err(|e| RemotingError::Protocol(format!("read: {e}")))? as usize;
    if len > MAX_FRAME {
        return Err(RemotingError::Protocol(format!("frame of {len} bytes")));
    }
    let mut frame = vec![0; len];
    rd.read_exact(&mut frame)
        .await
        .map_err(|e| RemotingError::Protocol(format!("read: {e}")))?;
    Ok(frame)
}

/// Connections by address, opened on first use and replaced once closed.
pub struct Remoting {
    conns: tokio::sync::Mutex<HashMap<String, Arc<Conn>>>,
    next_opaque: AtomicI32,
    requests: mpsc::UnboundedSender<(String, Command)>,
}

impl Remoting {
    /// A new client; requests that brokers send on their own arrive on the returned channel,
    /// with the address they came from.
    pub fn new() -> (Arc<Remoting>, mpsc::UnboundedReceiver<(String, Command)>) {
        let (requests, rx) = mpsc::unbounded_channel();
        let r = Remoting {
            conns: tokio::sync::Mutex::new(HashMap::new()),
            next_opaque: AtomicI32::new(1),
            requests,
        };
        (Arc::new(r), rx)
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>, RemotingError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(addr) {
            if !c.closed.is_cancelled() {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(Conn::open(addr, self.requests.clone()).await?);
        conns.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Sends `cmd` to `addr` and waits up to `timeout` for its answer.
    pub async fn invoke(
        &self,
        addr: &str,
        mut cmd: Command,
        timeout: Duration,
    ) -> Result<Command, RemotingError> {
        let conn = self.conn(addr).await?;
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        cmd.opaque = opaque;
        cmd.flag &= !FLAG_RESPONSE;
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(opaque, tx);
        let lost = |conn: &Conn| RemotingError::Closed {
            addr: addr.to_owned(),
            reason: conn
                .why
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        if conn.closed.is_cancelled() || conn.frames.send(cmd.encode()).is_err() {
            conn.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&opaque);
            return Err(lost(&conn));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(lost(&conn)),
            Err(_) => {
                conn.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&opaque);
                Err(RemotingError::Timeout {
                    addr: addr.to_owned(),
                    code: cmd.code,
                    after: timeout,
                })
            }
        }
    }

    /// Closes every connection; requests waiting for an answer fail at once.
    pub async fn close(&self) {
        for (_, c) in self.conns.lock().await.drain() {
            {
                let mut why = c.why.lock().unwrap_or_else(PoisonError::into_inner);
                if why.is_empty() {
                    *why = "closed by this client".to_owned();
                }
            }
            c.closed.cancel();
            c.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_and_its_header_is_the_brokers_json() {
        let cmd = Command::request(11)
            .field("topic", "t")
            .field("queueId", 3)
            .with_body(b"body".to_vec());
        let frame = cmd.encode();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        let header_len = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&frame[8..8 + header_len]).unwrap();
        assert_eq!(header["code"], 11);
        assert_eq!(header["extFields"]["queueId"], "3");
        assert_eq!(header["version"], VERSION);
        assert_eq!(&frame[8 + header_len..], b"body");
        let back = Command::decode(frame[4..].to_vec()).unwrap();
        assert_eq!(back, cmd);
    }

    #[test]
    fn a_binary_header_is_refused_by_name() {
        let mut frame = (1u32 << 24 | 2).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let e = Command::decode(frame).unwrap_err().to_string();
        assert!(e.contains("serialize type 1"), "{e}");
    }
}
