//! A RocketMQ message body as the pipeline gets it: uncompressed here, never by the client
//! (whose inflation has no size limit), and never larger than `pipeline.max_message_bytes`,
//! checked on the stored bytes before anything is inflated and again while inflating.
//!
//! Producers compress with zlib (the Java default, and the only codec before RocketMQ 5), zstd
//! or LZ4. LZ4 comes in two layouts: the Java client writes the LZ4 *frame* format
//! (`LZ4FrameOutputStream`), rocketmq-client-rust a *block* with its length in front
//! (`lz4_flex::block::compress_prepend_size`). A frame starts with the magic number
//! `04 22 4D 18`; read as a block's length that would be 407,708,164 bytes, above any allowed
//! `max_message_bytes`, so the two cannot be confused.

use std::io::Read;

use rocketmq_model::common::sys_flag::message_sys_flag::MessageSysFlag;

use crate::message::BadInput;

/// The LZ4 frame format's magic number, as the first four bytes of a frame.
const LZ4_FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4D, 0x18];

/// The codec a message's system flag names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// zlib (deflate with the zlib header); also any compressed body without a codec in its
    /// flag (RocketMQ 4.x producers).
    Zlib,
    /// zstd.
    Zstd,
    /// LZ4, frame or size-prefixed block.
    Lz4,
}

impl Codec {
    /// The codec of a body with this system flag; `None` if it is not compressed.
    pub fn of(sys_flag: i32) -> Result<Option<Codec>, BadInput> {
        if sys_flag & MessageSysFlag::COMPRESSED_FLAG == 0 {
            return Ok(None);
        }
        match (sys_flag & MessageSysFlag::COMPRESSION_TYPE_COMPARATOR) >> 8 {
            0 | 3 => Ok(Some(Codec::Zlib)),
            1 => Ok(Some(Codec::Lz4)),
            2 => Ok(Some(Codec::Zstd)),
            other => Err(BadInput(format!(
                "body is compressed with an unknown codec (compression type {other} in the \
                 system flag {sys_flag:#x})"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::Zlib => "zlib",
            Codec::Zstd => "zstd",
            Codec::Lz4 => "LZ4",
        }
    }
}

/// The body of a message with system flag `sys_flag`, as stored in `raw`, ready for the
/// pipeline; or why it cannot be handed on. At most `max` bytes are ever allocated for it.
pub fn read(sys_flag: i32, raw: &[u8], max: usize) -> Result<Vec<u8>, BadInput> {
    if raw.len() > max {
        return Err(over(raw.len(), max));
    }
    let Some(codec) = Codec::of(sys_flag)? else {
        return Ok(raw.to_vec());
    };
    let bad = |e: &dyn std::fmt::Display| {
        BadInput(format!(
            "{} body of {} bytes cannot be uncompressed: {e}",
            codec.name(),
            raw.len()
        ))
    };
    match codec {
        Codec::Zlib => bounded(flate2::read::ZlibDecoder::new(raw), max).map_err(|e| match e {
            Bounded::Over => over_uncompressed(codec, max),
            Bounded::Io(e) => bad(&e),
        }),
        Codec::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(raw).map_err(|e| bad(&e))?;
            // A frame may ask for a window (a buffer) of up to 2 GiB. Streaming producers
            // (the Java client's ZstdOutputStream) do not declare the content size, so the
            // window follows the level: up to 8 MiB through level 19. Allow that, or `max` if
            // larger, and no more.
            decoder
                .window_log_max(window_log(max))
                .map_err(|e| bad(&e))?;
            bounded(decoder, max).map_err(|e| match e {
                Bounded::Over => over_uncompressed(codec, max),
                Bounded::Io(e) => bad(&e),
            })
        }
        Codec::Lz4 if raw.starts_with(&LZ4_FRAME_MAGIC) => {
            bounded(lz4_flex::frame::FrameDecoder::new(raw), max).map_err(|e| match e {
                Bounded::Over => over_uncompressed(codec, max),
                Bounded::Io(e) => bad(&e),
            })
        }
        Codec::Lz4 => {
            let Some((len, block)) = raw.split_first_chunk::<4>() else {
                return Err(bad(&"shorter than the 4-byte length of an LZ4 block"));
            };
            // The length comes first: checked before a byte is allocated for it.
            let len = u32::from_le_bytes(*len) as usize;
            if len > max {
                return Err(BadInput(format!(
                    "body of {len} bytes once uncompressed (LZ4) is over \
                     pipeline.max_message_bytes = {max}"
                )));
            }
            lz4_flex::block::decompress(block, len).map_err(|e| bad(&e))
        }
    }
}

fn over(len: usize, max: usize) -> BadInput {
    BadInput(format!(
        "body of {len} bytes is over pipeline.max_message_bytes = {max}"
    ))
}

fn over_uncompressed(codec: Codec, max: usize) -> BadInput {
    BadInput(format!(
        "body of more than {max} bytes once uncompressed ({}) is over \
         pipeline.max_message_bytes = {max}",
        codec.name()
    ))
}

enum Bounded {
    Over,
    Io(std::io::Error),
}

/// Reads `r` to its end, but never more than `max` bytes: one byte past it is an error.
fn bounded(r: impl Read, max: usize) -> Result<Vec<u8>, Bounded> {
    let mut out = Vec::new();
    r.take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(Bounded::Io)?;
    if out.len() > max {
        return Err(Bounded::Over);
    }
    Ok(out)
}

/// The zstd window log a body of at most `max` bytes may use: the smallest that covers `max`,
/// but at least 23 (8 MiB, the largest window of compression levels up to 19).
fn window_log(max: usize) -> u32 {
    (usize::BITS - max.saturating_sub(1).leading_zeros()).clamp(23, 31)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const ZLIB: i32 = MessageSysFlag::COMPRESSED_FLAG | MessageSysFlag::COMPRESSION_ZLIB_TYPE;
    const ZSTD: i32 = MessageSysFlag::COMPRESSED_FLAG | MessageSysFlag::COMPRESSION_ZSTD_TYPE;
    const LZ4: i32 = MessageSysFlag::COMPRESSED_FLAG | MessageSysFlag::COMPRESSION_LZ4_TYPE;

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"reward-"[i % 7]).collect()
    }

    fn zlib(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn lz4_frame(b: &[u8]) -> Vec<u8> {
        let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_codec_producers_use_comes_back_intact() {
        let body = text(10_000);
        let cases = [
            ("plain", 0, body.clone()),
            ("zlib", ZLIB, zlib(&body)),
            // RocketMQ 4.x: the compressed flag without a codec means zlib.
            ("zlib 4.x", MessageSysFlag::COMPRESSED_FLAG, zlib(&body)),
            ("zstd", ZSTD, zstd::encode_all(&body[..], 5).unwrap()),
            ("lz4 frame (Java)", LZ4, lz4_frame(&body)),
            (
                "lz4 block (rocketmq-client-rust)",
                LZ4,
                lz4_flex::block::compress_prepend_size(&body),
            ),
        ];
        for (what, flag, raw) in cases {
            assert_eq!(
                read(flag, &raw, 1 << 20).as_deref(),
                Ok(&body[..]),
                "{what}"
            );
        }
    }

    #[test]
    fn a_stored_body_over_the_limit_is_refused_before_anything_is_inflated() {
        let e = read(ZLIB, &[0u8; 2048], 1024).unwrap_err();
        assert_eq!(
            e.0,
            "body of 2048 bytes is over pipeline.max_message_bytes = 1024"
        );
        assert_eq!(
            read(0, &[7u8; 1024], 1024).unwrap().len(),
            1024,
            "at the limit"
        );
    }

    #[test]
    fn bodies_that_inflate_past_the_limit_are_refused_without_inflating_them() {
        // About a thousandfold: 4 MiB of zeros in a few KiB.
        let zeros = vec![0u8; 4 << 20];
        let max = 64 * 1024;
        for (what, flag, raw) in [
            ("zlib", ZLIB, zlib(&zeros)),
            ("zstd", ZSTD, zstd::encode_all(&zeros[..], 3).unwrap()),
            ("lz4 frame", LZ4, lz4_frame(&zeros)),
        ] {
            assert!(raw.len() < max, "{what}: {} bytes stored", raw.len());
            let e = read(flag, &raw, max).unwrap_err();
            assert!(
                e.0.starts_with(&format!("body of more than {max} bytes once uncompressed")),
                "{what}: {e}"
            );
        }
        // An LZ4 block declares its size first: refused on the declaration, even a false one.
        let mut block = lz4_flex::block::compress_prepend_size(&zeros[..10]);
        block[..4].copy_from_slice(&(3u32 << 30).to_le_bytes());
        assert_eq!(
            read(LZ4, &block, max).unwrap_err().0,
            format!(
                "body of {} bytes once uncompressed (LZ4) is over pipeline.max_message_bytes = {max}",
                3u32 << 30
            )
        );
    }

    #[test]
    fn a_body_that_does_not_uncompress_says_why() {
        for (flag, codec, raw) in [
            (ZLIB, "zlib", &b"not compressed at all"[..]),
            (ZSTD, "zstd", b"not compressed at all"),
            // A block that declares 16 bytes and holds no LZ4 sequence.
            (LZ4, "LZ4", b"\x10\x00\x00\x00\xff\xff\xff\xff not lz4"),
            (LZ4, "LZ4", b"\x01\x00"),
        ] {
            let e = read(flag, raw, 1024).unwrap_err();
            assert!(
                e.0.starts_with(&format!(
                    "{codec} body of {} bytes cannot be uncompressed: ",
                    raw.len()
                )),
                "{e}"
            );
        }
        let e = read(MessageSysFlag::COMPRESSED_FLAG | (5 << 8), b"x", 1024).unwrap_err();
        assert!(e.0.contains("unknown codec (compression type 5"), "{e}");
    }

    #[test]
    fn zstd_windows_cover_the_limit_and_every_level_up_to_19() {
        assert_eq!(window_log(1024), 23);
        assert_eq!(window_log(8 << 20), 23);
        assert_eq!(window_log((8 << 20) + 1), 24);
        assert_eq!(window_log(256 << 20), 28);
        // Level 19 on a body larger than its window, read with a small limit: not refused for
        // its window, only for its size.
        let body = text(200_000);
        let raw = zstd::encode_all(&body[..], 19).unwrap();
        assert_eq!(read(ZSTD, &raw, 1 << 20).unwrap(), body);
    }
}
