#!/usr/bin/env python3
"""An independent reference of blktap's encrypted VHD format, for the tests.

Written from blktap's description, not from tapjail's code: the keyhash
(cookie, 32-byte nonce, SHA-256(nonce || key)) at byte 29 of the batmap
header, the sector right after the padded BAT; data sectors AES-XTS
(32-byte key: AES-128, 64: AES-256) each with the "plain" IV, the virtual
sector number truncated to 32 bits, little endian, zero-padded to 16 bytes.

Sector s of a test pattern holds struct.pack("<Q", s ^ salt) 64 times.

  blktap_crypt.py keyhash IMAGE KEYFILE            exit 0 if the keyhash matches
  blktap_crypt.py check IMAGE KEYFILE FIRST COUNT SALT   decrypt, compare with the pattern
  blktap_crypt.py put IMAGE KEYFILE FIRST COUNT SALT     encrypt the pattern in place
(put/check need the sectors' block allocated, as the worker leaves it.)
"""
import hashlib
import struct
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR = 512


def be32(b, o):
    return struct.unpack(">I", b[o:o + 4])[0]


def be64(b, o):
    return struct.unpack(">Q", b[o:o + 8])[0]


class Vhd:
    def __init__(self, path):
        self.f = open(path, "r+b")
        hdr = self.read(512, 1024)
        assert hdr[:8] == b"cxsparse", "not a dynamic VHD"
        self.table = be64(hdr, 16)
        self.entries = be32(hdr, 28)
        self.block = be32(hdr, 32)
        spb = self.block // SECTOR
        # One bit per sector, padded to whole sectors.
        self.bitmap = ((spb + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR
        bat_bytes = -(-self.entries * 4 // SECTOR) * SECTOR
        self.batmap_hdr = self.table + bat_bytes

    def read(self, off, n):
        self.f.seek(off)
        return self.f.read(n)

    def keyhash(self):
        h = self.read(self.batmap_hdr, SECTOR)
        assert h[:8] == b"tdbatmap", "no batmap header"
        assert h[29] == 1, "keyhash cookie not set"
        return h[30:62], h[62:94]

    def data_offset(self, sector):
        blk, within = divmod(sector * SECTOR, self.block)
        entry = be32(self.read(self.table + 4 * blk, 4), 0)
        assert entry != 0xFFFFFFFF, f"block {blk} not allocated"
        return entry * SECTOR + self.bitmap + within


def xts(key, sector, encrypt, data):
    tweak = struct.pack("<I", sector & 0xFFFFFFFF) + bytes(12)
    c = Cipher(algorithms.AES(key), modes.XTS(tweak))
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(data) + op.finalize()


def pattern(sector, salt):
    return struct.pack("<Q", sector ^ salt) * (SECTOR // 8)


def main():
    cmd, image, keyfile = sys.argv[1:4]
    key = open(keyfile, "rb").read()
    assert len(key) in (32, 64), "key must be 32 or 64 bytes"
    v = Vhd(image)
    if cmd == "keyhash":
        nonce, want = v.keyhash()
        got = hashlib.sha256(nonce + key).digest()
        sys.exit(0 if got == want else 1)
    first, count, salt = (int(x, 0) for x in sys.argv[4:7])
    for s in range(first, first + count):
        off = v.data_offset(s)
        if cmd == "check":
            plain = xts(key, s, False, v.read(off, SECTOR))
            if plain != pattern(s, salt):
                print(f"sector {s}: decrypts to something else", file=sys.stderr)
                sys.exit(1)
        elif cmd == "put":
            v.f.seek(off)
            v.f.write(xts(key, s, True, pattern(s, salt)))
        else:
            sys.exit(f"unknown command {cmd}")
    v.f.flush()


if __name__ == "__main__":
    main()
