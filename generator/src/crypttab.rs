//! Parsing `/etc/ublk-crypttab`: crypttab(5) syntax, one volume per line,
//! `name device keyfile options`, `#` comments, fields separated by blanks.
//!
//! Options, comma-separated (crypttab's names where they apply):
//!
//! | option | ublk-crypt open | note |
//! |---|---|---|
//! | `id=N` | `--id N` | required: the fixed ublk id a restarted daemon finds its device by |
//! | `cipher=SPEC` | `--cipher SPEC` | one of `CipherSpec::SUPPORTED` |
//! | `size=BITS` | `--key-size BITS` | checked against the cipher |
//! | `hash=NAME` | `--hash NAME` | passphrases only |
//! | `offset=N`, `skip=N` | `--offset N`, `--skip N` | 512-byte sectors |
//! | `sector-size=N` | `--sector-size N` | 512, 1024, 2048 or 4096 |
//! | `keyfile-offset=N`, `keyfile-size=N` | `--keyfile-offset N`, `--keyfile-size N` | |
//! | `discard` | `--allow-discards` | and `swapon --discard` with `swap` |
//! | `readonly`, `read-only` | `--readonly` | |
//! | `swap` | the `ublk-crypt-swap@` unit | only with the key file `/dev/urandom` |
//! | `plain` | — | the only mode there is; accepted for crypttab's sake |
//! | `noauto` | — | not started at boot |
//!
//! Anything else, a missing `id=`, a duplicate name or id, a key that a service cannot read (no
//! key file: a passphrase needs a terminal) or `swap` with a persistent key is an error for that
//! line; the other lines are unaffected.

use std::collections::HashSet;

use ublk_crypt_crypto::CipherSpec;

/// One valid line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line number in the file.
    pub line: usize,
    /// The volume's name: the unit instance and `--name`.
    pub name: String,
    /// The backing device or file, as an absolute path (`UUID=`-style names resolved to
    /// `/dev/disk/by-*`).
    pub device: String,
    /// The key file (`/dev/urandom` for a fresh key at every boot).
    pub key_file: String,
    /// ublk device id: the device is `/dev/ublkbID`.
    pub id: u32,
    /// `ublk-crypt open` options, in a fixed order.
    pub open_options: Vec<String>,
    pub swap: bool,
    pub discard: bool,
    pub noauto: bool,
}

impl Entry {
    /// A fresh random key at every boot: nothing on the backing survives a reboot.
    pub fn is_ephemeral(&self) -> bool {
        self.key_file == "/dev/urandom"
    }
}

/// Why a line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// Parses the whole file: the valid entries, and one error per refused line.
pub fn parse(text: &str) -> (Vec<Entry>, Vec<LineError>) {
    let mut entries: Vec<Entry> = vec![];
    let mut errors = vec![];
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        match parse_line(line, content) {
            Ok(e) => {
                if !names.insert(e.name.clone()) {
                    errors.push(err(line, format!("name '{}' is used twice", e.name)));
                } else if !ids.insert(e.id) {
                    names.remove(&e.name);
                    errors.push(err(line, format!("id={} is used twice", e.id)));
                } else {
                    entries.push(e);
                }
            }
            Err(message) => errors.push(err(line, message)),
        }
    }
    (entries, errors)
}

fn err(line: usize, message: String) -> LineError {
    LineError { line, message }
}

/// Characters that would mean something else in a unit file (`%` specifiers, `$` variables,
/// quotes, `\` escapes) or split a word: refused in every field rather than escaped.
fn plain_word(field: &str, what: &str) -> Result<(), String> {
    if field
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "%$\"'\\;".contains(c))
    {
        return Err(format!("{what} '{field}' has a character not allowed here"));
    }
    Ok(())
}

fn parse_line(line: usize, content: &str) -> Result<Entry, String> {
    let fields: Vec<&str> = content.split_whitespace().collect();
    if fields.len() < 2 || fields.len() > 4 {
        return Err(format!(
            "expected 'name device keyfile options', found {} fields",
            fields.len()
        ));
    }
    let name = fields[0];
    if name.is_empty()
        || name.starts_with(|c: char| c.is_ascii_digit())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(format!(
            "name '{name}': letters, digits, '_', '.', '-', not starting with a digit"
        ));
    }
    let device = resolve_device(fields[1])?;
    let key_file = match fields.get(2).copied() {
        None | Some("-") | Some("none") => {
            return Err(
                "no key file: a passphrase needs a terminal, which a service at boot does \
                        not have (use a key file, or /dev/urandom for swap)"
                    .into(),
            )
        }
        Some(k) if k.starts_with('/') => {
            plain_word(k, "key file")?;
            k.to_string()
        }
        Some(k) => return Err(format!("key file '{k}' is not an absolute path")),
    };
    let mut id = None;
    let mut spec: Option<CipherSpec> = None;
    let mut key_bits: Option<usize> = None;
    let mut opts: Vec<(&str, String)> = vec![];
    let (mut swap, mut discard, mut readonly, mut noauto) = (false, false, false, false);
    let number = |k: &str, v: &str| -> Result<u64, String> {
        v.parse::<u64>()
            .map_err(|_| format!("{k}={v}: not a number"))
    };
    for opt in fields.get(3).copied().unwrap_or("").split(',') {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (k, v) {
            ("", None) => {}
            ("id", Some(v)) => {
                let n = number(k, v)?;
                if n >= (1 << 20) {
                    return Err(format!("id={v}: at most {}", (1 << 20) - 1));
                }
                id = Some(n as u32);
            }
            ("cipher", Some(v)) => {
                spec = Some(
                    v.parse::<CipherSpec>()
                        .map_err(|e| format!("cipher={v}: {e}"))?,
                );
            }
            ("size", Some(v)) => key_bits = Some(number(k, v)? as usize),
            ("hash", Some(v)) => {
                if !["ripemd160", "sha256", "sha512", "plain"].contains(&v) {
                    return Err(format!("hash={v}: one of ripemd160, sha256, sha512, plain"));
                }
                opts.push(("--hash", v.to_string()));
            }
            ("offset", Some(v)) => opts.push(("--offset", number(k, v)?.to_string())),
            ("skip", Some(v)) => opts.push(("--skip", number(k, v)?.to_string())),
            ("sector-size", Some(v)) => {
                let n = number(k, v)?;
                if ![512, 1024, 2048, 4096].contains(&n) {
                    return Err(format!("sector-size={v}: 512, 1024, 2048 or 4096"));
                }
                opts.push(("--sector-size", n.to_string()));
            }
            ("keyfile-offset", Some(v)) => {
                opts.push(("--keyfile-offset", number(k, v)?.to_string()))
            }
            ("keyfile-size", Some(v)) => opts.push(("--keyfile-size", number(k, v)?.to_string())),
            ("discard", None) => discard = true,
            ("readonly" | "read-only", None) => readonly = true,
            ("swap", None) => swap = true,
            ("plain", None) => {}
            ("noauto", None) => noauto = true,
            (
                "id" | "cipher" | "size" | "hash" | "offset" | "skip" | "sector-size"
                | "keyfile-offset" | "keyfile-size",
                None,
            ) => return Err(format!("option '{k}' needs a value ({k}=...)")),
            ("discard" | "readonly" | "read-only" | "swap" | "plain" | "noauto", Some(_)) => {
                return Err(format!("option '{k}' takes no value"))
            }
            _ => return Err(format!("unknown option '{opt}'")),
        }
    }
    let id = id.ok_or(
        "no id=N: the fixed ublk id (/dev/ublkbN) is how a restarted daemon finds its device",
    )?;
    if let (Some(s), Some(bits)) = (&spec, key_bits) {
        if !s.allowed_key_bits().contains(&bits) {
            return Err(format!(
                "size={bits}: {} takes {:?} bits",
                s,
                s.allowed_key_bits()
            ));
        }
    } else if let Some(bits) = key_bits {
        let default: CipherSpec = "aes-xts-plain64".parse().expect("the default parses");
        if !default.allowed_key_bits().contains(&bits) {
            return Err(format!(
                "size={bits}: the default aes-xts-plain64 takes 256 or 512"
            ));
        }
    }
    if swap && key_file != "/dev/urandom" {
        return Err(format!(
            "swap with the persistent key file {key_file}: mkswap would destroy a volume that \
             can be opened again; swap takes /dev/urandom"
        ));
    }
    if swap && readonly {
        return Err("swap and readonly contradict each other".into());
    }
    let mut open_options = vec!["--key-file".to_string(), key_file.clone()];
    if let Some(s) = &spec {
        open_options.extend(["--cipher".to_string(), s.to_string()]);
    }
    if let Some(b) = key_bits {
        open_options.extend(["--key-size".to_string(), b.to_string()]);
    }
    for (flag, v) in opts {
        open_options.extend([flag.to_string(), v]);
    }
    if discard {
        open_options.push("--allow-discards".into());
    }
    if readonly {
        open_options.push("--readonly".into());
    }
    Ok(Entry {
        line,
        name: name.to_string(),
        device,
        key_file,
        id,
        open_options,
        swap,
        discard,
        noauto,
    })
}

/// crypttab's device field: an absolute path, or `UUID=`, `PARTUUID=`, `LABEL=`, `PARTLABEL=`
/// (resolved to the udev links under `/dev/disk/`).
fn resolve_device(field: &str) -> Result<String, String> {
    const TAGS: &[(&str, &str)] = &[
        ("UUID=", "/dev/disk/by-uuid/"),
        ("PARTUUID=", "/dev/disk/by-partuuid/"),
        ("LABEL=", "/dev/disk/by-label/"),
        ("PARTLABEL=", "/dev/disk/by-partlabel/"),
    ];
    let path = match TAGS.iter().find(|(t, _)| field.starts_with(t)) {
        Some((t, dir)) => {
            let v = &field[t.len()..];
            if v.is_empty() || v.contains('/') {
                return Err(format!("device '{field}': an empty or odd {t} value"));
            }
            format!("{dir}{v}")
        }
        None if field.starts_with('/') => field.to_string(),
        None => {
            return Err(format!(
                "device '{field}': an absolute path or UUID=, PARTUUID=, LABEL=, PARTLABEL="
            ))
        }
    };
    plain_word(&path, "device")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_line_parses() {
        let (e, errs) =
            parse("swap PARTLABEL=cs /dev/urandom swap,cipher=aes-xts-plain64,size=512,id=3\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(e[0].device, "/dev/disk/by-partlabel/cs");
        assert_eq!(e[0].id, 3);
        assert!(e[0].swap && e[0].is_ephemeral());
        assert_eq!(
            e[0].open_options.join(" "),
            "--key-file /dev/urandom --cipher aes-xts-plain64 --key-size 512"
        );
    }

    #[test]
    fn bad_lines_are_refused_one_by_one() {
        let text = "\
# comment
ok /dev/vdb /dev/urandom swap,id=0
dup /dev/vdc /dev/urandom swap,id=0
noid /dev/vdd /dev/urandom swap
pers /dev/vde /etc/k swap,id=5
pass /dev/vdf none id=6
bad /dev/vdg /dev/urandom id=7,frobnicate
size /dev/vdh /dev/urandom cipher=aes-cbc-essiv:sha256,size=512,id=8
1abc /dev/vdi /dev/urandom id=9
odd /dev/vd%i /dev/urandom id=10
";
        let (e, errs) = parse(text);
        assert_eq!(e.len(), 1);
        assert_eq!(
            errs.iter().map(|e| e.line).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7, 8, 9, 10]
        );
        for (e, want) in errs.iter().zip([
            "used twice",
            "no id=",
            "persistent key",
            "passphrase",
            "unknown option",
            "size=512",
            "name '1abc'",
            "not allowed",
        ]) {
            assert!(e.message.contains(want), "{e:?} wants {want}");
        }
    }
}
