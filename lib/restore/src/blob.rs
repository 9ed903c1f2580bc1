//! The op list that the restore blob runs ([`crate::sys`] has the interpreter), and its builder.
//!
//! An op is eight little-endian words: kind, syscall number, six arguments. Arguments that point at
//! data the plan carries (a `clone_args`, a `stack_t`, the auxv) or at another op (where a clone's
//! child goes on) are resolved when the plan is laid out at its final address.

/// Run a syscall; a failure ends the restore.
pub const SYSCALL: u64 = 1;
/// Run a syscall and ignore its result.
pub const MAYFAIL: u64 = 2;
/// `clone3(a0, a1)`; the child continues at op `a2`.
pub const CLONE: u64 = 3;
/// `rt_sigreturn` with the stack pointer at `a0`.
pub const SIGRETURN: u64 = 4;
/// Add one to the `u32` at `a0` and wake its waiters.
pub const ADDWAKE: u64 = 5;
/// Sleep until the `u32` at `a0` equals `a1`.
pub const WAIT: u64 = 6;
/// Run a syscall; on success skip the next `a5` ops.
pub const TRY: u64 = 7;
/// Run a syscall (five arguments); any result but `a5` ends the restore.
pub const EXPECT: u64 = 8;

/// Size of one op in bytes.
pub const OP_BYTES: usize = 64;

/// An argument before layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A plain value.
    Imm(u64),
    /// The address of byte `n` of the plan's data.
    Data(usize),
    /// The address of op `n`.
    Op(usize),
}

/// One op before layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Its kind.
    pub kind: u64,
    /// The syscall number (for the syscall kinds).
    pub nr: u64,
    /// The arguments.
    pub args: [Arg; 6],
    /// What it does, for error messages.
    pub what: String,
}

/// Builds an op list and the data it points at.
#[derive(Debug, Default)]
pub struct Builder {
    /// The ops, in order; child lists follow the main list.
    pub ops: Vec<Op>,
    /// Data the ops point at.
    pub data: Vec<u8>,
    /// `(at, to)`: the data word at byte `at` holds the address of data byte `to`.
    pub fixups: Vec<(usize, usize)>,
}

fn imm6(a: &[u64]) -> [Arg; 6] {
    let mut out = [Arg::Imm(0); 6];
    for (o, v) in out.iter_mut().zip(a) {
        *o = Arg::Imm(*v);
    }
    out
}

impl Builder {
    /// Adds `bytes` to the data (8-byte aligned) and returns their offset.
    pub fn put(&mut self, bytes: &[u8]) -> usize {
        while self.data.len() % 8 != 0 {
            self.data.push(0);
        }
        let at = self.data.len();
        self.data.extend_from_slice(bytes);
        at
    }

    /// Adds an op with every argument given; returns its index.
    pub fn op(&mut self, kind: u64, nr: u64, args: [Arg; 6], what: impl Into<String>) -> usize {
        self.ops.push(Op {
            kind,
            nr,
            args,
            what: what.into(),
        });
        self.ops.len() - 1
    }

    /// Makes the data word at byte `at` the address of data byte `to` once laid out.
    pub fn fixup(&mut self, at: usize, to: usize) {
        self.fixups.push((at, to));
    }

    /// The data as bytes for a plan whose data starts at `data_at`.
    #[must_use]
    pub fn encode_data(&self, data_at: u64) -> Vec<u8> {
        let mut out = self.data.clone();
        for &(at, to) in &self.fixups {
            out[at..at + 8].copy_from_slice(&(data_at + to as u64).to_le_bytes());
        }
        out
    }

    /// A syscall with plain arguments that must succeed.
    pub fn syscall(&mut self, nr: i64, args: &[u64], what: impl Into<String>) -> usize {
        self.op(SYSCALL, nr.unsigned_abs(), imm6(args), what)
    }

    /// A syscall with plain arguments whose result is ignored.
    pub fn mayfail(&mut self, nr: i64, args: &[u64], what: impl Into<String>) -> usize {
        self.op(MAYFAIL, nr.unsigned_abs(), imm6(args), what)
    }

    /// Index the next op will get.
    #[must_use]
    pub fn next(&self) -> usize {
        self.ops.len()
    }

    /// The ops as bytes for a plan whose ops start at `ops_at` and data at `data_at`.
    #[must_use]
    pub fn encode_ops(&self, ops_at: u64, data_at: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ops.len() * OP_BYTES);
        for op in &self.ops {
            out.extend_from_slice(&op.kind.to_le_bytes());
            out.extend_from_slice(&op.nr.to_le_bytes());
            for a in op.args {
                let v = match a {
                    Arg::Imm(v) => v,
                    Arg::Data(n) => data_at + n as u64,
                    Arg::Op(n) => ops_at + (n * OP_BYTES) as u64,
                };
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_resolve_their_pointers() {
        let mut b = Builder::default();
        let d = b.put(&[1, 2, 3]);
        let d2 = b.put(&[9]);
        assert_eq!((d, d2), (0, 8));
        b.syscall(11, &[0x1000, 0x2000], "munmap");
        b.op(
            CLONE,
            0,
            [
                Arg::Data(d2),
                Arg::Imm(88),
                Arg::Op(1),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
            ],
            "clone",
        );
        let bytes = b.encode_ops(0x10_000, 0x20_000);
        assert_eq!(bytes.len(), 128);
        let w = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!((w(0), w(1), w(2), w(3)), (SYSCALL, 11, 0x1000, 0x2000));
        assert_eq!((w(8), w(10), w(11), w(12)), (CLONE, 0x20_008, 88, 0x10_040));
        let mut b = Builder::default();
        let a = b.put(&[0; 16]);
        let t = b.put(&[7; 4]);
        b.fixup(a + 8, t);
        let d = b.encode_data(0x5000);
        assert_eq!(u64::from_le_bytes(d[8..16].try_into().unwrap()), 0x5010);
    }
}
