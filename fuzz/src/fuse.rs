//! Seeds for the `fuse_request` target.

const WRITE_IN_LEN: usize = 40;

fn msg(opcode: u32, unique: u64, nodeid: u64, arg: &[u8]) -> Vec<u8> {
    let len = 40 + arg.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&opcode.to_ne_bytes());
    m.extend_from_slice(&unique.to_ne_bytes());
    m.extend_from_slice(&nodeid.to_ne_bytes());
    m.extend_from_slice(&[0u8; 16]); // uid gid pid extlen padding
    m.extend_from_slice(arg);
    m
}

/// Well-formed kernel messages for every opcode the frontend handles
/// (and one it does not).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut init = vec![0u8; 64];
    init[..4].copy_from_slice(&7u32.to_ne_bytes());
    init[4..8].copy_from_slice(&41u32.to_ne_bytes());
    init[12..16].copy_from_slice(&((1u32 << 30) | (1 << 15)).to_ne_bytes());
    let mut read = vec![0u8; 40];
    read[8..16].copy_from_slice(&4096u64.to_ne_bytes());
    read[16..20].copy_from_slice(&4096u32.to_ne_bytes());
    let mut write = vec![0u8; WRITE_IN_LEN];
    write[16..20].copy_from_slice(&8u32.to_ne_bytes());
    write.extend_from_slice(b"tapjail!");
    let mut falloc = vec![0u8; 32];
    falloc[16..24].copy_from_slice(&4096u64.to_ne_bytes());
    falloc[24..28].copy_from_slice(&3u32.to_ne_bytes());
    let mut setattr = vec![0u8; 88];
    setattr[..4].copy_from_slice(&8u32.to_ne_bytes());
    vec![
        msg(26, 1, 0, &init),
        msg(1, 2, 1, b"disk\0"),
        msg(3, 3, 2, &[0u8; 16]),
        msg(4, 4, 2, &setattr),
        msg(14, 5, 2, &2u64.to_ne_bytes()),
        msg(15, 6 | 1 << 63, 2, &read),
        msg(16, 7, 2, &write),
        msg(17, 8, 1, &[]),
        msg(20, 9, 2, &[0u8; 16]),
        msg(25, 10, 2, &[0u8; 24]),
        msg(43, 11, 2, &falloc),
        msg(42, 12, 0, &[0u8; 8]),
        msg(36, 13, 0, &[0u8; 8]),
        msg(38, 14, 0, &[]),
        msg(9999, 15, 1, &[]),
    ]
}
