use super::*;

const VALID: &str = r#"
name: acme
permissionProfiles:
  execution: {aws: ["s3:GetObject"]}
resources:
  - lifecycle: live
    container:
      name: api
      code: {image: "ghcr.io/acme/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}
      cpu: 1
      memory: 1Gi
      ports: [8080]
      publicEndpoints: [{name: web, port: 8080, protocol: http}]
      minReplicas: 2
      maxReplicas: 10
      permissions: execution
"#;

#[test]
fn the_quick_start_example_is_valid() {
    let (file, stack) = Stack::from_yaml(VALID).unwrap();
    assert_eq!(stack.name, "acme");
    let api = &stack.resources[0].container;
    assert_eq!(api.memory.bytes(), 1 << 30);
    assert_eq!(
        api.scaling,
        Scaling::Auto {
            min: 2,
            desired: 2,
            max: 10,
            target_cpu_percent: 80,
            target_memory_percent: None
        }
    );
    // The file survives a JSON round trip unchanged (this is what a bundle stores).
    let json = serde_json::to_string(&file).unwrap();
    assert_eq!(serde_json::from_str::<StackFile>(&json).unwrap(), file);
}

/// Every file in testdata/stacks/invalid breaks one rule; its first line says which message.
#[test]
fn every_invalid_stack_vector_is_refused_with_its_message() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/stacks/invalid");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("# expect:")
            .trim();
        let error = match parse_stack_yaml(&text).and_then(|file| check_before_build(&file)) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains(expected),
            "{}: {error:?} does not contain {expected:?}",
            path.display()
        );
        assert!(
            !error.contains('\n'),
            "{}: error spans lines: {error}",
            path.display()
        );
        count += 1;
    }
    assert!(count >= 20, "only {count} invalid stack vectors");
}

#[test]
fn every_valid_stack_vector_is_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/stacks/valid");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = Stack::from_yaml(&text) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn published_schema_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stack.schema.json");
    let published = std::fs::read_to_string(&path).unwrap_or_default();
    if published != json_schema() {
        if std::env::var_os("OUTPOST_BLESS").is_some() {
            std::fs::write(&path, json_schema()).unwrap();
        } else {
            panic!("bundle-format/stack.schema.json is stale: rerun with OUTPOST_BLESS=1");
        }
    }
}

#[test]
fn persistent_storage_implies_stateful() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/stacks/valid/everything.yaml"),
    )
    .unwrap();
    let (_, stack) = Stack::from_yaml(&text).unwrap();
    let db = &stack.resource("db").unwrap().container;
    assert!(db.stateful);
    assert_eq!(db.persistent_storage.as_ref().unwrap().bytes(), 10 << 30);
}

/// Alien's builder spells code `{type: image, image: ...}`: accepted beside the short form, with
/// the same meaning; another type is refused by name.
#[test]
fn code_may_name_its_type_as_alien_spells_it() {
    let long = VALID.replace("code: {image:", "code: {type: image, image:");
    let (file, stack) = Stack::from_yaml(&long).unwrap();
    assert_eq!(file.resources[0].container.code.kind, Some(CodeKind::Image));
    let (_, short) = Stack::from_yaml(VALID).unwrap();
    assert_eq!(
        stack.resources[0].container.image,
        short.resources[0].container.image
    );
    let other = VALID.replace("code: {image:", "code: {type: binary, image:");
    let error = Stack::from_yaml(&other).unwrap_err().to_string();
    assert!(error.contains("unknown variant `binary`"), "{error}");
}
