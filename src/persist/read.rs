//! How a round reads the streams. On a single Redis, one `XREADGROUP` names every
//! event's stream and blocks until a sale arrives. Redis in cluster mode refuses a
//! command whose keys hash to different slots, and every event has a slot of its own
//! (its hash tag), so there each stream is read by a command of its own, pipelined,
//! without blocking; when none had anything, the round waits [`POLL_DIVISOR`]th of
//! `BOXOFFICE_CONSUMER_BLOCK_MS` before the next (a sale after a quiet spell reaches
//! PostgreSQL up to that much later).

use std::time::Duration;

use deadpool_redis::redis::streams::{StreamKey, StreamReadOptions, StreamReadReply};
use deadpool_redis::redis::{self, AsyncCommands};

use super::{CONSUMER_GROUP, Connection, Consumer, Cursor};
use crate::error::Result;
use crate::gate::memory::info_field;

/// Streams read per round trip on a cluster.
const PER_PIPELINE: usize = 256;
/// A quiet cluster is polled every `consumer_block_ms / POLL_DIVISOR`, and never
/// more often than every `MIN_POLL_MS`.
const POLL_DIVISOR: u64 = 4;
const MIN_POLL_MS: u64 = 10;

impl Consumer {
    /// Reads and persists one batch from every stream; returns the longest batch.
    pub(super) async fn read(&self, conn: &mut Connection, cursor: &mut Cursor) -> Result<usize> {
        let per_stream = match cursor.per_stream {
            Some(per_stream) => per_stream,
            None => *cursor.per_stream.insert(cluster_enabled(conn).await?),
        };
        let read = if per_stream {
            self.read_each(conn, cursor).await
        } else {
            self.read_all(conn, cursor).await
        };
        // A stream deleted by hand loses its group (NOGROUP): the error resets the
        // cursor (`Consumer::run`), and the next round creates the group again.
        let streams = read?;
        let longest = streams.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let deferred = self
            .persist_round(conn, streams, &mut cursor.untrimmed)
            .await?;
        if deferred {
            // Left pending for this consumer: read again from its pending entries.
            cursor.backlog = true;
            return Ok(longest);
        }
        if cursor.backlog && longest == 0 {
            cursor.backlog = false;
        }
        Ok(longest)
    }

    /// The entries to read now: this consumer's pending ones (`0`) while catching up,
    /// else new ones (`>`).
    fn options(&self, cursor: &Cursor) -> (StreamReadOptions, &'static str) {
        let options = StreamReadOptions::default()
            .group(CONSUMER_GROUP, &self.name)
            .count(self.config.consumer_batch);
        if cursor.backlog {
            (options, "0")
        } else {
            (options, ">")
        }
    }

    /// One command naming every stream, blocking while none has anything new.
    async fn read_all(&self, conn: &mut Connection, cursor: &Cursor) -> Result<Vec<StreamKey>> {
        let (mut options, from) = self.options(cursor);
        if !cursor.backlog {
            options = options.block(self.config.consumer_block_ms as usize);
        }
        let ids = vec![from; cursor.streams.len()];
        let reply: Option<StreamReadReply> =
            conn.xread_options(&cursor.streams, &ids, &options).await?;
        Ok(reply.map(|r| r.keys).unwrap_or_default())
    }

    /// A command per stream, [`PER_PIPELINE`] to a round trip; waits a while when
    /// none had anything new.
    async fn read_each(&self, conn: &mut Connection, cursor: &Cursor) -> Result<Vec<StreamKey>> {
        let (options, from) = self.options(cursor);
        let mut found = Vec::new();
        for chunk in cursor.streams.chunks(PER_PIPELINE) {
            let reads: Vec<redis::Cmd> = chunk
                .iter()
                .map(|stream| redis::Cmd::xread_options(&[stream], &[from], &options))
                .collect();
            for (stream, reply) in chunk.iter().zip(conn.query_each(&reads).await?) {
                let reply = match reply {
                    // Deleted by hand with its group: the next round makes both again.
                    Err(e) if e.code() == Some("NOGROUP") => return Err(e.into()),
                    Err(e) => {
                        super::stream_unreachable(stream, &e);
                        continue;
                    }
                    Ok(reply) => reply,
                };
                let reply: Option<StreamReadReply> = redis::from_redis_value(reply)?;
                found.extend(reply.into_iter().flat_map(|r| r.keys));
            }
        }
        found.retain(|stream| !stream.ids.is_empty());
        if found.is_empty() && !cursor.backlog {
            let poll = (self.config.consumer_block_ms / POLL_DIVISOR).max(MIN_POLL_MS);
            tokio::time::sleep(Duration::from_millis(poll)).await;
        }
        Ok(found)
    }
}

/// Whether the server runs in cluster mode: a cluster connection, or one node of a
/// cluster (one that holds every slot) named as a single server (`INFO cluster`).
async fn cluster_enabled(conn: &mut Connection) -> Result<bool> {
    if conn.is_cluster() {
        return Ok(true);
    }
    let info: String = redis::cmd("INFO").arg("cluster").query_async(conn).await?;
    Ok(info_field(&info, "cluster_enabled") == Some("1"))
}
