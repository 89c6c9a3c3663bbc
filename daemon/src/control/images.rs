//! The `Images` service: a volume's content in (import, from a client stream of chunks)
//! and out (export of a volume or snapshot, a server stream that skips holes; incremental
//! since an older snapshot).
//!
//! Import: the first message names the new volume; each chunk is written through a
//! session on the pool's owner reactor and acknowledged once the write completed (written,
//! not flushed: a completed write survives a daemon crash, DESIGN §4) and the import's
//! progress past it is recorded in the state file. Chunks that have already arrived are
//! written first and recorded together (one state-file replacement for up to
//! `IMPORT_ACK_BATCH_CHUNKS`), then acknowledged one by one; `finish` flushes
//! the pool and marks the volume ready. An interrupted import leaves the volume IMPORTING
//! (recorded in the state file) until it is resumed or deleted. With `overwrite` the
//! chunks go into an existing volume instead (the host-side write path until ublk
//! exports exist; its snapshots keep their content by copy-on-write).
//!
//! Export: asks the store which ranges the source maps (`diff(None, source)`) and reads
//! only those; within them, all-zero 4 KiB blocks are left out too. An incremental export
//! (`since_snapshot`) reads only the ranges whose content differs from the older snapshot
//! (`diff(Some(since), source)`) and sends what now reads as zeroes there as `zero`
//! chunks, so applying it over the older image gives the newer one.
//!
//! Must never: acknowledge a chunk before its write completed and the progress past it is
//! recorded; send zero blocks as data;
//! let an export's source (or an import's volume) be deleted under it (its session holds
//! it).

use std::sync::Arc;

use coreblk_proto::v1 as pb;
use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::error::{Error, Result};
use super::server::Shared;
use super::store::{ObjectRef, Session, Store, VolumeInfo};
use super::volumes::{volume_message, volume_spec, VOLUME_BLOCK_BYTES};
use super::MAX_IMAGE_CHUNK_BYTES;

/// Export chunk size when the request says 0.
pub const DEFAULT_EXPORT_CHUNK_BYTES: u32 = 1 << 20;
/// Responses queued towards a slow client before the server waits.
const STREAM_DEPTH: usize = 8;

/// The `Images` service.
#[derive(Debug)]
pub struct ImagesService {
    shared: Arc<Shared>,
}

impl ImagesService {
    /// A service over the daemon's shared state.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn check(&self) -> Result<(), Status> {
        self.shared.check_serving()?;
        self.shared.store.check_ready()?;
        Ok(())
    }
}

fn bad_chunk(reason: String) -> Error {
    Error::InvalidArgument {
        field: "chunk",
        reason,
    }
}

/// The byte ranges of `buf` made of `block`-sized pieces that are not all zero, adjacent
/// pieces coalesced.
#[must_use]
pub fn data_runs(buf: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, b) in buf.chunks(block.max(1)).enumerate() {
        if b.iter().all(|x| *x == 0) {
            continue;
        }
        let (start, end) = (i * block, i * block + b.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Checks one import chunk against the volume and the previous chunk's end; returns the
/// range it covers.
fn check_chunk(c: &pb::ImageChunk, size: u64, prev_end: u64) -> Result<(u64, u64)> {
    if !c.offset_bytes.is_multiple_of(VOLUME_BLOCK_BYTES) {
        return Err(bad_chunk(format!(
            "offset {} is not a multiple of {VOLUME_BLOCK_BYTES}",
            c.offset_bytes
        )));
    }
    if c.offset_bytes < prev_end {
        return Err(bad_chunk(format!(
            "offset {} is below the end of the previous chunk ({prev_end}); send chunks in increasing offset order",
            c.offset_bytes
        )));
    }
    let len = if c.zero {
        if !c.data.is_empty() || !c.length_bytes.is_multiple_of(VOLUME_BLOCK_BYTES) {
            return Err(bad_chunk(format!(
                "a zero chunk carries no data and a length that is a multiple of {VOLUME_BLOCK_BYTES}"
            )));
        }
        c.length_bytes
    } else {
        if c.data.len() > MAX_IMAGE_CHUNK_BYTES {
            return Err(bad_chunk(format!(
                "{} bytes of data; a chunk carries at most {MAX_IMAGE_CHUNK_BYTES}",
                c.data.len()
            )));
        }
        if c.length_bytes != 0 && c.length_bytes != len_u64(c.data.len()) {
            return Err(bad_chunk(format!(
                "length_bytes {} differs from the {} bytes of data",
                c.length_bytes,
                c.data.len()
            )));
        }
        len_u64(c.data.len())
    };
    let end = c.offset_bytes.saturating_add(len);
    if end.next_multiple_of(VOLUME_BLOCK_BYTES) > size {
        return Err(bad_chunk(format!(
            "bytes {}..{end} reach past the volume's {size} bytes",
            c.offset_bytes
        )));
    }
    Ok((c.offset_bytes, end))
}

type ImportTx = mpsc::Sender<Result<pb::ImportImageResponse, Status>>;

fn respond(msg: pb::import_image_response::Msg) -> Result<pb::ImportImageResponse, Status> {
    Ok(pb::ImportImageResponse { msg: Some(msg) })
}

/// Most chunks written ahead of their acknowledgement: chunks that have already arrived
/// are written one after the other and their progress recorded once for all of them (a
/// state-file replacement per chunk cost most of an import of a fragmented image: one
/// chunk per data run), then each is acknowledged.
const IMPORT_ACK_BATCH_CHUNKS: usize = 32;
/// Most bytes written ahead of their acknowledgement (what a kill makes the client resend).
const IMPORT_ACK_BATCH_BYTES: u64 = 8 << 20;

/// Records that the chunks ending at `unacked` are written (the state file replaced once,
/// for the last) and then acknowledges each; false when the client is gone.
async fn record_and_ack(
    store: &Arc<Store>,
    volume: &VolumeInfo,
    tx: &ImportTx,
    unacked: &mut Vec<u64>,
) -> bool {
    let Some(&last) = unacked.last() else {
        return true;
    };
    store.import_progress(volume.uuid, last).await;
    for end in unacked.drain(..) {
        let ack = pb::ImportAck {
            durable_offset_bytes: end,
        };
        if tx
            .send(respond(pb::import_image_response::Msg::Ack(ack)))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// Receives chunks until `finish` (or an error, or the client going away).
async fn run_import(
    store: Arc<Store>,
    v: VolumeInfo,
    session: Session,
    mut incoming: Streaming<pb::ImportImageRequest>,
    tx: ImportTx,
    resume_offset: u64,
) {
    let mut prev_end = resume_offset;
    // Ends of the chunks written but not yet recorded and acknowledged, and their bytes.
    let mut unacked: Vec<u64> = Vec::with_capacity(IMPORT_ACK_BATCH_CHUNKS);
    let mut unacked_bytes = 0u64;
    let result: Result<Option<pb::Volume>> = async {
        loop {
            // With chunks awaiting their ack, take only a message that has already
            // arrived (and only up to the batch limits); else record and ack them first.
            let polled = if unacked.is_empty() {
                Some(incoming.message().await)
            } else if unacked.len() < IMPORT_ACK_BATCH_CHUNKS
                && unacked_bytes < IMPORT_ACK_BATCH_BYTES
            {
                // Cancel safe: the stream keeps its state, a message not yet whole stays
                // for the next call.
                incoming.message().now_or_never()
            } else {
                None
            };
            let is_chunk = matches!(
                &polled,
                Some(Ok(Some(pb::ImportImageRequest {
                    msg: Some(pb::import_image_request::Msg::Chunk(_))
                })))
            );
            if !is_chunk {
                // Whatever comes next (a pause, the end, finish, an error), the chunks
                // written so far are recorded and acknowledged first.
                if !record_and_ack(&store, &v, &tx, &mut unacked).await {
                    return Ok(None);
                }
                unacked_bytes = 0;
            }
            let Some(polled) = polled else {
                continue;
            };
            let msg = match polled {
                Ok(Some(m)) => m.msg,
                Ok(None) => {
                    tracing::warn!(volume = %v.name, durable_offset_bytes = prev_end, "import stream ended without finish; the volume stays importing (resume or delete it)");
                    return Ok(None);
                }
                Err(status) => {
                    tracing::warn!(volume = %v.name, %status, durable_offset_bytes = prev_end, "import stream broke; the volume stays importing (resume or delete it)");
                    // A client still there (it sent a frame that could not be decoded, or
                    // cut one off) learns why instead of seeing the stream end OK; one
                    // that is gone never reads this.
                    let _ = tx
                        .send(Err(Status::new(
                            status.code(),
                            format!(
                                "the import stream broke ({}); volume {} stays importing, written up to byte {prev_end}: resume or delete it",
                                status.message(),
                                v.name
                            ),
                        )))
                        .await;
                    return Ok(None);
                }
            };
            match msg {
                Some(pb::import_image_request::Msg::Chunk(c)) => {
                    let (start, end) = check_chunk(&c, v.size_bytes, prev_end)?;
                    if c.zero {
                        if end > start {
                            session.write_zeroes(start, end - start).await?;
                        }
                    } else if !c.data.is_empty() {
                        let mut data = c.data;
                        let padded = data.len().next_multiple_of(4096);
                        data.resize(padded, 0);
                        session.write(start, data).await?;
                    }
                    prev_end = end;
                    unacked.push(end);
                    unacked_bytes += end - start;
                }
                Some(pb::import_image_request::Msg::Finish(f)) => {
                    if f.expected_size_bytes != 0
                        && (f.expected_size_bytes > v.size_bytes || f.expected_size_bytes < prev_end)
                    {
                        return Err(Error::InvalidArgument {
                            field: "expected_size_bytes",
                            reason: format!(
                                "{} does not fit what was sent (data up to byte {prev_end}) in a volume of {} bytes",
                                f.expected_size_bytes, v.size_bytes
                            ),
                        });
                    }
                    session.flush().await?;
                    store.finish_import(v.uuid).await?;
                    let done = VolumeInfo {
                        importing: false,
                        ..v.clone()
                    };
                    tracing::info!(volume = %v.name, bytes = prev_end, "image imported");
                    return Ok(Some(volume_message(&done)));
                }
                Some(pb::import_image_request::Msg::Start(_)) => {
                    return Err(Error::InvalidArgument {
                        field: "start",
                        reason: "sent twice; `start` is only the first message".to_owned(),
                    })
                }
                None => {
                    return Err(Error::InvalidArgument {
                        field: "msg",
                        reason: "an empty message; send a chunk or finish".to_owned(),
                    })
                }
            }
        }
    }
    .await;
    drop(session);
    let last = match result {
        Ok(Some(vol)) => respond(pb::import_image_response::Msg::Finished(vol)),
        Ok(None) => return,
        Err(e) if v.importing => {
            tracing::warn!(volume = %v.name, error = %e, "import failed; the volume stays importing");
            Err(Error::ImportInterrupted {
                volume: v.name.clone(),
                source: Box::new(e),
            }
            .into())
        }
        Err(e) => {
            tracing::warn!(volume = %v.name, error = %e, "overwrite failed");
            Err(e.into())
        }
    };
    let _ = tx.send(last).await;
}

type ExportTx = mpsc::Sender<Result<pb::ExportImageResponse, Status>>;

async fn send_export(tx: &ExportTx, msg: pb::export_image_response::Msg) -> bool {
    tx.send(Ok(pb::ExportImageResponse { msg: Some(msg) }))
        .await
        .is_ok()
}

/// What one export sends.
#[derive(Debug)]
struct ExportPlan {
    /// Ranges to read, in increasing offset order.
    ranges: Vec<(u64, u64)>,
    /// The older snapshot of an incremental export: all-zero blocks inside `ranges` are
    /// sent as `zero` chunks (they overwrite older data), not left out.
    since: Option<ObjectRef>,
    chunk_bytes: u64,
}

/// Splits `data` (read at `offset`) into chunks: non-zero runs as data; with
/// `send_zeroes`, the all-zero runs between them as `zero` chunks.
fn chunks_of(data: &[u8], offset: u64, send_zeroes: bool) -> Vec<pb::ImageChunk> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let zero = |from: usize, to: usize| pb::ImageChunk {
        offset_bytes: offset + len_u64(from),
        data: Vec::new(),
        zero: true,
        length_bytes: len_u64(to - from),
    };
    for (s, e) in data_runs(data, 4096) {
        if send_zeroes && s > at {
            out.push(zero(at, s));
        }
        out.push(pb::ImageChunk {
            offset_bytes: offset + len_u64(s),
            data: data[s..e].to_vec(),
            zero: false,
            length_bytes: 0,
        });
        at = e;
    }
    if send_zeroes && at < data.len() {
        out.push(zero(at, data.len()));
    }
    out
}

/// Reads the planned ranges chunk by chunk and streams them.
async fn run_export(session: Session, plan: ExportPlan, tx: ExportTx) {
    let v = session.object.clone();
    let header = pb::ExportHeader {
        source_uuid: v.uuid.to_string(),
        size_bytes: v.size_bytes,
        block_size_bytes: 4096,
        since_snapshot_uuid: plan
            .since
            .as_ref()
            .map(|s| s.uuid.to_string())
            .unwrap_or_default(),
    };
    if !send_export(&tx, pb::export_image_response::Msg::Header(header)).await {
        return;
    }
    let mut data_bytes = 0u64;
    for &(start, len) in &plan.ranges {
        let end = start.saturating_add(len).min(v.size_bytes);
        let mut offset = start;
        while offset < end {
            let n = plan.chunk_bytes.min(end - offset);
            let data = match session
                .read(offset, usize::try_from(n).unwrap_or(usize::MAX))
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(object = %v.name, error = %e, "export failed");
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            for chunk in chunks_of(&data, offset, plan.since.is_some()) {
                data_bytes += len_u64(chunk.data.len());
                if !send_export(&tx, pb::export_image_response::Msg::Chunk(chunk)).await {
                    return;
                }
            }
            offset += n;
        }
    }
    let trailer = pb::ExportTrailer { data_bytes };
    let _ = send_export(&tx, pb::export_image_response::Msg::Trailer(trailer)).await;
}

#[tonic::async_trait]
impl pb::images_server::Images for ImagesService {
    type ImportImageStream = ReceiverStream<Result<pb::ImportImageResponse, Status>>;
    type ExportImageStream = ReceiverStream<Result<pb::ExportImageResponse, Status>>;

    async fn import_image(
        &self,
        request: Request<Streaming<pb::ImportImageRequest>>,
    ) -> Result<Response<Self::ImportImageStream>, Status> {
        self.check()?;
        let mut incoming = request.into_inner();
        let start = match incoming.message().await?.and_then(|m| m.msg) {
            Some(pb::import_image_request::Msg::Start(s)) => s,
            _ => {
                return Err(Error::InvalidArgument {
                    field: "start",
                    reason: "the first message of an import must be `start`".to_owned(),
                }
                .into())
            }
        };
        let store = Arc::clone(&self.shared.store);
        let (v, session, resume_offset) = if start.overwrite {
            store
                .begin_overwrite(&start.pool, &start.volume_name, start.size_bytes)
                .await?
        } else {
            let spec = volume_spec(
                start.pool,
                start.volume_name,
                start.size_bytes,
                start.labels,
                None,
            )?;
            store.begin_import(spec, start.resume).await?
        };
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        let started = pb::ImportStarted {
            volume_uuid: v.uuid.to_string(),
            resume_offset_bytes: resume_offset,
        };
        tx.send(respond(pb::import_image_response::Msg::Started(started)))
            .await
            .map_err(|_| Error::Internal("the import stream closed at once".to_owned()))?;
        tracing::info!(volume = %v.name, resume_offset_bytes = resume_offset, "image import started");
        tokio::spawn(run_import(store, v, session, incoming, tx, resume_offset));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn export_image(
        &self,
        request: Request<pb::ExportImageRequest>,
    ) -> Result<Response<Self::ExportImageStream>, Status> {
        self.check()?;
        let r = request.into_inner();
        let store = Arc::clone(&self.shared.store);
        let source = match r.source {
            Some(pb::export_image_request::Source::Volume(v)) => {
                let v = store.volume(&v).await?;
                if v.importing {
                    return Err(Error::InUse {
                        what: "volume",
                        name: v.name,
                        reason:
                            "is being imported; finish (or delete) the import before exporting it"
                                .to_owned(),
                    }
                    .into());
                }
                v.object()
            }
            Some(pb::export_image_request::Source::Snapshot(s)) => {
                store.snapshot(&s).await?.object()
            }
            None => {
                return Err(Error::InvalidArgument {
                    field: "source",
                    reason: "name the volume or snapshot to export".to_owned(),
                }
                .into())
            }
        };
        let since = if r.since_snapshot.is_empty() {
            None
        } else {
            let s = store.snapshot(&r.since_snapshot).await?.object();
            if s.uuid == source.uuid {
                return Err(Error::InvalidArgument {
                    field: "since_snapshot",
                    reason: format!(
                        "{} is the export's source itself; name an older snapshot",
                        s.name
                    ),
                }
                .into());
            }
            Some(s)
        };
        let chunk = if r.max_chunk_bytes == 0 {
            DEFAULT_EXPORT_CHUNK_BYTES
        } else {
            r.max_chunk_bytes
        };
        let max = u32::try_from(MAX_IMAGE_CHUNK_BYTES).unwrap_or(u32::MAX);
        if !(4096..=max).contains(&chunk) {
            return Err(Error::InvalidArgument {
                field: "max_chunk_bytes",
                reason: format!(
                    "{chunk} is not between 4096 and {max} (0: {DEFAULT_EXPORT_CHUNK_BYTES})"
                ),
            }
            .into());
        }
        let chunk_bytes = u64::from(chunk / 4096 * 4096);
        // The session first: it keeps the source from being deleted while the ranges are
        // computed and read.
        let session = store.open_session(&source, false).await?;
        let ranges = store.diff(since.as_ref(), &source).await?;
        let plan = ExportPlan {
            ranges,
            since,
            chunk_bytes,
        };
        tracing::info!(object = %source.name, ranges = plan.ranges.len(), incremental = plan.since.is_some(), "image export started");
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        tokio::spawn(run_export(session, plan, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_skip_zero_blocks_and_coalesce() {
        let mut b = vec![0u8; 5 * 4096];
        b[4096] = 1;
        b[2 * 4096 + 7] = 2;
        b[4 * 4096 + 4095] = 3;
        assert_eq!(
            data_runs(&b, 4096),
            vec![(4096, 3 * 4096), (4 * 4096, 5 * 4096)]
        );
        assert!(data_runs(&[0; 8192], 4096).is_empty());
        assert_eq!(data_runs(&[1; 100], 4096), vec![(0, 100)]);
    }

    #[test]
    fn incremental_chunks_carry_zero_runs() {
        let mut b = vec![0u8; 4 * 4096];
        b[4096] = 1;
        let full = chunks_of(&b, 1 << 20, false);
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].offset_bytes, (1 << 20) + 4096);
        assert_eq!(full[0].data.len(), 4096);
        let inc = chunks_of(&b, 1 << 20, true);
        let shape: Vec<(u64, bool, u64)> = inc
            .iter()
            .map(|c| (c.offset_bytes - (1 << 20), c.zero, c.length_bytes))
            .collect();
        assert_eq!(
            shape,
            vec![(0, true, 4096), (4096, false, 0), (8192, true, 8192)]
        );
        assert_eq!(chunks_of(&[0; 4096], 0, true).len(), 1);
        assert!(chunks_of(&[0; 4096], 0, false).is_empty());
    }

    #[test]
    fn chunks_are_checked() {
        let c = |offset: u64, n: usize| pb::ImageChunk {
            offset_bytes: offset,
            data: vec![1; n],
            zero: false,
            length_bytes: 0,
        };
        assert_eq!(
            check_chunk(&c(4096, 4096), 1 << 20, 0).expect("ok"),
            (4096, 8192)
        );
        // A short last chunk is padded to the block.
        assert_eq!(check_chunk(&c(0, 10), 4096, 0).expect("ok"), (0, 10));
        for (chunk, prev) in [
            (c(1, 4096), 0),
            (c(0, 4096), 4096),
            (c(1 << 20, 4096), 0),
            (c(0, MAX_IMAGE_CHUNK_BYTES + 1), 0),
        ] {
            let e = check_chunk(&chunk, 1 << 20, prev).expect_err("bad");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
    }
}
