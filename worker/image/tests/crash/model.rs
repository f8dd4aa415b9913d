//! What the guest wrote and what each crash point allows a sector to read.
//!
//! Every sector a workload writes carries a self-describing pattern: the
//! write's id and the virtual sector number, then bytes derived from both.
//! A sector read back after a crash therefore names the write it came
//! from (or is all zeroes, or is garbage), and the model says which writes
//! are allowed there: the last durable one (acknowledged before a flush
//! that completed, or written with FUA) and any issued after it; never an
//! older one (a lost flushed write) and never bytes nobody wrote.

pub const SECTOR: usize = 512;

/// The bytes write `id` (> 0) puts in virtual sector `sector`.
pub fn pattern(id: u32, sector: u64, out: &mut [u8]) {
    out[..4].copy_from_slice(&id.to_le_bytes());
    out[4..12].copy_from_slice(&sector.to_le_bytes());
    let mut x = (u64::from(id) << 32) ^ sector ^ 0xa076_1d64_78bd_642f;
    for chunk in out[12..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// What a sector read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The pattern of write `id` (0: all zeroes).
    Id(u32),
    /// Nothing any write put at this sector.
    Garbage,
}

pub fn decode(buf: &[u8], sector: u64) -> Seen {
    if buf.iter().all(|&b| b == 0) {
        return Seen::Id(0);
    }
    let id = u32::from_le_bytes(buf[..4].try_into().unwrap_or_default());
    let mut want = [0u8; SECTOR];
    pattern(id, sector, &mut want);
    if id != 0 && buf == want {
        Seen::Id(id)
    } else {
        Seen::Garbage
    }
}

/// One guest write (or a copy an offline tool makes) as the model sees it.
#[derive(Debug, Clone)]
pub struct GuestWrite {
    pub first: u64,
    /// Pattern id per sector (0: the write puts zeroes there).
    pub ids: Vec<u32>,
    /// Log position when it was issued and when it was acknowledged.
    pub issue: usize,
    pub ack: usize,
    pub fua: bool,
}

/// The virtual disk one target shows, and its history.
#[derive(Debug, Clone)]
pub struct View {
    pub sectors: u64,
    /// Pattern id per sector before recording began (durable).
    pub initial: Vec<u32>,
    pub writes: Vec<GuestWrite>,
    /// (issued, completed) log positions of flushes.
    pub flushes: Vec<(usize, usize)>,
}

impl View {
    pub fn new(initial: Vec<u32>) -> View {
        View {
            sectors: initial.len() as u64,
            initial,
            writes: Vec::new(),
            flushes: Vec::new(),
        }
    }

    /// The contents once everything is written (for a workload's setup,
    /// whose writes are all durable).
    pub fn latest(&self) -> Vec<u32> {
        let mut v = self.initial.clone();
        for w in &self.writes {
            for (i, &id) in w.ids.iter().enumerate() {
                v[(w.first + i as u64) as usize] = id;
            }
        }
        v
    }

    fn durable(&self, w: &GuestWrite, p: usize) -> bool {
        (w.fua && w.ack <= p) || self.flushes.iter().any(|&(s, d)| s >= w.ack && d <= p)
    }

    /// Per sector: the ids it may read as after a crash at log position
    /// `p`, and every id ever written there (to tell a lost write from
    /// garbage).
    pub fn allowed(&self, p: usize) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        let mut ok: Vec<Vec<u32>> = self.initial.iter().map(|&i| vec![i]).collect();
        let mut ever = ok.clone();
        for w in &self.writes {
            if w.issue >= p {
                continue;
            }
            let durable = self.durable(w, p);
            for (i, &id) in w.ids.iter().enumerate() {
                let s = (w.first + i as u64) as usize;
                if durable {
                    ok[s] = vec![id];
                } else if !ok[s].contains(&id) {
                    ok[s].push(id);
                }
                ever[s].push(id);
            }
        }
        (ok, ever)
    }
}
