//! Where fields lie in the running kernel's structures, read from its BTF
//! (`/sys/kernel/btf/vmlinux`): the offsets the programs that read kernel
//! memory (`bpf_probe_read_kernel`) are given at load time, so that one
//! build reads the right bytes on every kernel, as CO-RE relocations do
//! for C programs (Rust eBPF has none).
//!
//! Only what that needs is read: struct and union members, by name, also
//! inside anonymous members.

use std::{collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF at {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the kernel's BTF does not parse: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no field {0}")]
    NoField(String),
}

/// The kernel's types, as far as members go.
pub struct KernelBtf {
    types: Vec<Type>,
    /// Struct and union ids by name (the first of a name).
    by_name: HashMap<String, u32>,
}

/// One type: its kind, what it refers to, and its members.
#[derive(Clone, Default)]
struct Type {
    kind: u8,
    /// For a typedef or a qualifier: the type it names.
    refers: u32,
    members: Vec<Member>,
}

#[derive(Clone)]
struct Member {
    name: String,
    kind_type: u32,
    /// Offset in bits from the start of the struct.
    bit_offset: u32,
}

const STRUCT: u8 = 4;
const UNION: u8 = 5;
const TYPEDEF: u8 = 8;
const VOLATILE: u8 = 9;
const CONST: u8 = 10;
const RESTRICT: u8 = 11;
const TYPE_TAG: u8 = 18;

impl KernelBtf {
    /// The running kernel's.
    pub fn load() -> Result<Self, BtfError> {
        Self::read(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| {
            data.get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(0xeb9f) {
            return Err(BtfError::Malformed("not BTF (or not little-endian)"));
        }
        let field = |at| u32_at(at).ok_or(BtfError::Malformed("a short header"));
        let header_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let types_at = header_len + type_off;
        let strings_at = header_len + str_off;
        let strings = data
            .get(strings_at..strings_at + str_len)
            .ok_or(BtfError::Malformed("strings past the end"))?;
        let name = |offset: u32| -> String {
            let from = offset as usize;
            let bytes = strings.get(from..).unwrap_or_default();
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        // Type ids start at 1; 0 is void.
        let mut types = vec![Type::default()];
        let mut by_name = HashMap::new();
        let mut at = types_at;
        let end = types_at + type_len;
        while at < end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or(BtfError::Malformed("a short type"));
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let vlen = (info & 0xffff) as usize;
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 != 0;
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => 0,
            };
            let mut members = Vec::new();
            if kind == STRUCT || kind == UNION {
                for m in 0..vlen {
                    let member = |i: usize| {
                        u32_at(at + 12 * m + 4 * i).ok_or(BtfError::Malformed("a short member"))
                    };
                    let offset = member(2)?;
                    members.push(Member {
                        name: name(member(0)?),
                        kind_type: member(1)?,
                        bit_offset: if kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        },
                    });
                }
                let id = types.len() as u32;
                let type_name = name(name_off);
                if !type_name.is_empty() {
                    by_name.entry(type_name).or_insert(id);
                }
            }
            at += extra;
            types.push(Type {
                kind,
                refers: size_or_type,
                members,
            });
        }
        Ok(Self { types, by_name })
    }

    /// The byte offset of `path` (`"unix_sock.addr"`, or deeper:
    /// `"file.f_path.dentry"`) from the start of its struct.
    pub fn offset(&self, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoField(path.to_owned());
        let mut parts = path.split('.');
        let mut id = *self
            .by_name
            .get(parts.next().ok_or_else(missing)?)
            .ok_or_else(missing)?;
        let mut bits = 0;
        for part in parts {
            let (offset, member_type) = self.member(id, part).ok_or_else(missing)?;
            bits += offset;
            id = member_type;
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    /// Member `name` of the struct or union `id` (through typedefs and
    /// qualifiers, and into anonymous members): its bit offset and type.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let ty = self.types.get(self.resolve(id) as usize)?;
        for member in &ty.members {
            if member.name == name {
                return Some((member.bit_offset, member.kind_type));
            }
            let inner = self.resolve(member.kind_type);
            let anonymous = member.name.is_empty()
                && matches!(self.types.get(inner as usize), Some(t) if t.kind == STRUCT || t.kind == UNION);
            if anonymous && let Some((offset, ty)) = self.member(inner, name) {
                return Some((member.bit_offset + offset, ty));
            }
        }
        None
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG) => {
                    id = t.refers;
                }
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the running kernel's BTF (every machine this runs on has
    /// one): fields whose place has not moved in years.
    #[test]
    fn finds_fields_in_the_running_kernel() {
        let Ok(btf) = KernelBtf::load() else {
            panic!("no /sys/kernel/btf/vmlinux: the observer needs a kernel with BTF");
        };
        // struct socket { socket_state state; short type; unsigned long
        // flags; struct file *file; struct sock *sk; ... }
        assert_eq!(btf.offset("socket.sk").unwrap(), 24);
        // The first member of struct sock is struct sock_common.
        assert_eq!(btf.offset("unix_sock.sk").unwrap(), 0);
        // Inside an anonymous union of sock_common: skc_family.
        assert!(btf.offset("sock.__sk_common.skc_family").is_ok());
        assert!(btf.offset("unix_sock.addr").unwrap() > 0);
        assert!(matches!(
            btf.offset("unix_sock.no_such_field"),
            Err(BtfError::NoField(_))
        ));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(KernelBtf::parse(b"\x7fELF").is_err());
        assert!(KernelBtf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
    }
}
