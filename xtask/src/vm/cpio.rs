//! The initramfs container format: "newc" cpio archives, written directly. The kernel unpacks
//! several archives concatenated in one initrd, so each part of the VM's root filesystem is
//! built (and cached) on its own.
use std::io::{self, Write};

/// Header magic of the "newc" format (ASCII, no checksums).
const NEWC_MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        // Inode numbers only need to be distinct within one archive (no hard links here).
        Self { out, next_inode: 1 }
    }

    /// `path` is relative to the root, without a leading `/`; parents must come first.
    pub fn directory(&mut self, path: &str, permissions: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | permissions, 2, &[])
    }

    pub fn file(&mut self, path: &str, permissions: u32, contents: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | permissions, 1, contents)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Writes the trailer entry and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, &[])?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, links: u32, data: &[u8]) -> io::Result<()> {
        let inode = self.next_inode;
        self.next_inode += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name} is larger than cpio's 4 GiB limit")))?;
        let name_size = name.len() as u32 + 1; // with its terminating NUL
        // inode, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check: each as 8 hex digits.
        let fields = [inode, mode, 0, 0, links, 0, size, 0, 0, 0, 0, name_size, 0];
        let mut header = String::from(NEWC_MAGIC);
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        // The name (after the 110-byte header) and the data are each padded to 4 bytes.
        self.pad(header.len() + name_size as usize)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, written: usize) -> io::Result<()> {
        let padding = (4 - written % 4) % 4;
        self.out.write_all(&[0; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_padded_newc_entries_and_a_trailer() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.directory("etc", 0o755).unwrap();
        cpio.file("etc/motd", 0o644, b"hello").unwrap();
        cpio.symlink("bin", "usr/bin").unwrap();
        let bytes = cpio.finish().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("070701"));
        assert_eq!(text.matches("070701").count(), 4);
        assert!(text.contains("etc/motd\0"));
        assert!(text.contains("hello"));
        // 110-byte header + "bin\0" = 114 bytes: two bytes of padding before the target.
        assert!(text.contains("bin\0\0\0usr/bin"));
        assert!(text.contains("TRAILER!!!\0"));
        assert_eq!(bytes.len() % 4, 0);
        // The file entry: regular file, mode 0644, 5 bytes of data.
        let file_header = &text[text.find("etc/motd").unwrap() - 110..];
        assert_eq!(&file_header[14..22], "000081a4");
        assert_eq!(&file_header[54..62], "00000005");
    }
}
