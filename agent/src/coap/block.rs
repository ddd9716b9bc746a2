//! Block-wise transfer (RFC 7959) without I/O: the Block1/Block2 option
//! value, and reassembly of Block1 request bodies.
//!
//! Block numbers are 20 bits here (coap-lite's `BlockValue` keeps 16, i.e.
//! at most 65 535 blocks: too few for firmware at small block sizes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A Block1/Block2 option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Block number.
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent: the block is 2^(szx+4) bytes (0..=6).
    pub szx: u8,
}

impl Block {
    /// Block size in bytes.
    pub fn size(self) -> usize {
        16usize << self.szx
    }

    /// Decodes an option value (0–3 bytes, big-endian); `None` when it is
    /// malformed (over 3 bytes, or the reserved SZX 7).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > 3 {
            return None;
        }
        let v = bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        let szx = (v & 0x7) as u8;
        if szx == 7 {
            return None;
        }
        Some(Self {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx,
        })
    }

    /// Encodes the option value in as few bytes as possible.
    pub fn encode(self) -> Vec<u8> {
        let v = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx & 0x7);
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        bytes[skip..].to_vec()
    }

    /// The SZX of the largest block not over `bytes` (at least 16, at most
    /// 1024).
    pub fn szx_for(bytes: usize) -> u8 {
        let mut szx = 6u8;
        while szx > 0 && (16usize << szx) > bytes {
            szx -= 1;
        }
        szx
    }
}

/// The slice `(offset, len, more)` of a body of `total` bytes that Block2
/// block `num` of size 2^(szx+4) covers; `None` past the end (4.02 / 4.00
/// territory for the caller).
pub fn block2_range(total: u64, num: u32, szx: u8) -> Option<(u64, u64, bool)> {
    let size = 16u64 << szx;
    let offset = u64::from(num).checked_mul(size)?;
    if offset >= total && !(total == 0 && num == 0) {
        return None;
    }
    let len = size.min(total - offset);
    Some((offset, len, offset + len < total))
}

/// Why a Block1 transfer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block1Error {
    /// The body would exceed the limit (4.13 with Size1).
    TooLarge,
    /// A block out of sequence, or a later block without the first
    /// (4.08 Request Entity Incomplete).
    Incomplete,
}

/// What a Block1 request block leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Block1Step {
    /// More blocks expected: answer 2.31 Continue echoing the option.
    Continue,
    /// The body is complete.
    Complete(Vec<u8>),
}

struct Assembly {
    body: Vec<u8>,
    next: u32,
    szx: u8,
    at: Instant,
}

/// Block1 bodies being reassembled, per (endpoint, path).
pub struct Block1Assembler {
    max_body: usize,
    max_assemblies: usize,
    idle: Duration,
    open: HashMap<(SocketAddr, String), Assembly>,
}

impl Block1Assembler {
    /// Bodies up to `max_body` bytes; at most `max_assemblies` open at once
    /// (the oldest is dropped past it); an assembly idle for `idle` is
    /// dropped.
    pub fn new(max_body: usize, max_assemblies: usize, idle: Duration) -> Self {
        Self {
            max_body,
            max_assemblies: max_assemblies.max(1),
            idle,
            open: HashMap::new(),
        }
    }

    /// Takes block `b` of the body for `path` from `peer`.
    ///
    /// Fails with `TooLarge` past the body limit, `Incomplete` on a gap.
    pub fn take(
        &mut self,
        peer: SocketAddr,
        path: &str,
        b: Block,
        payload: &[u8],
        now: Instant,
    ) -> Result<Block1Step, Block1Error> {
        let idle = self.idle;
        self.open.retain(|_, a| now.duration_since(a.at) < idle);
        let key = (peer, path.to_owned());
        if b.num == 0 {
            if !self.open.contains_key(&key) && self.open.len() >= self.max_assemblies {
                let oldest = self
                    .open
                    .iter()
                    .min_by_key(|(_, a)| a.at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.open.remove(&k);
                }
            }
            self.open.insert(
                key.clone(),
                Assembly {
                    body: Vec::new(),
                    next: 0,
                    szx: b.szx,
                    at: now,
                },
            );
        }
        let Some(a) = self.open.get_mut(&key) else {
            return Err(Block1Error::Incomplete);
        };
        // A client may lower the block size mid-transfer (RFC 7959 §2.5);
        // the byte offset must still line up.
        let offset = u64::from(b.num) * b.size() as u64;
        if offset != a.body.len() as u64 || (b.more && payload.len() != b.size()) || b.szx > a.szx {
            self.open.remove(&key);
            return Err(Block1Error::Incomplete);
        }
        if a.body.len() + payload.len() > self.max_body {
            self.open.remove(&key);
            return Err(Block1Error::TooLarge);
        }
        a.body.extend_from_slice(payload);
        a.next = b.num + 1;
        a.szx = b.szx;
        a.at = now;
        if b.more {
            return Ok(Block1Step::Continue);
        }
        let done = self.open.remove(&key).map(|a| a.body).unwrap_or_default();
        Ok(Block1Step::Complete(done))
    }

    /// Assemblies open now.
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_options_round_trip_including_big_numbers() {
        for b in [
            Block {
                num: 0,
                more: false,
                szx: 0,
            },
            Block {
                num: 1,
                more: true,
                szx: 6,
            },
            Block {
                num: 15,
                more: true,
                szx: 2,
            },
            Block {
                num: 4095,
                more: false,
                szx: 6,
            },
            Block {
                num: 70_000,
                more: true,
                szx: 0,
            },
            Block {
                num: (1 << 20) - 1,
                more: true,
                szx: 5,
            },
        ] {
            assert_eq!(Block::decode(&b.encode()), Some(b), "{b:?}");
        }
        assert_eq!(
            Block {
                num: 0,
                more: false,
                szx: 0
            }
            .encode(),
            Vec::<u8>::new()
        );
        assert_eq!(
            Block::decode(&[]),
            Some(Block {
                num: 0,
                more: false,
                szx: 0
            })
        );
        assert_eq!(Block::decode(&[7]), None, "SZX 7 is reserved");
        assert_eq!(Block::decode(&[1, 2, 3, 4]), None);
        assert_eq!(Block::szx_for(1024), 6);
        assert_eq!(Block::szx_for(1000), 5);
        assert_eq!(Block::szx_for(5000), 6);
        assert_eq!(Block::szx_for(3), 0);
    }

    #[test]
    fn block2_ranges_cover_the_body_exactly() {
        assert_eq!(block2_range(1000, 0, 6), Some((0, 1000, false)));
        assert_eq!(block2_range(5000, 4, 6), Some((4096, 904, false)));
        assert_eq!(block2_range(5000, 3, 6), Some((3072, 1024, true)));
        assert_eq!(block2_range(5000, 5, 6), None);
        assert_eq!(block2_range(0, 0, 6), Some((0, 0, false)));
        assert_eq!(block2_range(32, 1, 0), Some((16, 16, false)));
        assert_eq!(block2_range(10, u32::MAX, 6), None);
    }

    #[test]
    fn block1_bodies_reassemble_and_refuse_gaps_and_excess() {
        let p = SocketAddr::from(([127, 0, 0, 1], 5000));
        let t = Instant::now();
        let mut a = Block1Assembler::new(100, 8, Duration::from_secs(60));
        let b = |num, more| Block { num, more, szx: 1 }; // 32 bytes
        assert_eq!(
            a.take(p, "/t", b(0, true), &[1; 32], t),
            Ok(Block1Step::Continue)
        );
        assert_eq!(
            a.take(p, "/t", b(1, true), &[2; 32], t),
            Ok(Block1Step::Continue)
        );
        let Ok(Block1Step::Complete(body)) = a.take(p, "/t", b(2, false), &[3; 5], t) else {
            panic!()
        };
        assert_eq!(body.len(), 69);
        assert_eq!(a.open(), 0);
        // A gap.
        a.take(p, "/t", b(0, true), &[1; 32], t).unwrap();
        assert_eq!(
            a.take(p, "/t", b(2, true), &[1; 32], t),
            Err(Block1Error::Incomplete)
        );
        // A later block with no first one.
        assert_eq!(
            a.take(p, "/u", b(1, false), &[1; 3], t),
            Err(Block1Error::Incomplete)
        );
        // Past the limit.
        for n in 0..3 {
            a.take(p, "/t", b(n, true), &[0; 32], t).unwrap();
        }
        assert_eq!(
            a.take(p, "/t", b(3, true), &[0; 32], t),
            Err(Block1Error::TooLarge)
        );
        // Idle assemblies are dropped.
        a.take(p, "/t", b(0, true), &[1; 32], t).unwrap();
        assert_eq!(
            a.take(p, "/t", b(1, false), &[1; 2], t + Duration::from_secs(61)),
            Err(Block1Error::Incomplete)
        );
        // Bounded count.
        let mut a = Block1Assembler::new(100, 2, Duration::from_secs(60));
        for port in 0..10u16 {
            let q = SocketAddr::from(([127, 0, 0, 1], port));
            a.take(q, "/t", b(0, true), &[1; 32], t).unwrap();
        }
        assert_eq!(a.open(), 2);
    }
}
