//! The stream-verdict program, written as raw eBPF instructions (no clang, no ELF).
//!
//! For every chunk of bytes a socket in the `socks` map receives, the program:
//! 0. passes an empty chunk (a bare FIN) to the socket itself: redirected, it left `EPIPE`
//!    and `EPOLLERR` on the healthy peer leg (observed; by the kernel's code the peer's
//!    zero-byte send is a hard error in `sk_psock_backlog`, which also stops its redirects);
//! 1. takes the socket's cookie (`bpf_get_socket_cookie`) and looks it up in `peers`
//!    (cookie -> `{ peer cookie, bytes }`); no entry: `SK_PASS` (the bytes stay with the
//!    socket, for user space);
//! 2. redirects the chunk to the egress of the peer found in `targets`
//!    (`bpf_sk_redirect_hash`, flags 0 = the peer's send side);
//! 3. if the redirect was accepted, adds the chunk's length to `bytes` (an atomic add) and
//!    returns `SK_PASS` (which, with a redirect set, means "send it there"); if the peer is
//!    not in `targets` (closed, removed) it returns `SK_PASS` without a redirect, so the
//!    bytes are queued for this socket's own reader instead of being dropped.

use std::os::fd::{AsRawFd, OwnedFd};

// Opcodes (include/uapi/linux/bpf.h, bpf_common.h).
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const STX_DW: u8 = 0x7b;
const LDX_DW: u8 = 0x79;
const LDX_W: u8 = 0x61;
const LD_IMM64: u8 = 0x18;
const ATOMIC_DW: u8 = 0xdb;
/// `src_reg` of a 64-bit immediate load that names a map by file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

// Helpers.
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_SOCKET_COOKIE: i32 = 46;
const SK_REDIRECT_HASH: i32 = 72;

/// `SK_PASS` of `enum sk_action`.
const SK_PASS: i32 = 1;

/// One instruction as the kernel lays it out on a little-endian host:
/// `code`, `dst_reg:4 | src_reg:4`, `off`, `imm`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let regs = (dst & 0x0f) | (src << 4);
    let off = off.to_le_bytes();
    let imm = imm.to_le_bytes();
    u64::from_le_bytes([code, regs, off[0], off[1], imm[0], imm[1], imm[2], imm[3]])
}

/// The two slots of `dst = map fd` (the verifier replaces the fd with the map's address).
fn ld_map(dst: u8, map: &OwnedFd) -> [u64; 2] {
    [
        insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The verdict program over `peers` (hash: u64 cookie -> `{u64 peer, u64 bytes}`) and
/// `targets` (sockhash keyed by cookie).
pub(crate) fn verdict(peers: &OwnedFd, targets: &OwnedFd) -> Vec<u64> {
    let (r0, r1, r2, r3, r4, r6, r7, r10) = (0, 1, 2, 3, 4, 6, 7, 10);
    let mut p = Vec::with_capacity(28);
    p.push(insn(MOV64_X, r6, r1, 0, 0)); // 0: r6 = ctx
    p.push(insn(LDX_W, r2, r6, 0, 0)); // 1: r2 = skb->len
    p.push(insn(JEQ_K, r2, 0, 23, 0)); // 2: empty (a bare FIN) -> 26 (pass)
    p.push(insn(CALL, 0, 0, 0, GET_SOCKET_COOKIE)); // 3: r0 = cookie(ctx)
    p.push(insn(STX_DW, r10, r0, -8, 0)); // 4: stack[-8] = cookie
    p.extend(ld_map(r1, peers)); // 5-6: r1 = peers
    p.push(insn(MOV64_X, r2, r10, 0, 0)); // 7
    p.push(insn(ADD64_K, r2, 0, 0, -8)); // 8: r2 = &stack[-8]
    p.push(insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM)); // 9: r0 = peers[cookie]
    p.push(insn(JEQ_K, r0, 0, 15, 0)); // 10: none -> 26 (pass)
    p.push(insn(MOV64_X, r7, r0, 0, 0)); // 11: r7 = entry
    p.push(insn(LDX_DW, r1, r7, 0, 0)); // 12: r1 = entry.peer
    p.push(insn(STX_DW, r10, r1, -16, 0)); // 13: stack[-16] = peer
    p.push(insn(MOV64_X, r1, r6, 0, 0)); // 14: r1 = ctx
    p.extend(ld_map(r2, targets)); // 15-16: r2 = targets
    p.push(insn(MOV64_X, r3, r10, 0, 0)); // 17
    p.push(insn(ADD64_K, r3, 0, 0, -16)); // 18: r3 = &stack[-16]
    p.push(insn(MOV64_K, r4, 0, 0, 0)); // 19: flags = 0 (peer's egress)
    p.push(insn(CALL, 0, 0, 0, SK_REDIRECT_HASH)); // 20
    p.push(insn(JNE_K, r0, 0, 4, SK_PASS)); // 21: refused -> 26 (pass, no redirect)
    p.push(insn(LDX_W, r1, r6, 0, 0)); // 22: r1 = skb->len (offset 0)
    p.push(insn(ATOMIC_DW, r7, r1, 8, 0)); // 23: lock entry.bytes += r1
    p.push(insn(MOV64_K, r0, 0, 0, SK_PASS)); // 24
    p.push(insn(EXIT, 0, 0, 0, 0)); // 25
    p.push(insn(MOV64_K, r0, 0, 0, SK_PASS)); // 26: pass
    p.push(insn(EXIT, 0, 0, 0, 0)); // 27
    p
}

#[cfg(test)]
mod tests {
    #[test]
    fn encoding_matches_the_kernel_layout() {
        // `r2 += -8` is 07 02 00 00 f8 ff ff ff in every BPF disassembler.
        let i = super::insn(super::ADD64_K, 2, 0, 0, -8);
        assert_eq!(i.to_le_bytes(), [0x07, 0x02, 0, 0, 0xf8, 0xff, 0xff, 0xff]);
        // `*(u64 *)(r10 - 8) = r0`: 7b 0a f8 ff 00 00 00 00.
        let i = super::insn(super::STX_DW, 10, 0, -8, 0);
        assert_eq!(i.to_le_bytes(), [0x7b, 0x0a, 0xf8, 0xff, 0, 0, 0, 0]);
    }
}
