//! The decompressed `vmlinux` ELF inside a bzImage (`vmlinuz`). qemu boots it directly, which
//! skips the kernel's own decompression, slow under emulation.
use std::{
    fs::{self, File},
    io::Read,
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

/// Offsets in the x86 boot protocol's setup header.
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202; // "HdrS"
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// The payload fields exist since boot protocol 2.08.
const PAYLOAD_FIELDS_VERSION: u16 = 0x0208;

/// Writes the ELF kernel of `vmlinuz` to `vmlinux`.
pub fn extract_vmlinux(vmlinuz: &Path, vmlinux: &Path) -> Result<()> {
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let payload = compressed_payload(&image)
        .with_context(|| format!("{} is not a usable bzImage", vmlinuz.display()))?;
    // The kernel build appends the decompressed size (4 bytes, little-endian) to the payload;
    // decompressors reject it as trailing garbage, and it checks the result.
    let (compressed, size) = payload.split_at(payload.len() - 4);
    let expected_size = u32::from_le_bytes(size.try_into()?) as u64;
    let decompressor = decompressor_for(compressed)?;
    let compressed_path = vmlinux.with_extension("compressed");
    fs::write(&compressed_path, compressed)?;
    let output = File::create(vmlinux)?;
    let status = Command::new(decompressor)
        .arg("-dc")
        .arg(&compressed_path)
        .stdout(output)
        .status()
        .with_context(|| format!("cannot run {decompressor}"))?;
    fs::remove_file(&compressed_path)?;
    ensure!(status.success(), "{decompressor} -dc failed with {status}");
    let actual_size = fs::metadata(vmlinux)?.len();
    ensure!(
        actual_size == expected_size,
        "{} decompressed to {actual_size} bytes, its header says {expected_size}",
        vmlinuz.display()
    );
    let mut magic = [0u8; 4];
    File::open(vmlinux)?.read_exact(&mut magic)?;
    ensure!(
        &magic == b"\x7fELF",
        "the decompressed kernel is not an ELF file"
    );
    Ok(())
}

/// The compressed kernel, located through the setup header.
fn compressed_payload(image: &[u8]) -> Result<&[u8]> {
    let u16_at = |at: usize| {
        image
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    ensure!(
        image.get(HEADER_MAGIC..HEADER_MAGIC + 4) == Some(b"HdrS"),
        "no x86 boot header"
    );
    let version = u16_at(PROTOCOL_VERSION).context("truncated header")?;
    ensure!(
        version >= PAYLOAD_FIELDS_VERSION,
        "boot protocol {version:#x} predates the payload fields"
    );
    // 0 setup sectors means 4, for old boot loaders; the protected-mode kernel follows them.
    let setup_sectors = match image[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let kernel_start = (setup_sectors + 1) * 512;
    let offset = u32_at(PAYLOAD_OFFSET).context("truncated header")?;
    let length = u32_at(PAYLOAD_LENGTH).context("truncated header")?;
    let start = kernel_start + offset;
    match image.get(start..start + length) {
        Some(payload) if length > 4 => Ok(payload),
        _ => bail!(
            "payload {start}+{length} lies outside the {} byte image",
            image.len()
        ),
    }
}

/// The command-line tool that decompresses `data`, by its magic number.
fn decompressor_for(data: &[u8]) -> Result<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4"), // lz4's legacy frame, as the kernel uses it
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x1f, 0x8b], "gzip"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| data.starts_with(magic))
        .map(|(_, tool)| *tool)
        .with_context(|| {
            format!(
                "unknown kernel compression (magic {:02x?})",
                &data[..data.len().min(6)]
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_payload(payload: &[u8], setup_sectors: u8) -> Vec<u8> {
        let kernel_start = (setup_sectors as usize + 1) * 512;
        let mut image = vec![0u8; kernel_start + 16];
        image[SETUP_SECTS] = setup_sectors;
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image
    }

    #[test]
    fn finds_the_payload_and_its_compression() {
        let payload = [0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5];
        let image = image_with_payload(&payload, 3);
        assert_eq!(compressed_payload(&image).unwrap(), payload);
        assert_eq!(decompressor_for(&payload).unwrap(), "zstd");
        assert_eq!(
            decompressor_for(&[0x02, 0x21, 0x4c, 0x18, 0]).unwrap(),
            "lz4"
        );
        assert!(decompressor_for(b"BZh9").is_err());
    }

    #[test]
    fn rejects_what_is_not_a_bzimage() {
        assert!(compressed_payload(&[0u8; 4096]).is_err());
        let mut image = image_with_payload(&[1, 2, 3, 4, 5], 3);
        image.truncate(image.len() - 2);
        let err = compressed_payload(&image).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
    }
}
