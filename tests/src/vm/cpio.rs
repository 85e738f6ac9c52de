//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Written here rather than shelling out to `cpio(1)` because the archive needs entries the
//! build user cannot create on disk without root (the `/dev/console` character device the
//! kernel opens for init's stdio before devtmpfs is mounted), and because building the tree
//! in memory lets the harness check for path collisions before anything is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where the bytes of a file come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Copied from a host file (symlinks followed) when the archive is written.
    Host(PathBuf),
    /// These exact bytes.
    Bytes(Vec<u8>),
}

/// One node of the archive tree.
#[derive(Clone, Debug)]
pub enum Node {
    Dir { mode: u32 },
    File { source: Source, mode: u32 },
    Symlink { target: String },
    CharDev { major: u32, minor: u32, mode: u32 },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An initramfs tree, written out in one go by [`Archive::write_to`].
///
/// Paths are absolute guest paths ("/bin/busybox"). Parents are created implicitly as
/// 0755 directories. The tree is kept sorted, so every directory is written before its
/// children, which the kernel's unpacker requires (it does not create missing parents).
#[derive(Default, Debug)]
pub struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node; fails if something different already sits at `path` (two files, or a
    /// file where a directory is needed), so a test cannot silently shadow harness files.
    pub fn add(&mut self, path: &str, node: Node) -> Result<(), String> {
        let rel = normalize(path)?;
        // Implicit parents.
        let mut prefix = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.nodes.get(&prefix) {
                None => {
                    self.nodes.insert(prefix.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(other) => {
                    return Err(format!(
                        "initramfs: /{prefix} is needed as a directory for {path} but is {other:?}"
                    ))
                }
            }
        }
        match (self.nodes.get(&rel), &node) {
            (None, _) => {
                self.nodes.insert(rel, node);
                Ok(())
            }
            (Some(Node::Dir { .. }), Node::Dir { .. }) => {
                self.nodes.insert(rel, node);
                Ok(())
            }
            (Some(existing), _) => Err(format!(
                "initramfs: two entries for {path}: {existing:?} and {node:?}"
            )),
        }
    }

    pub fn dir(&mut self, path: &str) -> Result<(), String> {
        self.add(path, Node::Dir { mode: 0o755 })
    }

    pub fn file(&mut self, path: &str, source: Source, mode: u32) -> Result<(), String> {
        self.add(path, Node::File { source, mode })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), String> {
        self.add(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Writes the archive (uncompressed: the kernel unpacks that fastest, which matters under
    /// TCG, and the image is freed after unpacking anyway).
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let mut w = io::BufWriter::new(File::create(path)?);
        let mut ino = 1u32;
        let mut written = 0u64;
        for (name, node) in &self.nodes {
            ino += 1;
            match node {
                Node::Dir { mode } => {
                    header(
                        &mut w,
                        &mut written,
                        ino,
                        S_IFDIR | mode,
                        2,
                        0,
                        (0, 0),
                        name,
                    )?;
                }
                Node::Symlink { target } => {
                    let data = target.as_bytes();
                    header(
                        &mut w,
                        &mut written,
                        ino,
                        S_IFLNK | 0o777,
                        1,
                        data.len() as u64,
                        (0, 0),
                        name,
                    )?;
                    body(&mut w, &mut written, data)?;
                }
                Node::CharDev { major, minor, mode } => {
                    header(
                        &mut w,
                        &mut written,
                        ino,
                        S_IFCHR | mode,
                        1,
                        0,
                        (*major, *minor),
                        name,
                    )?;
                }
                Node::File { source, mode } => match source {
                    Source::Bytes(data) => {
                        header(
                            &mut w,
                            &mut written,
                            ino,
                            S_IFREG | mode,
                            1,
                            data.len() as u64,
                            (0, 0),
                            name,
                        )?;
                        body(&mut w, &mut written, data)?;
                    }
                    Source::Host(host) => {
                        let mut f = File::open(host).map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", host.display()))
                        })?;
                        let len = f.metadata()?.len();
                        header(
                            &mut w,
                            &mut written,
                            ino,
                            S_IFREG | mode,
                            1,
                            len,
                            (0, 0),
                            name,
                        )?;
                        let copied = io::copy(&mut f, &mut w)?;
                        if copied != len {
                            return Err(io::Error::other(format!(
                                "{} changed size while being archived",
                                host.display()
                            )));
                        }
                        written += copied;
                        pad(&mut w, &mut written)?;
                    }
                },
            }
        }
        header(&mut w, &mut written, 0, 0, 1, 0, (0, 0), "TRAILER!!!")?;
        w.flush()
    }
}

fn normalize(path: &str) -> Result<String, String> {
    let rel = path.trim_start_matches('/');
    if !path.starts_with('/')
        || rel.is_empty()
        || rel
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(format!(
            "initramfs: guest path {path:?} must be absolute and normalized"
        ));
    }
    Ok(rel.to_string())
}

#[allow(clippy::too_many_arguments)]
fn header(
    w: &mut impl Write,
    written: &mut u64,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u64,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let size = u32::try_from(size).map_err(|_| io::Error::other("file over 4 GiB in cpio"))?;
    let namesize = name.len() + 1;
    let h = format!(
        "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
        0, 0, 0, 0, 0, rdev.0, rdev.1, 0
    );
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    *written += (h.len() + namesize) as u64;
    pad(w, written)
}

fn body(w: &mut impl Write, written: &mut u64, data: &[u8]) -> io::Result<()> {
    w.write_all(data)?;
    *written += data.len() as u64;
    pad(w, written)
}

fn pad(w: &mut impl Write, written: &mut u64) -> io::Result<()> {
    let n = (4 - (*written % 4)) % 4;
    w.write_all(&[0u8; 3][..n as usize])?;
    *written += n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implicit_and_collisions_fail() {
        let mut a = Archive::new();
        a.file("/a/b/c", Source::Bytes(b"x".to_vec()), 0o644)
            .unwrap();
        assert!(matches!(a.nodes.get("a/b"), Some(Node::Dir { .. })));
        assert!(a
            .file("/a/b/c", Source::Bytes(b"y".to_vec()), 0o644)
            .is_err());
        assert!(a.file("/a/b/c/d", Source::Bytes(vec![]), 0o644).is_err());
        assert!(a.dir("/a/b").is_ok());
        assert!(a.dir("relative").is_err());
        assert!(a.dir("/a/../b").is_err());
    }

    #[test]
    fn entries_are_4_byte_aligned_and_trailer_terminates() {
        let mut a = Archive::new();
        a.file("/f", Source::Bytes(b"hello".to_vec()), 0o644)
            .unwrap();
        a.symlink("/l", "f").unwrap();
        a.add(
            "/dev/console",
            Node::CharDev {
                major: 5,
                minor: 1,
                mode: 0o600,
            },
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.cpio");
        a.write_to(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
        // Walk the entries: every header starts at a 4-byte boundary with the magic.
        let mut off = 0usize;
        let mut names = vec![];
        loop {
            assert_eq!(&bytes[off..off + 6], b"070701", "at {off}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[off + 6 + i * 8..off + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&bytes[off + 110..off + 110 + namesize - 1]).unwrap();
            names.push(name.to_string());
            let data = (off + 110 + namesize).div_ceil(4) * 4;
            off = (data + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(names, ["dev", "dev/console", "f", "l", "TRAILER!!!"]);
    }
}
