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

/// `sample()`'s tar entries with `extra` inserted before the blobs.
fn tar_with(extra: &[(&str, tar::EntryType, &[u8], Option<&str>)], index: &[u8]) -> Vec<u8> {
    let layout = sample();
    let blobs: Vec<(String, Vec<u8>)> = layout
        .reachable(&Limits::default())
        .unwrap()
        .iter()
        .map(|d| {
            (
                format!("blobs/sha256/{}", d.hex()),
                layout.read_blob(d, 1 << 20).unwrap(),
            )
        })
        .collect();
    let mut entries: Vec<(&str, tar::EntryType, &[u8], Option<&str>)> = vec![
        (
            "oci-layout",
            tar::EntryType::Regular,
            oci::LAYOUT_FILE_CONTENT,
            None,
        ),
        ("index.json", tar::EntryType::Regular, index, None),
    ];
    entries.extend_from_slice(extra);
    for (name, bytes) in &blobs {
        entries.push((name, tar::EntryType::Regular, bytes, None));
    }
    raw_tar(&entries)
}

fn sample_index() -> Vec<u8> {
    oci::to_bytes(sample().index())
}

#[test]
fn every_directory_header_counts_and_none_carries_data() {
    // 100,001 `./` headers used to be skipped before they were counted.
    let dots: Vec<(&str, tar::EntryType, &[u8], Option<&str>)> =
        vec![("./", tar::EntryType::Directory, b"", None); 20];
    let err = Layout::read_tar(
        Cursor::new(tar_with(&dots, &sample_index())),
        &Limits::default(),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    // The layout's three directories, as `tar -C layout -cf x.tar .` writes them.
    let dirs = [
        ("./", tar::EntryType::Directory, b"".as_slice(), None),
        ("./blobs/", tar::EntryType::Directory, b"".as_slice(), None),
        (
            "./blobs/sha256/",
            tar::EntryType::Directory,
            b"".as_slice(),
            None,
        ),
    ];
    let few = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let err =
        Layout::read_tar(Cursor::new(tar_with(&dirs, &sample_index())), &few, None).unwrap_err();
    assert_eq!(err.check(), "size-limit", "{err}");
    assert!(err.to_string().contains("more than 3 entries"), "{err}");
    assert!(!err.to_string().contains("bytes"), "{err}");

    // A directory entry's data would be skipped uncounted: refused however small.
    let data = vec![0u8; 64 << 10];
    let with_data = [("blobs/", tar::EntryType::Directory, data.as_slice(), None)];
    let tiny_total = Limits {
        max_total_bytes: 8 << 10,
        ..Limits::default()
    };
    let err = Layout::read_tar(
        Cursor::new(tar_with(&with_data, &sample_index())),
        &tiny_total,
        None,
    )
    .unwrap_err();
    assert_eq!(err.check(), "malformed", "{err}");
    assert!(
        err.to_string()
            .contains("directory entry carrying 65536 bytes"),
        "{err}"
    );

    // Each of the layout's directories at most once.
    let twice = [
        ("blobs/", tar::EntryType::Directory, b"".as_slice(), None),
        ("./blobs", tar::EntryType::Directory, b"".as_slice(), None),
    ];
    let err = Layout::read_tar(
        Cursor::new(tar_with(&twice, &sample_index())),
        &Limits::default(),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    // One of each is fine.
    Layout::read_tar(
        Cursor::new(tar_with(&dirs, &sample_index())),
        &Limits::default(),
        None,
    )
    .unwrap();
}

#[test]
fn every_file_counts_towards_the_total() {
    let bytes = tar_bytes(&sample());
    let index_len = sample_index().len() as u64;
    // Blobs alone fit; with index.json and oci-layout they do not.
    let blobs_only = 2
        + 4096
        + sample()
            .blob_size(&sample().index().manifests[0].digest)
            .unwrap();
    let limits = Limits {
        max_total_bytes: blobs_only + index_len,
        ..Limits::default()
    };
    let err = Layout::read_tar(Cursor::new(&bytes), &limits, None).unwrap_err();
    assert_eq!(err.check(), "size-limit", "{err}");
}

#[test]
fn an_index_listing_a_manifest_twice_is_refused() {
    let layout = sample();
    let mut manifests = layout.index().manifests.clone();
    manifests.push(manifests[0].clone());
    let index = oci::to_bytes(&oci::ImageIndex::new(manifests.clone()));
    let err =
        Layout::read_tar(Cursor::new(tar_with(&[], &index)), &Limits::default(), None).unwrap_err();
    assert_eq!(err.check(), "malformed", "{err}");
    assert!(err.to_string().contains("more than once"), "{err}");
    // Built in memory (as a registry source does), the walk refuses it too.
    let mut in_memory = layout;
    in_memory.index_mut().manifests = manifests;
    assert!(
        in_memory
            .reachable(&Limits::default())
            .unwrap_err()
            .to_string()
            .contains("more than once")
    );
}

#[test]
fn every_descriptor_of_a_digest_is_size_checked() {
    let mut layout = sample();
    let manifest_digest = layout.index().manifests[0].digest;
    let manifest: oci::ImageManifest =
        serde_json::from_slice(&layout.read_blob(&manifest_digest, 1 << 20).unwrap()).unwrap();
    // A second manifest names the same layer with a size that lies.
    let mut lying = manifest.layers[0].clone();
    lying.size += 1;
    let second = oci::ImageManifest {
        layers: vec![manifest.layers[0].clone(), lying],
        ..manifest
    };
    let second = oci::to_bytes(&second);
    layout
        .index_mut()
        .manifests
        .push(oci::Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &second));
    layout.add_blob(second);
    let err = layout.reachable(&Limits::default()).unwrap_err();
    assert_eq!(err.check(), "malformed", "{err}");
    assert!(
        err.to_string().contains("says 4097 bytes, blob has 4096"),
        "{err}"
    );
}

#[test]
fn duplicate_members_in_index_and_manifests_are_refused() {
    let index = String::from_utf8(sample_index()).unwrap();
    let doubled = index.replacen(
        "\"schemaVersion\":2",
        "\"schemaVersion\":2,\"schemaVersion\":2",
        1,
    );
    let err = Layout::read_tar(
        Cursor::new(tar_with(&[], doubled.as_bytes())),
        &Limits::default(),
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("duplicate member \"schemaVersion\""),
        "{err}"
    );

    let mut layout = sample();
    let digest = layout.index().manifests[0].digest;
    let text = String::from_utf8(layout.read_blob(&digest, 1 << 20).unwrap()).unwrap();
    let doubled = text.replacen("{\"mediaType\"", "{\"mediaType\":\"x\",\"mediaType\"", 1);
    layout.index_mut().manifests = vec![oci::Descriptor::of(
        oci::MEDIA_TYPE_MANIFEST,
        doubled.as_bytes(),
    )];
    layout.add_blob(doubled.into_bytes());
    let err = layout.reachable(&Limits::default()).unwrap_err();
    assert!(
        err.to_string().contains("duplicate member \"mediaType\""),
        "{err}"
    );
}

#[test]
fn small_blobs_beyond_the_memory_budget_stay_on_disk() {
    let bytes = tar_bytes(&sample());
    let spool = tempfile::tempdir().unwrap();
    let budget = Limits {
        max_held_bytes: 100,
        ..Limits::default()
    };
    let read = Layout::read_tar(Cursor::new(&bytes), &budget, Some(spool.path())).unwrap();
    // The 4 KiB layer is small (metadata-sized) but over the budget: appended to the one
    // small-blob spool file with the blobs after it, and still readable (and copyable).
    let layer = Digest::of(&[7u8; 4096]);
    assert!(!spool.path().join(layer.hex()).exists());
    assert!(
        std::fs::metadata(spool.path().join("small-blobs"))
            .unwrap()
            .len()
            > 4096
    );
    assert_eq!(read.read_blob(&layer, 1 << 20).unwrap(), vec![7u8; 4096]);
    let mut copied = Vec::new();
    read.copy_blob(&layer, &mut copied).unwrap();
    assert_eq!(copied, vec![7u8; 4096]);
    assert_eq!(tar_bytes(&read), bytes);
    read.reachable(&budget).unwrap();
    // Without a spool it is verified, not kept, and saying so is the error.
    let read = Layout::read_tar(Cursor::new(&bytes), &budget, None).unwrap();
    let err = read.read_blob(&layer, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("not kept"), "{err}");
}
