use super::*;
use std::io::Cursor;

fn sample() -> Layout {
    let mut layout = Layout::default();
    let config = b"{}".to_vec();
    let layer = vec![7u8; 4096];
    let manifest = oci::ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        artifact_type: None,
        config: oci::Descriptor::of(oci::MEDIA_TYPE_IMAGE_CONFIG, &config),
        layers: vec![oci::Descriptor::of("application/octet-stream", &layer)],
        subject: None,
        annotations: Default::default(),
    };
    let manifest = oci::to_bytes(&manifest);
    layout
        .index_mut()
        .manifests
        .push(oci::Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &manifest));
    layout.add_blob(config);
    layout.add_blob(layer);
    layout.add_blob(manifest);
    layout.add_blob(b"unreferenced".to_vec());
    layout
}

fn tar_bytes(layout: &Layout) -> Vec<u8> {
    let mut out = Vec::new();
    layout.write_tar(&mut out).unwrap();
    out
}

/// A tar with arbitrary entries (path, type, content), for attacks the writer never produces.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, content, link) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        // Bypass the builder's own path checks to write hostile names.
        let name = header.as_old_mut();
        name.name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        builder.append(&header, *content).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn tar_round_trip_is_deterministic_and_drops_unreferenced_blobs() {
    let layout = sample();
    let first = tar_bytes(&layout);
    assert_eq!(first, tar_bytes(&layout));
    let read = Layout::read_tar(Cursor::new(&first), &Limits::default(), None).unwrap();
    assert_eq!(read.index(), layout.index());
    assert!(!read.has_blob(&Digest::of(b"unreferenced")));
    assert_eq!(tar_bytes(&read), first);
}

#[test]
fn dir_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    sample().write_dir(dir.path()).unwrap();
    let read = Layout::read_dir(dir.path(), &Limits::default()).unwrap();
    assert_eq!(read.index(), sample().index());
    assert_eq!(tar_bytes(&read), tar_bytes(&sample()));
}

#[test]
fn tampered_blob_is_a_digest_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    sample().write_dir(dir.path()).unwrap();
    let path = dir
        .path()
        .join("blobs/sha256")
        .join(Digest::of(&[7u8; 4096]).hex());
    std::fs::write(&path, [8u8; 4096]).unwrap();
    let err = Layout::read_dir(dir.path(), &Limits::default()).unwrap_err();
    assert_eq!(err.check(), "digest-mismatch", "{err}");
}

#[test]
fn hostile_tar_entries_are_refused() {
    let blob = b"x";
    let name = format!("blobs/sha256/{}", Digest::of(blob).hex());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "parent",
            raw_tar(&[("../../etc/passwd", tar::EntryType::Regular, blob, None)]),
        ),
        (
            "absolute",
            raw_tar(&[("/etc/passwd", tar::EntryType::Regular, blob, None)]),
        ),
        (
            "symlink",
            raw_tar(&[(&name, tar::EntryType::Symlink, b"", Some("/etc/passwd"))]),
        ),
        (
            "hardlink",
            raw_tar(&[(&name, tar::EntryType::Link, b"", Some("../../x"))]),
        ),
        (
            "device",
            raw_tar(&[("oci-layout", tar::EntryType::Char, b"", None)]),
        ),
        (
            "stray file",
            raw_tar(&[("evil.sh", tar::EntryType::Regular, blob, None)]),
        ),
        (
            "bad blob name",
            raw_tar(&[("blobs/sha256/zz", tar::EntryType::Regular, blob, None)]),
        ),
        (
            "nested parent",
            raw_tar(&[(
                "blobs/sha256/../../../x",
                tar::EntryType::Regular,
                blob,
                None,
            )]),
        ),
    ];
    for (what, bytes) in cases {
        let err = Layout::read_tar(Cursor::new(bytes), &Limits::default(), None).unwrap_err();
        assert_eq!(err.check(), "unsafe-path", "{what}: {err}");
    }
}

#[test]
fn limits_truncation_and_garbage() {
    let bytes = tar_bytes(&sample());
    let tiny = Limits {
        max_metadata_bytes: 10,
        max_blob_bytes: 1000,
        ..Limits::default()
    };
    let err = Layout::read_tar(Cursor::new(&bytes), &tiny, None).unwrap_err();
    assert_eq!(err.check(), "size-limit", "{err}");
    let few = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    assert_eq!(
        Layout::read_tar(Cursor::new(&bytes), &few, None)
            .unwrap_err()
            .check(),
        "size-limit"
    );

    let truncated = &bytes[..bytes.len() / 2 + 100];
    let err = Layout::read_tar(Cursor::new(truncated), &Limits::default(), None).unwrap_err();
    assert_eq!(err.check(), "malformed", "{err}");

    let garbage = vec![0x5au8; 4096];
    assert!(Layout::read_tar(Cursor::new(garbage), &Limits::default(), None).is_err());
    assert!(Layout::read_tar(Cursor::new(Vec::new()), &Limits::default(), None).is_err());
}

#[test]
fn large_blobs_stream_to_the_spool() {
    let layout = sample();
    let bytes = tar_bytes(&layout);
    let spool = tempfile::tempdir().unwrap();
    let small = Limits {
        max_metadata_bytes: 1024,
        ..Limits::default()
    };
    let read = Layout::read_tar(Cursor::new(&bytes), &small, Some(spool.path())).unwrap();
    let layer = Digest::of(&[7u8; 4096]);
    assert!(spool.path().join(layer.hex()).exists());
    let mut out = Vec::new();
    read.copy_blob(&layer, &mut out).unwrap();
    assert_eq!(out, vec![7u8; 4096]);
}

#[test]
fn extended_headers_are_refused_before_they_are_buffered() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    let huge_record = vec![b'a'; 8192];
    header.set_size(huge_record.len() as u64);
    header.set_path("PaxHeaders/x").unwrap();
    header.set_cksum();
    builder.append(&header, huge_record.as_slice()).unwrap();
    let bytes = builder.into_inner().unwrap();
    let err = Layout::read_tar(Cursor::new(bytes), &Limits::default(), None).unwrap_err();
    assert_eq!(err.check(), "malformed", "{err}");
    assert!(err.to_string().contains("extended headers"), "{err}");
}

#[test]
fn a_file_changed_after_verification_is_caught_when_copied() {
    let dir = tempfile::tempdir().unwrap();
    sample().write_dir(dir.path()).unwrap();
    let small = Limits {
        max_metadata_bytes: 1024,
        ..Limits::default()
    };
    let read = Layout::read_dir(dir.path(), &small).unwrap();
    let layer = Digest::of(&[7u8; 4096]);
    std::fs::write(
        dir.path().join("blobs/sha256").join(layer.hex()),
        [9u8; 4096],
    )
    .unwrap();
    let err = read.copy_blob(&layer, &mut Vec::new()).unwrap_err();
    assert_eq!(err.check(), "digest-mismatch");
}
