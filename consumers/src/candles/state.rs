//! The candles state on its compacted topic, as records: pure, no I/O.
//!
//! A trades partition's snapshot can be larger than any Kafka message (the
//! state of 5,000 symbols is megabytes), so it is stored in chunks of at most
//! [`CHUNK`] bytes, keyed `trades-<p>/<generation>/<i>`, and a head keyed
//! `trades-<p>` that names the input position, the generation and the chunk
//! count. The chunks are acknowledged before the head is written, so a head
//! always finds its chunks; the previous generation's chunks are deleted with
//! tombstones after the new head is acknowledged. A tombstone on the head
//! starts the partition over (the re-baseline). Heads written by earlier
//! releases (the position and the whole snapshot in one value) are still read.

use std::collections::HashMap;

/// The largest chunk of a snapshot in one record: far below the 1 MB a
/// broker takes by default.
pub const CHUNK: usize = 256 * 1024;

/// First byte of a head of this format. An earlier release's head starts with
/// its position as a big-endian `i64`, whose first byte is never `0xFF` for a
/// position (positions are not negative).
const HEAD: u8 = 0xFF;
const HEAD_LEN: usize = 1 + 8 + 8 + 4;

/// The key of a trades partition's head.
pub fn head_key(partition: i32) -> String {
    format!("trades-{partition}")
}

fn chunk_key(partition: i32, generation: u64, i: u32) -> String {
    format!("trades-{partition}/{generation}/{i}")
}

/// Which generation of a partition's state was written last, and in how
/// many chunks: what the next write deletes once its own head is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generation {
    pub generation: u64,
    pub chunks: u32,
}

/// The records that store one partition's snapshot, in the order they must
/// be acknowledged: `chunks`, then `head`, then the tombstones `obsolete`.
#[derive(Debug, PartialEq)]
pub struct Write {
    pub chunks: Vec<(String, Vec<u8>)>,
    pub head: (String, Vec<u8>),
    pub obsolete: Vec<String>,
    /// What this write leaves stored, for the next one.
    pub stored: Generation,
}

/// The records storing `snapshot` of `partition` at input position `next`,
/// after `previous` (the generation stored before, if any).
pub fn write(partition: i32, next: i64, snapshot: &[u8], previous: Option<Generation>) -> Write {
    let generation = previous.map_or(1, |p| p.generation + 1);
    let chunks: Vec<(String, Vec<u8>)> = snapshot
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| (chunk_key(partition, generation, i as u32), c.to_vec()))
        .collect();
    let count = chunks.len() as u32;
    let mut head = Vec::with_capacity(HEAD_LEN);
    head.push(HEAD);
    head.extend_from_slice(&next.to_be_bytes());
    head.extend_from_slice(&generation.to_be_bytes());
    head.extend_from_slice(&count.to_be_bytes());
    let obsolete = previous
        .map(|p| (0..p.chunks).map(|i| chunk_key(partition, p.generation, i)).collect())
        .unwrap_or_default();
    Write {
        chunks,
        head: (head_key(partition), head),
        obsolete,
        stored: Generation {
            generation,
            chunks: count,
        },
    }
}

/// A partition's state as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The next input offset the snapshot has not seen.
    pub next: i64,
    pub snapshot: Vec<u8>,
    pub generation: Generation,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    next: i64,
    generation: u64,
    chunks: u32,
}

/// Reads the state topic's records in order and assembles the newest state
/// of each trades partition.
#[derive(Debug, Default)]
pub struct Reader {
    heads: HashMap<i32, Head>,
    legacy: HashMap<i32, (i64, Vec<u8>)>,
    chunks: HashMap<(i32, u64, u32), Vec<u8>>,
}

enum Key {
    Head(i32),
    Chunk(i32, u64, u32),
}

fn parse_key(key: &[u8]) -> Option<Key> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix("trades-")?;
    let mut parts = rest.split('/');
    let partition = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some(Key::Head(partition)),
        (Some(g), Some(i), None) => Some(Key::Chunk(partition, g.parse().ok()?, i.parse().ok()?)),
        _ => None,
    }
}

impl Reader {
    /// One record of the state topic; `value` is `None` for a tombstone.
    /// Records with other keys are ignored.
    pub fn record(&mut self, key: &[u8], value: Option<&[u8]>) {
        match (parse_key(key), value) {
            (Some(Key::Head(p)), None) => {
                self.heads.remove(&p);
                self.legacy.remove(&p);
            }
            (Some(Key::Head(p)), Some(v)) if v.len() == HEAD_LEN && v[0] == HEAD => {
                let be8 = |at: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&v[at..at + 8]);
                    b
                };
                let mut count = [0u8; 4];
                count.copy_from_slice(&v[17..21]);
                self.legacy.remove(&p);
                self.heads.insert(
                    p,
                    Head {
                        next: i64::from_be_bytes(be8(1)),
                        generation: u64::from_be_bytes(be8(9)),
                        chunks: u32::from_be_bytes(count),
                    },
                );
            }
            (Some(Key::Head(p)), Some(v)) if v.len() >= 8 && v[0] != HEAD => {
                let mut off = [0u8; 8];
                off.copy_from_slice(&v[..8]);
                self.heads.remove(&p);
                self.legacy.insert(p, (i64::from_be_bytes(off), v[8..].to_vec()));
            }
            (Some(Key::Chunk(p, g, i)), None) => {
                self.chunks.remove(&(p, g, i));
            }
            (Some(Key::Chunk(p, g, i)), Some(v)) => {
                self.chunks.insert((p, g, i), v.to_vec());
            }
            _ => {}
        }
    }

    /// The state of every partition with a head, and the keys of chunks no
    /// head names (left by a write that stopped before its head), to delete.
    /// Fails when a head's chunk is missing, saying how to start over.
    pub fn finish(mut self, topic: &str) -> Result<(HashMap<i32, Stored>, Vec<String>), String> {
        let mut states = HashMap::new();
        for (p, (next, snapshot)) in self.legacy {
            states.insert(
                p,
                Stored {
                    next,
                    snapshot,
                    generation: Generation::default(),
                },
            );
        }
        for (p, head) in self.heads {
            let mut snapshot = Vec::new();
            for i in 0..head.chunks {
                let chunk = self.chunks.remove(&(p, head.generation, i)).ok_or_else(|| {
                    format!(
                        "the state of trades partition {p} lacks chunk {i} of generation {}: publish a tombstone \
                         (key trades-{p}, no value) to {topic} to start the partition over",
                        head.generation
                    )
                })?;
                snapshot.extend_from_slice(&chunk);
            }
            states.insert(
                p,
                Stored {
                    next: head.next,
                    snapshot,
                    generation: Generation {
                        generation: head.generation,
                        chunks: head.chunks,
                    },
                },
            );
        }
        let mut orphans: Vec<String> = self.chunks.into_keys().map(|(p, g, i)| chunk_key(p, g, i)).collect();
        orphans.sort();
        Ok((states, orphans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(records: &[(String, Option<Vec<u8>>)]) -> Result<(HashMap<i32, Stored>, Vec<String>), String> {
        let mut r = Reader::default();
        for (k, v) in records {
            r.record(k.as_bytes(), v.as_deref());
        }
        r.finish("candles-state")
    }

    fn records(w: &Write) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out: Vec<_> = w.chunks.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect();
        out.push((w.head.0.clone(), Some(w.head.1.clone())));
        out.extend(w.obsolete.iter().map(|k| (k.clone(), None)));
        out
    }

    #[test]
    fn a_large_snapshot_is_chunked_and_read_back_whole() {
        let snapshot: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| i as u8).collect();
        let w = write(2, 6106, &snapshot, None);
        assert_eq!(w.chunks.len(), 4);
        assert!(w.chunks.iter().all(|(_, c)| c.len() <= CHUNK));
        assert_eq!(w.head.0, "trades-2");
        let (states, orphans) = read(&records(&w)).unwrap();
        assert_eq!(states[&2].next, 6106);
        assert_eq!(states[&2].snapshot, snapshot);
        assert_eq!(
            states[&2].generation,
            Generation {
                generation: 1,
                chunks: 4
            }
        );
        assert!(orphans.is_empty());
    }

    #[test]
    fn a_newer_generation_replaces_and_deletes_the_older() {
        let first = write(0, 10, &vec![1; CHUNK * 2], None);
        let second = write(0, 20, b"small", Some(first.stored));
        assert_eq!(second.obsolete, vec!["trades-0/1/0", "trades-0/1/1"]);
        let mut log = records(&first);
        log.extend(records(&second));
        let (states, orphans) = read(&log).unwrap();
        assert_eq!((states[&0].next, states[&0].snapshot.as_slice()), (20, &b"small"[..]));
        assert!(orphans.is_empty());
    }

    #[test]
    fn a_write_cut_before_its_head_leaves_the_older_state_and_orphans() {
        let first = write(0, 10, b"old", None);
        let second = write(0, 20, b"new", Some(first.stored));
        let mut log = records(&first);
        log.extend(second.chunks.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
        let (states, orphans) = read(&log).unwrap();
        assert_eq!((states[&0].next, states[&0].snapshot.as_slice()), (10, &b"old"[..]));
        assert_eq!(orphans, vec!["trades-0/2/0"]);
    }

    #[test]
    fn a_head_tombstone_starts_over_and_an_earlier_release_head_is_read() {
        let mut legacy = 42_i64.to_be_bytes().to_vec();
        legacy.extend_from_slice(b"{\"json\":1}");
        let (states, _) = read(&[("trades-1".into(), Some(legacy.clone()))]).unwrap();
        assert_eq!(
            (states[&1].next, states[&1].snapshot.as_slice()),
            (42, &b"{\"json\":1}"[..])
        );
        let (states, _) = read(&[("trades-1".into(), Some(legacy)), ("trades-1".into(), None)]).unwrap();
        assert!(states.is_empty());
        // Other keys are not ours.
        let (states, orphans) = read(&[("x".into(), Some(vec![1])), ("trades-1/x/0".into(), Some(vec![1]))]).unwrap();
        assert!(states.is_empty() && orphans.is_empty());
    }

    #[test]
    fn a_missing_chunk_is_an_error_that_says_how_to_start_over() {
        let w = write(3, 10, &vec![0; CHUNK + 1], None);
        let log: Vec<_> = records(&w).into_iter().filter(|(k, _)| k != "trades-3/1/1").collect();
        let err = read(&log).unwrap_err();
        assert!(err.contains("lacks chunk 1 of generation 1"), "{err}");
        assert!(
            err.contains("tombstone (key trades-3, no value) to candles-state"),
            "{err}"
        );
    }
}
