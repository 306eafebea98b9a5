//! Zstandard for blobs: compressed as they stream out (ByteStream's
//! `compressed-blobs`), and decompressed as they stream in (those uploads, and
//! blobs an object store keeps compressed).
//!
//! Both directions work a bounded buffer at a time, so neither a large blob nor a
//! small input that expands enormously (a decompression bomb) is ever held whole
//! in memory: the output is cut off the moment it passes the size the digest
//! promises.

use bytes::Bytes;
use futures::StreamExt;
use paddock_reapi::Digest;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::blob::{BlobStream, StoreError};

/// The level blobs are compressed at as they are read: the fastest that still
/// compresses, since it runs on every compressed read.
const LEVEL: i32 = 1;
/// The most output one step produces.
const OUT_CHUNK: usize = 256 * 1024;

/// Why compressed data was refused: the fault of whoever sent or stored it.
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    #[error("the data is not valid zstd: {0}")]
    Corrupt(std::io::Error),
    #[error("the data decompresses to more than the {0} bytes its digest promises")]
    TooLarge(u64),
    #[error("the zstd data ends in the middle of a frame")]
    Truncated,
}

/// The decompression of one stream of zstd frames.
pub struct Decompressor {
    decoder: Decoder<'static>,
    produced: u64,
    limit: u64,
    /// Whether the data so far ends at the end of a frame.
    at_frame_end: bool,
}

impl Decompressor {
    /// A decompression whose output may not pass `limit` bytes.
    pub fn new(limit: u64) -> Result<Decompressor, CompressionError> {
        Ok(Decompressor {
            decoder: Decoder::new().map_err(CompressionError::Corrupt)?,
            produced: 0,
            limit,
            at_frame_end: true,
        })
    }

    /// Decompresses from `input[*consumed..]`, advancing `consumed`, into at most
    /// one chunk of output; `None` once the input is used up and nothing is left to
    /// put out.
    pub fn step(
        &mut self,
        input: &[u8],
        consumed: &mut usize,
    ) -> Result<Option<Bytes>, CompressionError> {
        let mut out = vec![0u8; OUT_CHUNK];
        let mut source = InBuffer::around(&input[*consumed..]);
        let mut sink = OutBuffer::around(&mut out[..]);
        let hint = self
            .decoder
            .run(&mut source, &mut sink)
            .map_err(CompressionError::Corrupt)?;
        let (read, written) = (source.pos(), sink.pos());
        *consumed += read;
        if read > 0 || written > 0 {
            self.at_frame_end = hint == 0;
        }
        if written == 0 {
            return Ok(None);
        }
        self.produced += written as u64;
        if self.produced > self.limit {
            return Err(CompressionError::TooLarge(self.limit));
        }
        out.truncate(written);
        Ok(Some(Bytes::from(out)))
    }

    /// Checks that the upload ended where a frame does.
    pub fn finish(&self) -> Result<(), CompressionError> {
        match self.at_frame_end {
            true => Ok(()),
            false => Err(CompressionError::Truncated),
        }
    }
}

/// A stream of zstd frames decompressed as it arrives, checked to hold `digest`'s
/// size exactly; a store's damaged object fails the stream with
/// [`StoreError::Corrupt`].
pub fn decompress(source: BlobStream, digest: Digest) -> BlobStream {
    struct State {
        source: BlobStream,
        decompressor: Decompressor,
        input: Bytes,
        at: usize,
        ended: bool,
    }
    let corrupt = move |e: CompressionError| {
        tracing::error!(%digest, error = %e, "a compressed blob in the store does not decompress");
        StoreError::Corrupt(digest)
    };
    let decompressor = match Decompressor::new(digest.size()) {
        Ok(d) => d,
        Err(e) => return futures::stream::once(async move { Err(corrupt(e)) }).boxed(),
    };
    let state = State {
        source,
        decompressor,
        input: Bytes::new(),
        at: 0,
        ended: false,
    };
    futures::stream::unfold(state, move |mut state| async move {
        loop {
            if state.ended {
                return None;
            }
            match state.decompressor.step(&state.input, &mut state.at) {
                Err(e) => {
                    state.ended = true;
                    return Some((Err(corrupt(e)), state));
                }
                Ok(Some(piece)) => return Some((Ok(piece), state)),
                Ok(None) => match state.source.next().await {
                    Some(Ok(chunk)) => (state.input, state.at) = (chunk, 0),
                    Some(Err(e)) => {
                        state.ended = true;
                        return Some((Err(e), state));
                    }
                    None => {
                        state.ended = true;
                        let whole = state.decompressor.produced == digest.size();
                        if let Err(e) = state.decompressor.finish() {
                            return Some((Err(corrupt(e)), state));
                        }
                        if !whole {
                            return Some((Err(corrupt(CompressionError::Truncated)), state));
                        }
                        return None;
                    }
                },
            }
        }
    })
    .boxed()
}

/// A blob's bytes, compressed as one zstd frame as they stream.
pub fn compress(source: BlobStream) -> BlobStream {
    struct State {
        source: BlobStream,
        encoder: Option<Encoder<'static>>,
    }
    let encoder = Encoder::new(LEVEL).ok();
    futures::stream::unfold(State { source, encoder }, |mut state| async move {
        let encoder = state.encoder.as_mut()?;
        loop {
            let mut out = vec![0u8; OUT_CHUNK];
            let written = match state.source.next().await {
                Some(Ok(chunk)) => {
                    let mut written = Vec::new();
                    let mut input = InBuffer::around(&chunk);
                    while input.pos() < chunk.len() {
                        let mut sink = OutBuffer::around(&mut out[..]);
                        if let Err(e) = encoder.run(&mut input, &mut sink) {
                            state.encoder = None;
                            return Some((Err(StoreError::Io(e)), state));
                        }
                        let n = sink.pos();
                        written.extend_from_slice(&out[..n]);
                    }
                    written
                }
                Some(Err(e)) => {
                    state.encoder = None;
                    return Some((Err(e), state));
                }
                None => {
                    let mut written = Vec::new();
                    loop {
                        let mut sink = OutBuffer::around(&mut out[..]);
                        let left = match encoder.finish(&mut sink, true) {
                            Ok(left) => left,
                            Err(e) => {
                                state.encoder = None;
                                return Some((Err(StoreError::Io(e)), state));
                            }
                        };
                        let n = sink.pos();
                        written.extend_from_slice(&out[..n]);
                        if left == 0 {
                            break;
                        }
                    }
                    state.encoder = None;
                    return Some((Ok(Bytes::from(written)), state));
                }
            };
            if !written.is_empty() {
                return Some((Ok(Bytes::from(written)), state));
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decompress_all(data: &[u8], limit: u64) -> Result<Vec<u8>, CompressionError> {
        let mut d = Decompressor::new(limit)?;
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(piece) = d.step(data, &mut at)? {
            out.extend_from_slice(&piece);
        }
        d.finish()?;
        Ok(out)
    }

    #[tokio::test]
    async fn round_trips_in_chunks() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<Result<Bytes, StoreError>> = data
            .chunks(100_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let compressed: Vec<u8> = compress(futures::stream::iter(chunks).boxed())
            .map(|c| c.unwrap())
            .collect::<Vec<Bytes>>()
            .await
            .concat();
        assert!(compressed.len() < data.len() / 10);
        assert_eq!(
            decompress_all(&compressed, data.len() as u64).unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn refuses_bombs_truncation_and_garbage() {
        let zeros = vec![0u8; 50 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        assert!(matches!(
            decompress_all(&bomb, 1 << 20),
            Err(CompressionError::TooLarge(_))
        ));
        let small = zstd::bulk::compress(b"hello, hello, hello", 3).unwrap();
        assert!(matches!(
            decompress_all(&small[..small.len() - 2], 100),
            Err(CompressionError::Truncated)
        ));
        assert!(matches!(
            decompress_all(b"not zstd at all", 100),
            Err(CompressionError::Corrupt(_))
        ));
    }
}
