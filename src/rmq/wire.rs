//! What travels inside RocketMQ frames: topic routes, stored messages, properties, tag filters,
//! and the queue allocation every instance of a group computes alike.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use serde::Deserialize;

/// Separates a property's name from its value.
pub const NAME_VALUE: char = '\u{1}';
/// Ends a property.
pub const PROPERTY_END: char = '\u{2}';

/// `MessageDecoder.MESSAGE_MAGIC_CODE`: the topic's length is one byte.
const MAGIC_V1: i32 = -626_843_481;
/// `MESSAGE_MAGIC_CODE_V2`: the topic's length is two bytes.
const MAGIC_V2: i32 = -626_843_477;
const FLAG_COMPRESSED: i32 = 0x1;
const FLAG_BORN_HOST_V6: i32 = 0x10;
const FLAG_STORE_HOST_V6: i32 = 0x20;
const COMPRESSION_MASK: i32 = 0x7 << 8;
const COMPRESSION_LZ4: i32 = 0x1 << 8;
const COMPRESSION_ZSTD: i32 = 0x2 << 8;
/// `PermName.PERM_READ` / `PERM_WRITE`.
pub const PERM_READ: i32 = 4;
pub const PERM_WRITE: i32 = 2;

/// One queue of a topic on one broker. Ordered as the Java client orders them (topic, broker,
/// queue id), which the allocation depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageQueue {
    pub topic: Arc<str>,
    pub broker: Arc<str>,
    pub queue_id: i32,
}

impl MessageQueue {
    pub fn new(topic: &str, broker: &str, queue_id: i32) -> MessageQueue {
        MessageQueue {
            topic: topic.into(),
            broker: broker.into(),
            queue_id,
        }
    }
}

impl std::fmt::Display for MessageQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.broker, self.topic, self.queue_id)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteData {
    #[serde(default)]
    broker_datas: Vec<BrokerData>,
    #[serde(default)]
    queue_datas: Vec<QueueData>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BrokerData {
    broker_name: String,
    #[serde(default)]
    broker_addrs: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueueData {
    broker_name: String,
    read_queue_nums: i32,
    write_queue_nums: i32,
    perm: i32,
}

/// Most queues of one topic on one broker a route may name (RocketMQ's default is 8 or 16;
/// found by fuzzing: a name server's `readQueueNums` of 2^31 - 1 made as many entries).
pub const MAX_QUEUES_PER_BROKER: i32 = 4096;

/// Most queues of one topic a route may name across its brokers.
pub const MAX_ROUTE_QUEUES: usize = 65_536;

/// A topic's route: its brokers' master addresses and its queues.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// Broker name → address of its master (broker id 0).
    pub masters: HashMap<String, String>,
    /// Readable queues, sorted.
    pub read: Vec<MessageQueue>,
    /// Writable queues, sorted.
    pub write: Vec<MessageQueue>,
}

impl Route {
    /// Parses a name server's `TopicRouteData` for `topic`.
    pub fn parse(topic: &str, json: &[u8]) -> Result<Route, String> {
        let fixed = quote_number_keys(json);
        let data: RouteData = serde_json::from_slice(&fixed)
            .map_err(|e| format!("unreadable route of `{topic}`: {e}"))?;
        let mut route = Route::default();
        for b in data.broker_datas {
            if let Some(addr) = b.broker_addrs.get("0") {
                route.masters.insert(b.broker_name, addr.clone());
            }
        }
        for q in data.queue_datas {
            if !route.masters.contains_key(&q.broker_name) {
                continue; // no master: nothing to read from or write to there
            }
            // Each queue becomes an entry here: a route claiming billions would take the memory.
            let most = q.read_queue_nums.max(q.write_queue_nums);
            if most > MAX_QUEUES_PER_BROKER
                || route.read.len().max(route.write.len()) + most.max(0) as usize > MAX_ROUTE_QUEUES
            {
                return Err(format!(
                    "route of `{topic}`: broker {} claims {} read / {} write queues, more than \
                     {MAX_QUEUES_PER_BROKER} per broker or {MAX_ROUTE_QUEUES} in all",
                    q.broker_name, q.read_queue_nums, q.write_queue_nums
                ));
            }
            if q.perm & PERM_READ != 0 {
                for id in 0..q.read_queue_nums {
                    route
                        .read
                        .push(MessageQueue::new(topic, &q.broker_name, id));
                }
            }
            if q.perm & PERM_WRITE != 0 {
                for id in 0..q.write_queue_nums {
                    route
                        .write
                        .push(MessageQueue::new(topic, &q.broker_name, id));
                }
            }
        }
        route.read.sort();
        route.write.sort();
        Ok(route)
    }
}

/// fastjson writes a map with number keys (`brokerAddrs`) as `{0:"host:port"}`, which is not
/// JSON: quotes every such key, leaving strings untouched.
pub fn quote_number_keys(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    let (mut in_string, mut escaped, mut after_open) = (false, false, false);
    let mut i = 0;
    while i < json.len() {
        let c = json[i];
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_string = true;
                after_open = false;
                out.push(c);
            }
            b'{' | b',' => {
                after_open = true;
                out.push(c);
            }
            b' ' | b'\n' | b'\r' | b'\t' => out.push(c),
            b'-' | b'0'..=b'9' if after_open => {
                let end = json[i..]
                    .iter()
                    .position(|b| !(b.is_ascii_digit() || *b == b'-'))
                    .map_or(json.len(), |p| i + p);
                let rest = json[end..].iter().find(|b| !b.is_ascii_whitespace());
                if rest == Some(&b':') {
                    out.push(b'"');
                    out.extend_from_slice(&json[i..end]);
                    out.push(b'"');
                } else {
                    out.extend_from_slice(&json[i..end]);
                }
                after_open = false;
                i = end;
                continue;
            }
            _ => {
                after_open = false;
                out.push(c);
            }
        }
        i += 1;
    }
    out
}

/// A message as the broker stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub queue_id: i32,
    pub queue_offset: i64,
    pub born_timestamp: i64,
    /// The body, uncompressed; `Err` when it cannot be (said why).
    pub body: Result<Vec<u8>, String>,
    pub properties: Vec<(String, String)>,
}

impl StoredMessage {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() - self.at {
            return Err(format!(
                "message cut short: {n} bytes wanted at {} of {}",
                self.at,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// Decodes the messages of a pull response's body (`MessageDecoder.decodes`). A message whose
/// body cannot be uncompressed keeps its place with the reason; a body that does not parse at
/// all fails the whole batch.
pub fn decode_messages(body: &[u8]) -> Result<Vec<StoredMessage>, String> {
    let mut out = Vec::new();
    let mut c = Cursor { buf: body, at: 0 };
    while c.at < body.len() {
        let start = c.at;
        let size = c.i32()?;
        if size < 4 || size as usize > body.len() - start {
            return Err(format!(
                "message of {size} bytes at {start} of {}",
                body.len()
            ));
        }
        let mut m = Cursor {
            buf: &body[start..start + size as usize],
            at: 4,
        };
        out.push(decode_one(&mut m)?);
        c.at = start + size as usize;
    }
    Ok(out)
}

fn decode_one(c: &mut Cursor<'_>) -> Result<StoredMessage, String> {
    let magic = c.i32()?;
    if magic != MAGIC_V1 && magic != MAGIC_V2 {
        return Err(format!("unknown message magic code {magic}"));
    }
    let _body_crc = c.i32()?;
    let queue_id = c.i32()?;
    let _flag = c.i32()?;
    let queue_offset = c.i64()?;
    let _physical_offset = c.i64()?;
    let sys_flag = c.i32()?;
    let born_timestamp = c.i64()?;
    let host = |v6: bool| if v6 { 16 + 4 } else { 4 + 4 };
    c.take(host(sys_flag & FLAG_BORN_HOST_V6 != 0))?;
    let _store_timestamp = c.i64()?;
    c.take(host(sys_flag & FLAG_STORE_HOST_V6 != 0))?;
    let _reconsume_times = c.i32()?;
    let _prepared_offset = c.i64()?;
    let body_len = c.i32()?;
    let raw = c.take(usize::try_from(body_len).map_err(|_| "negative body length")?)?;
    let body = if sys_flag & FLAG_COMPRESSED != 0 {
        uncompress(raw, sys_flag & COMPRESSION_MASK)
    } else {
        Ok(raw.to_vec())
    };
    let topic_len = if magic == MAGIC_V2 {
        c.i16()? as u16 as usize
    } else {
        c.take(1)?[0] as usize
    };
    c.take(topic_len)?; // the queue's topic: known to the caller
    let props_len = c.i16()? as u16 as usize;
    let properties = parse_properties(&String::from_utf8_lossy(c.take(props_len)?));
    Ok(StoredMessage {
        queue_id,
        queue_offset,
        born_timestamp,
        body,
        properties,
    })
}

fn uncompress(raw: &[u8], kind: i32) -> Result<Vec<u8>, String> {
    match kind {
        COMPRESSION_LZ4 => {
            Err("the body is compressed with LZ4, which mq-cutover cannot read".into())
        }
        COMPRESSION_ZSTD => {
            Err("the body is compressed with zstd, which mq-cutover cannot read".into())
        }
        // ZLIB, or an older producer's compressed flag alone (always zlib).
        _ => {
            let mut out = Vec::with_capacity(raw.len() * 4);
            flate2::read::ZlibDecoder::new(raw)
                .read_to_end(&mut out)
                .map_err(|e| format!("the zlib-compressed body does not uncompress: {e}"))?;
            Ok(out)
        }
    }
}

/// `name\u1value\u2…` → pairs.
pub fn parse_properties(s: &str) -> Vec<(String, String)> {
    s.split(PROPERTY_END)
        .filter_map(|kv| {
            let (k, v) = kv.split_once(NAME_VALUE)?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Pairs → `name\u1value\u2…`.
pub fn encode_properties(props: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in props {
        s.push_str(k);
        s.push(NAME_VALUE);
        s.push_str(v);
        s.push(PROPERTY_END);
    }
    s
}

/// A parsed tag expression: `*` (everything) or `a || b`.
#[derive(Debug, Clone, PartialEq)]
pub struct TagFilter {
    /// The expression as written, sent to the broker.
    pub expression: String,
    /// `None`: every tag.
    pub tags: Option<Vec<String>>,
}

impl TagFilter {
    pub fn parse(expression: &str) -> TagFilter {
        let e = expression.trim();
        if e.is_empty() || e == "*" {
            return TagFilter {
                expression: "*".to_owned(),
                tags: None,
            };
        }
        let tags = e
            .split("||")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        TagFilter {
            expression: e.to_owned(),
            tags: Some(tags),
        }
    }

    /// The broker filters by the tags' hash codes only; equal hashes of other tags are dropped
    /// here, as the Java client does.
    pub fn accepts(&self, tag: Option<&str>) -> bool {
        match &self.tags {
            None => true,
            Some(tags) => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }

    /// The tags' Java `String.hashCode()`s, as the broker's consume queue stores them.
    pub fn codes(&self) -> Vec<i32> {
        self.tags.iter().flatten().map(|t| java_hash(t)).collect()
    }
}

/// Java's `String.hashCode()` (over UTF-16 code units).
pub fn java_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)))
}

/// `AllocateMessageQueueAveragely`: the share of `queues` (sorted) that consumer `me` of
/// `consumers` (sorted) takes; every instance computes the same split. Empty if `me` is not
/// among them.
pub fn allocate<'a>(
    queues: &'a [MessageQueue],
    consumers: &[String],
    me: &str,
) -> &'a [MessageQueue] {
    let Some(index) = consumers.iter().position(|c| c == me) else {
        return &[];
    };
    let (n, k) = (queues.len(), consumers.len());
    if n == 0 {
        return &[];
    }
    let rem = n % k;
    let size = if n <= k {
        1
    } else if rem > 0 && index < rem {
        n / k + 1
    } else {
        n / k
    };
    let start = if rem > 0 && index < rem {
        index * size
    } else {
        index * size + rem
    };
    let take = size.min(n.saturating_sub(start));
    &queues[start.min(n)..start.min(n) + take]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn number_keys_get_quotes_and_strings_stay_as_they_are() {
        let raw = br#"{"brokerDatas":[{"brokerAddrs":{0:"127.0.0.1:10911",1:"h:2"},"brokerName":"b,1:x"}],"n":{-1 :2}}"#;
        let fixed = quote_number_keys(raw);
        assert_eq!(
            String::from_utf8(fixed).unwrap(),
            r#"{"brokerDatas":[{"brokerAddrs":{"0":"127.0.0.1:10911","1":"h:2"},"brokerName":"b,1:x"}],"n":{"-1" :2}}"#
        );
        assert_eq!(quote_number_keys(b"[1,2,{\"a\":3}]"), b"[1,2,{\"a\":3}]");
    }

    #[test]
    fn a_route_lists_the_masters_readable_and_writable_queues() {
        let raw = br#"{"brokerDatas":[{"brokerAddrs":{0:"127.0.0.1:10911",1:"127.0.0.1:10921"},"brokerName":"b","cluster":"c"},{"brokerAddrs":{1:"x:1"},"brokerName":"slave-only"}],"queueDatas":[{"brokerName":"b","perm":6,"readQueueNums":2,"topicSysFlag":0,"writeQueueNums":3},{"brokerName":"slave-only","perm":6,"readQueueNums":2,"writeQueueNums":2}],"filterServerTable":{}}"#;
        let r = Route::parse("t", raw).unwrap();
        assert_eq!(
            r.masters,
            HashMap::from([("b".into(), "127.0.0.1:10911".into())])
        );
        assert_eq!(
            r.read,
            vec![
                MessageQueue::new("t", "b", 0),
                MessageQueue::new("t", "b", 1)
            ]
        );
        assert_eq!(r.write.len(), 3);
    }

    fn stored(queue_offset: i64, sys_flag: i32, body: &[u8], props: &str, v2: bool) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0i32.to_be_bytes()); // size, set below
        m.extend_from_slice(&(if v2 { MAGIC_V2 } else { MAGIC_V1 }).to_be_bytes());
        m.extend_from_slice(&7i32.to_be_bytes()); // crc
        m.extend_from_slice(&3i32.to_be_bytes()); // queue id
        m.extend_from_slice(&0i32.to_be_bytes()); // flag
        m.extend_from_slice(&queue_offset.to_be_bytes());
        m.extend_from_slice(&1234i64.to_be_bytes()); // physical offset
        m.extend_from_slice(&sys_flag.to_be_bytes());
        m.extend_from_slice(&1_700_000_000_000i64.to_be_bytes()); // born
        let host = |v6: bool| vec![1u8; if v6 { 20 } else { 8 }];
        m.extend_from_slice(&host(sys_flag & FLAG_BORN_HOST_V6 != 0));
        m.extend_from_slice(&1_700_000_000_001i64.to_be_bytes()); // stored
        m.extend_from_slice(&host(sys_flag & FLAG_STORE_HOST_V6 != 0));
        m.extend_from_slice(&0i32.to_be_bytes()); // reconsume
        m.extend_from_slice(&0i64.to_be_bytes()); // prepared
        m.extend_from_slice(&(body.len() as i32).to_be_bytes());
        m.extend_from_slice(body);
        if v2 {
            m.extend_from_slice(&(5i16).to_be_bytes());
        } else {
            m.push(5);
        }
        m.extend_from_slice(b"topic");
        m.extend_from_slice(&(props.len() as i16).to_be_bytes());
        m.extend_from_slice(props.as_bytes());
        let n = m.len() as i32;
        m[..4].copy_from_slice(&n.to_be_bytes());
        m
    }

    #[test]
    fn stored_messages_decode_with_v6_hosts_v2_topics_and_zlib_bodies() {
        let props = encode_properties(&[("mid", "m-1"), ("TAGS", "a")]);
        let mut zipped = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zipped.write_all(b"{\"amount\":10}").unwrap();
        let zipped = zipped.finish().unwrap();
        let mut body = stored(40, 0, b"plain", &props, false);
        body.extend(stored(
            41,
            FLAG_BORN_HOST_V6 | FLAG_STORE_HOST_V6,
            b"v6",
            "",
            true,
        ));
        body.extend(stored(42, FLAG_COMPRESSED | (0x3 << 8), &zipped, "", false));
        body.extend(stored(43, FLAG_COMPRESSED, &zipped, "", false));
        body.extend(stored(
            44,
            FLAG_COMPRESSED | COMPRESSION_ZSTD,
            b"??",
            "",
            false,
        ));
        let msgs = decode_messages(&body).unwrap();
        assert_eq!(msgs.len(), 5);
        assert_eq!(msgs[0].queue_offset, 40);
        assert_eq!(msgs[0].queue_id, 3);
        assert_eq!(msgs[0].born_timestamp, 1_700_000_000_000);
        assert_eq!(msgs[0].body.as_deref(), Ok(&b"plain"[..]));
        assert_eq!(msgs[0].property("mid"), Some("m-1"));
        assert_eq!(msgs[0].property("TAGS"), Some("a"));
        assert_eq!(msgs[1].body.as_deref(), Ok(&b"v6"[..]));
        assert_eq!(msgs[1].queue_offset, 41);
        assert_eq!(msgs[2].body.as_deref(), Ok(&b"{\"amount\":10}"[..]));
        assert_eq!(msgs[3].body.as_deref(), Ok(&b"{\"amount\":10}"[..]));
        assert!(msgs[4].body.as_ref().unwrap_err().contains("zstd"));
        assert_eq!(msgs[4].queue_offset, 44);
        // Cut anywhere, the batch is refused rather than half read.
        assert!(decode_messages(&body[..body.len() - 3]).is_err());
    }

    #[test]
    fn tag_filters_match_the_java_hashes_and_the_exact_tag() {
        assert_eq!(java_hash("a"), 97);
        // Values of Java's "hello".hashCode() and (overflowing) "polygenelubricants".hashCode().
        assert_eq!(java_hash("hello"), 99_162_322);
        assert_eq!(java_hash("polygenelubricants"), i32::MIN);
        let all = TagFilter::parse(" * ");
        assert!(all.accepts(None) && all.accepts(Some("x")));
        assert!(all.codes().is_empty());
        let some = TagFilter::parse("a || b");
        assert_eq!(some.codes(), vec![97, 98]);
        assert!(some.accepts(Some("b")) && !some.accepts(Some("c")) && !some.accepts(None));
    }

    #[test]
    fn allocation_matches_allocate_message_queue_averagely() {
        let qs: Vec<MessageQueue> = (0..5).map(|i| MessageQueue::new("t", "b", i)).collect();
        let cs: Vec<String> = ["c1", "c2"].iter().map(|s| s.to_string()).collect();
        let ids = |s: &[MessageQueue]| s.iter().map(|q| q.queue_id).collect::<Vec<_>>();
        assert_eq!(ids(allocate(&qs, &cs, "c1")), vec![0, 1, 2]);
        assert_eq!(ids(allocate(&qs, &cs, "c2")), vec![3, 4]);
        assert!(allocate(&qs, &cs, "c3").is_empty());
        let many: Vec<String> = (0..7).map(|i| format!("c{i}")).collect();
        let mut seen = Vec::new();
        for c in &many {
            seen.extend(ids(allocate(&qs, &many, c)));
        }
        assert_eq!(
            seen,
            vec![0, 1, 2, 3, 4],
            "each queue once, extra consumers idle"
        );
    }
}
