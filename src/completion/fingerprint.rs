//! A blake3 hash of a request's fields, each prefixed with its length, so that no two
//! different sequences of fields hash the same bytes.
//!
//! Fields go to blake3 through a buffer, a kilobyte or more at a time: a request is some fifty
//! fields of a few bytes, and blake3's own cost per `update` (~100 instructions, and a copy)
//! was a tenth of a cache hit's instructions when each field went alone. A field of half a
//! kilobyte or more (a prompt, an image) goes straight through, uncopied. The hash depends
//! only on the bytes fed, not on how they were cut, so buffering changes no key.

/// Buffered bytes past which they go to blake3.
const FLUSH: usize = 1024;
/// A field at least this long skips the buffer.
const LARGE: usize = 512;

pub struct Fingerprint {
    /// Made only once the fields pass [`FLUSH`] bytes or one is [`LARGE`]: most requests are
    /// hashed in one call from the buffer, and a hasher is a 2 KB struct to set up and move.
    hasher: Option<Box<blake3::Hasher>>,
    buf: Vec<u8>,
}

impl Default for Fingerprint {
    fn default() -> Fingerprint {
        Fingerprint {
            hasher: None,
            buf: Vec::with_capacity(FLUSH + LARGE + 10),
        }
    }
}

impl Fingerprint {
    /// Adds one field: its length (a LEB128 varint, so the prefix is a byte for most fields),
    /// then its bytes.
    pub fn field(&mut self, bytes: &[u8]) {
        let mut n = bytes.len() as u64;
        while n >= 0x80 {
            self.buf.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        self.buf.push(n as u8);
        if bytes.len() >= LARGE {
            self.flush().update(bytes);
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= FLUSH {
            self.flush();
        }
    }

    /// Feeds the buffer to the hasher (made now if need be), and returns it.
    fn flush(&mut self) -> &mut blake3::Hasher {
        let hasher = self.hasher.get_or_insert_default();
        hasher.update(&self.buf);
        self.buf.clear();
        hasher
    }

    pub fn finish(mut self) -> [u8; 32] {
        if self.hasher.is_some() {
            *self.flush().finalize().as_bytes()
        } else {
            *blake3::hash(&self.buf).as_bytes()
        }
    }
}

/// Feeds a count to `field` as its little-endian bytes without the high zero bytes (none for
/// 0): the field's length prefix tells them apart, and a request's counts (stop words, tools,
/// messages …) then take a byte or two of the hashed bytes rather than nine — a plain
/// request's key fits one of blake3's 64-byte blocks instead of two.
pub fn count_field(n: usize, field: &mut impl FnMut(&[u8])) {
    let n = n as u64;
    field(&n.to_le_bytes()[..8 - n.leading_zeros() as usize / 8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(fields: &[&[u8]]) -> [u8; 32] {
        let mut f = Fingerprint::default();
        for b in fields {
            f.field(b);
        }
        f.finish()
    }

    #[test]
    fn a_count_is_its_significant_bytes() {
        let bytes = |n| {
            let mut out = Vec::new();
            count_field(n, &mut |b: &[u8]| out.extend_from_slice(b));
            out
        };
        assert_eq!(bytes(0), b"");
        assert_eq!(bytes(3), [3]);
        assert_eq!(bytes(256), [0, 1]);
        assert_eq!(bytes(usize::MAX).len(), std::mem::size_of::<usize>());
    }

    #[test]
    fn fields_are_told_apart_by_their_lengths() {
        assert_ne!(of(&[b"ab", b"c"]), of(&[b"a", b"bc"]));
        assert_ne!(of(&[b""]), of(&[]));
        assert_eq!(of(&[b"ab", b"c"]), of(&[b"ab", b"c"]));
    }

    #[test]
    fn the_hash_is_that_of_the_prefixed_bytes_however_they_were_buffered() {
        let small = vec![7u8; 100];
        let large = vec![9u8; 5000];
        let fields: Vec<&[u8]> = vec![&small, &large, &small, &small, &small, &small, b"x"];
        let mut bytes = Vec::new();
        for f in &fields {
            let mut n = f.len();
            while n >= 0x80 {
                bytes.push((n & 0x7f) as u8 | 0x80);
                n >>= 7;
            }
            bytes.push(n as u8);
            bytes.extend_from_slice(f);
        }
        assert_eq!(of(&fields), *blake3::hash(&bytes).as_bytes());
    }
}
