//! The byte layout of a vault file (format version 1). No cryptography here: this module
//! turns a [`Header`] and [`Entry`]s into bytes and back, and says where the key check and
//! the file MAC sit; `crypto.rs` computes and checks them, `store.rs` puts the two together.
//!
//! ```text
//! header   "DSOVAULT" | u16 format version (1) | u8 protection (1 key file, 2 passphrase)
//!          | u8 reserved (0) | 16 B vault id | u64 next version
//!          [passphrase only: u32 m_cost KiB | u32 t_cost | u32 p_cost | 16 B salt]
//! 32 B     key check: HMAC-SHA256(mac key, label | header)
//! u32      entry count, then per entry, sorted by name:
//!          u16 name length | name (UTF-8) | u64 version | u64 updated (ns since the epoch)
//!          | 12 B nonce | u32 ciphertext length | ciphertext (AES-256-GCM, value + 16 B tag)
//! 32 B     file MAC: HMAC-SHA256(mac key, every byte before it)
//! ```
//!
//! Integers are big-endian. Names, versions and times are in clear (metadata reads need no
//! decryption); values are not.

/// First bytes of every vault file.
pub const MAGIC: &[u8; 8] = b"DSOVAULT";

/// The format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// Length of the key check and of the file MAC.
pub const TAG_LEN: usize = 32;

/// AES-GCM nonce length (96 bits).
pub const NONCE_LEN: usize = 12;

/// AES-GCM tag length, part of every ciphertext.
pub const GCM_TAG_LEN: usize = 16;

/// Longest entry name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Fixed part of an entry besides its name and ciphertext.
const ENTRY_FIXED_LEN: usize = 2 + 8 + 8 + NONCE_LEN + 4;

/// How the vault's master key is obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// A random 256-bit key file.
    KeyFile,
    /// A passphrase through Argon2id with these parameters.
    Passphrase(Argon2Params),
}

/// Argon2id parameters, stored in the header so a vault opens with the cost it was made
/// with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
    /// Random salt.
    pub salt: [u8; 16],
}

/// Upper bounds accepted when reading parameters, so a damaged header cannot make dso
/// allocate gigabytes or spin for hours.
pub const ARGON2_MAX_M_COST: u32 = 4 * 1024 * 1024;
/// See [`ARGON2_MAX_M_COST`].
pub const ARGON2_MAX_T_COST: u32 = 64;
/// See [`ARGON2_MAX_M_COST`].
pub const ARGON2_MAX_P_COST: u32 = 16;

/// The file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Random id of this vault, bound into every entry's associated data.
    pub vault_id: [u8; 16],
    /// How the key is obtained.
    pub protection: Protection,
    /// The version the next write takes (one counter per file, so a name's versions only
    /// grow and are never reused, even after delete and set).
    pub next_version: u64,
}

/// One stored entry: metadata in clear, the value encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's name (`myapp/db_password`).
    pub name: String,
    /// Its version.
    pub version: u64,
    /// When it was written, nanoseconds since the Unix epoch.
    pub updated_ns: u64,
    /// The nonce its value was sealed with.
    pub nonce: [u8; NONCE_LEN],
    /// The sealed value (with the GCM tag).
    pub ciphertext: Vec<u8>,
}

/// A file split into its parts, not yet verified.
#[derive(Debug)]
pub struct Parsed {
    /// The header.
    pub header: Header,
    /// Length of the header bytes (what the key check covers).
    pub header_len: usize,
    /// The stored key check.
    pub key_check: [u8; TAG_LEN],
    /// The entries, in file order.
    pub entries: Vec<Entry>,
    /// Length of everything the file MAC covers.
    pub mac_covered_len: usize,
    /// The stored file MAC.
    pub mac: [u8; TAG_LEN],
}

/// Why bytes are not a readable vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The magic is missing: some other file.
    NotAVault,
    /// A format version this code does not read.
    Unsupported(u16),
    /// The structure is broken (truncated, bad lengths, unsorted names...).
    Damaged(String),
}

/// Appends the header's bytes.
pub fn encode_header(header: &Header, out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.push(match header.protection {
        Protection::KeyFile => 1,
        Protection::Passphrase(_) => 2,
    });
    out.push(0);
    out.extend_from_slice(&header.vault_id);
    out.extend_from_slice(&header.next_version.to_be_bytes());
    if let Protection::Passphrase(p) = &header.protection {
        out.extend_from_slice(&p.m_cost.to_be_bytes());
        out.extend_from_slice(&p.t_cost.to_be_bytes());
        out.extend_from_slice(&p.p_cost.to_be_bytes());
        out.extend_from_slice(&p.salt);
    }
}

/// Appends the entry count.
pub fn encode_count(count: usize, out: &mut Vec<u8>) {
    let count = u32::try_from(count).expect("entry count fits in u32");
    out.extend_from_slice(&count.to_be_bytes());
}

/// Appends one entry's bytes.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    let name_len = u16::try_from(entry.name.len()).expect("names are checked to be short");
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(entry.name.as_bytes());
    out.extend_from_slice(&entry.version.to_be_bytes());
    out.extend_from_slice(&entry.updated_ns.to_be_bytes());
    out.extend_from_slice(&entry.nonce);
    let ct_len = u32::try_from(entry.ciphertext.len()).expect("values are checked to be small");
    out.extend_from_slice(&ct_len.to_be_bytes());
    out.extend_from_slice(&entry.ciphertext);
}

/// The associated data an entry's value is sealed with: the vault id, the name, the version
/// and the time. An entry copied under another name, into another vault, or given another
/// version number does not decrypt.
pub fn entry_aad(vault_id: &[u8; 16], name: &str, version: u64, updated_ns: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 16 + name.len() + 2 + 16);
    aad.extend_from_slice(b"dso-vault-v1/entry");
    aad.extend_from_slice(vault_id);
    aad.extend_from_slice(&(name.len() as u16).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&updated_ns.to_be_bytes());
    aad
}

/// Reads the header only (enough to know how the key is obtained).
pub fn parse_header(bytes: &[u8]) -> Result<(Header, usize), FormatError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::NotAVault);
    }
    let mut r = Reader {
        buf: bytes,
        pos: MAGIC.len(),
    };
    let version = r.u16()?;
    if version != FORMAT_VERSION {
        return Err(FormatError::Unsupported(version));
    }
    let kind = r.u8()?;
    let _reserved = r.u8()?;
    let vault_id = r.array::<16>()?;
    let next_version = r.u64()?;
    let protection = match kind {
        1 => Protection::KeyFile,
        2 => {
            let p = Argon2Params {
                m_cost: r.u32()?,
                t_cost: r.u32()?,
                p_cost: r.u32()?,
                salt: r.array::<16>()?,
            };
            if p.m_cost > ARGON2_MAX_M_COST
                || p.t_cost == 0
                || p.t_cost > ARGON2_MAX_T_COST
                || p.p_cost == 0
                || p.p_cost > ARGON2_MAX_P_COST
            {
                return Err(damaged(format!(
                    "Argon2id parameters out of range (m={} KiB, t={}, p={})",
                    p.m_cost, p.t_cost, p.p_cost
                )));
            }
            Protection::Passphrase(p)
        }
        other => return Err(damaged(format!("unknown protection kind {other}"))),
    };
    let header = Header {
        vault_id,
        protection,
        next_version,
    };
    Ok((header, r.pos))
}

/// Splits a whole file into its parts. Checks structure only; the caller verifies the key
/// check and the MAC before trusting anything.
pub fn parse(bytes: &[u8]) -> Result<Parsed, FormatError> {
    let (header, header_len) = parse_header(bytes)?;
    if bytes.len() < header_len + TAG_LEN + 4 + TAG_LEN {
        return Err(damaged(format!("truncated: {} bytes", bytes.len())));
    }
    let mac_covered_len = bytes.len() - TAG_LEN;
    let mut r = Reader {
        buf: &bytes[..mac_covered_len],
        pos: header_len,
    };
    let key_check = r.array::<TAG_LEN>()?;
    let count = r.u32()? as usize;
    // Every entry takes at least its fixed part: a count larger than the rest allows is
    // damage, found before allocating for it.
    if count > (mac_covered_len - r.pos) / ENTRY_FIXED_LEN {
        return Err(damaged(format!("entry count {count} does not fit the file")));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for i in 0..count {
        let name_len = r.u16()? as usize;
        let name = std::str::from_utf8(r.bytes(name_len)?)
            .map_err(|_| damaged(format!("entry {i}: name is not UTF-8")))?
            .to_string();
        if let Some(prev) = entries.last()
            && prev.name >= name
        {
            return Err(damaged(format!("entry {i}: names out of order")));
        }
        let version = r.u64()?;
        let updated_ns = r.u64()?;
        let nonce = r.array::<NONCE_LEN>()?;
        let ct_len = r.u32()? as usize;
        if ct_len < GCM_TAG_LEN {
            return Err(damaged(format!("entry {i}: ciphertext shorter than its tag")));
        }
        let ciphertext = r.bytes(ct_len)?.to_vec();
        entries.push(Entry {
            name,
            version,
            updated_ns,
            nonce,
            ciphertext,
        });
    }
    if r.pos != mac_covered_len {
        return Err(damaged(format!(
            "{} unexpected bytes after the last entry",
            mac_covered_len - r.pos
        )));
    }
    let mut mac = [0u8; TAG_LEN];
    mac.copy_from_slice(&bytes[mac_covered_len..]);
    Ok(Parsed {
        header,
        header_len,
        key_check,
        entries,
        mac_covered_len,
        mac,
    })
}

fn damaged(reason: String) -> FormatError {
    FormatError::Damaged(reason)
}

/// A bounds-checked cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(damaged(format!("truncated at byte {}", self.pos)));
        };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(protection: Protection) -> Vec<u8> {
        let header = Header {
            vault_id: [7; 16],
            protection,
            next_version: 3,
        };
        let mut out = Vec::new();
        encode_header(&header, &mut out);
        out.extend_from_slice(&[1; TAG_LEN]);
        encode_count(2, &mut out);
        for (name, v) in [("a/b", 1), ("c", 2)] {
            encode_entry(
                &Entry {
                    name: name.into(),
                    version: v,
                    updated_ns: 42,
                    nonce: [9; NONCE_LEN],
                    ciphertext: vec![5; 20],
                },
                &mut out,
            );
        }
        out.extend_from_slice(&[2; TAG_LEN]);
        out
    }

    #[test]
    fn round_trip_both_protections() {
        let pass = Protection::Passphrase(Argon2Params {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
            salt: [3; 16],
        });
        for protection in [Protection::KeyFile, pass] {
            let bytes = sample(protection.clone());
            let p = parse(&bytes).unwrap();
            assert_eq!(p.header.protection, protection);
            assert_eq!(p.header.next_version, 3);
            assert_eq!(p.entries.len(), 2);
            assert_eq!(p.entries[0].name, "a/b");
            assert_eq!(p.entries[1].version, 2);
            assert_eq!(p.mac, [2; TAG_LEN]);
            assert_eq!(p.mac_covered_len, bytes.len() - TAG_LEN);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample(Protection::KeyFile);
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "truncated to {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());
    }

    #[test]
    fn not_a_vault_and_unsupported() {
        assert_eq!(parse(b"hello world").unwrap_err(), FormatError::NotAVault);
        let mut bytes = sample(Protection::KeyFile);
        bytes[9] = 2;
        assert_eq!(parse(&bytes).unwrap_err(), FormatError::Unsupported(2));
    }

    #[test]
    fn huge_count_is_damage_not_allocation() {
        let mut bytes = sample(Protection::KeyFile);
        let at = 36 + TAG_LEN;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&bytes), Err(FormatError::Damaged(_))));
    }
}
