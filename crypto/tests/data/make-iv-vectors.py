#!/usr/bin/env python3
"""Regenerates iv-vectors.txt independently of the crate, with the `cryptography` package
(OpenSSL underneath): `pip install cryptography && ./make-iv-vectors.py`.

Each line is "spec key-bits sector ciphertext-hex" for one 512-byte sector whose plaintext is
bytes 0..255 twice and whose key is bytes 00 01 02 ... The sector 0x0123456789 lies above 2^32
so the 32-bit truncation of `plain` shows."""
import hashlib
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PT = bytes(range(256)) * 2
SECTOR = 0x0123456789


def enc(alg, mode, data):
    e = Cipher(alg, mode).encryptor()
    return e.update(data) + e.finalize()


lines = []
for bits in (256, 512):
    key = bytes(range(bits // 8))
    ivs = {
        "aes-xts-plain": struct.pack("<I", SECTOR & 0xFFFFFFFF) + bytes(12),
        "aes-xts-plain64": struct.pack("<Q", SECTOR) + bytes(8),
        "aes-xts-plain64be": bytes(8) + struct.pack(">Q", SECTOR),
    }
    for spec, iv in ivs.items():
        ct = enc(algorithms.AES(key), modes.XTS(iv), PT)
        lines.append(f"{spec} {bits} {SECTOR} {ct.hex()}")
for bits in (128, 256):
    key = bytes(range(bits // 8))
    salt = hashlib.sha256(key).digest()
    iv = enc(algorithms.AES(salt), modes.ECB(), struct.pack("<Q", SECTOR) + bytes(8))
    ct = enc(algorithms.AES(key), modes.CBC(iv), PT)
    lines.append(f"aes-cbc-essiv:sha256 {bits} {SECTOR} {ct.hex()}")
Path(__file__).with_name("iv-vectors.txt").write_text("\n".join(lines) + "\n")
