//! `inspect`: what a bundle contains, without trusting it (use `verify` for that).

use crate::cli::{InspectArgs, Output};
use crate::keys::open_bundle;
use crate::{Failure, Outcome};
use outpost_bundle_format::bundle::{self, ANNOTATION_IMAGE};
use outpost_bundle_format::layout::Limits;
use outpost_bundle_format::provenance::Provenance;
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::signature;
use outpost_bundle_format::stack::Scaling;
use serde_json::{Value, json};

pub fn run(args: InspectArgs) -> Outcome {
    let opened = open_bundle(&args.bundle)?;
    let layout = &opened.layout;
    let fail =
        |e: &dyn std::fmt::Display| Failure::invalid(format!("{}: {e}", args.bundle.display()));
    let parts = bundle::read_parts(layout, &Limits::default()).map_err(|e| fail(&e))?;
    let metadata = bundle::parse_metadata(&parts.metadata_bytes).map_err(|e| fail(&e))?;
    let (_, stack) = bundle::parse_stack(&parts.stack_bytes).map_err(|e| fail(&e))?;

    let statements: Vec<Result<Provenance, String>> = parts
        .statements
        .iter()
        .map(|bytes| Provenance::parse(bytes).and_then(|p| p.check_against(&stack).map(|()| p)))
        .collect();
    let built_from = |resource: &str| statements.iter().flatten().find(|p| p.resource == resource);
    let resources: Vec<Value> = stack
        .resources
        .iter()
        .map(|r| {
            let c = &r.container;
            let scaling = match &c.scaling {
                Scaling::Fixed(n) => json!({"replicas": n}),
                Scaling::Auto { min, desired, max, target_cpu_percent, target_memory_percent } => json!({
                    "min": min, "desired": desired, "max": max,
                    "targetCpuPercent": target_cpu_percent, "targetMemoryPercent": target_memory_percent,
                }),
            };
            json!({
                "name": c.name,
                "lifecycle": r.lifecycle,
                "image": c.image.to_string(),
                "cpu": {"min": c.cpu.min, "desired": c.cpu.desired},
                "memory": c.memory.as_str(),
                "ports": c.ports,
                "publicEndpoints": c.public_endpoints.iter().map(|e| json!({"name": e.name, "port": e.port, "protocol": e.protocol})).collect::<Vec<_>>(),
                "scaling": scaling,
                "stateful": c.stateful,
                "persistentStorage": c.persistent_storage.as_ref().map(|q| q.as_str()),
                "permissions": c.permissions,
                "links": c.links,
                "pool": c.pool,
                "builtFrom": built_from(&c.name).map(provenance_json),
            })
        })
        .collect();
    let mut images: Vec<String> = stack
        .resources
        .iter()
        .map(|r| r.container.image.to_string())
        .collect();
    images.sort();
    images.dedup();
    let bundled: Vec<String> = layout
        .index()
        .manifests
        .iter()
        .filter_map(|d| d.annotations.get(ANNOTATION_IMAGE).cloned())
        .collect();
    let signatures: Vec<Value> = parts
        .signatures
        .iter()
        .map(|(payload, layer)| {
            let claims = signature::payload_digest(payload);
            json!({
                "claims": claims.as_ref().map(|d| d.to_string()).unwrap_or_else(|e| format!("invalid payload: {e}")),
                "matchesBundle": claims.as_ref().is_ok_and(|d| *d == parts.digest),
                "hasSignature": signature::layer_signature(layer).is_some(),
            })
        })
        .collect();
    let report = json!({
        "digest": parts.digest.to_string(),
        "metadata": {
            "name": metadata.name,
            "version": metadata.version.to_string(),
            "sequence": metadata.sequence,
            "channel": metadata.channel,
            "created": rfc3339::format(&metadata.created),
            "expires": rfc3339::format(&metadata.expires),
            "formatVersion": metadata.format_version,
        },
        "permissionProfiles": stack.permission_profiles,
        "resources": resources,
        "images": images,
        "bundledImages": bundled,
        "rootUpdates": parts.roots.len(),
        "provenance": statements.iter().map(|s| match s {
            Ok(p) => provenance_json(p),
            Err(e) => json!({"invalid": e}),
        }).collect::<Vec<_>>(),
        "signatures": signatures,
    });
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Output::Text => {
            println!("digest:    {}", parts.digest);
            println!(
                "stack:     {} {} (sequence {}, channel {})",
                metadata.name, metadata.version, metadata.sequence, metadata.channel
            );
            println!("created:   {}", rfc3339::format(&metadata.created));
            println!("expires:   {}", rfc3339::format(&metadata.expires));
            println!("resources:");
            for r in &stack.resources {
                let c = &r.container;
                println!(
                    "  {:<20} {:?} {} cpu={} memory={} ports={:?} permissions={}",
                    c.name, r.lifecycle, c.image, c.cpu.desired, c.memory, c.ports, c.permissions
                );
                if let Some(p) = built_from(&c.name) {
                    println!("  {:<20} {}", "", built_from_text(p));
                }
            }
            println!("permission profiles:");
            for (name, clouds) in &stack.permission_profiles {
                println!(
                    "  {name}: {}",
                    serde_json::to_string(clouds).unwrap_or_default()
                );
            }
            println!(
                "images bundled: {}",
                if bundled.is_empty() {
                    "none".to_string()
                } else {
                    bundled.join(", ")
                }
            );
            for (index, statement) in statements.iter().enumerate() {
                if let Err(e) = statement {
                    println!("provenance statement {}: invalid: {e}", index + 1);
                }
            }
            println!(
                "signatures: {} (unverified; run `verify`)",
                signatures.len()
            );
        }
    }
    Ok(())
}

/// A provenance statement as `inspect --output json` shows it.
fn provenance_json(p: &Provenance) -> Value {
    json!({
        "resource": p.resource,
        "image": format!("{}@{}", p.image_name, p.image_digest),
        "source": p.source_path,
        "sourceDigest": p.source_digest.to_string(),
        "dockerfile": p.dockerfile,
        "target": p.target,
        "args": p.args,
        "platforms": p.platforms,
        "sourceDateEpoch": p.source_date_epoch,
        "builder": {"id": p.builder_id, "version": p.builder_version},
    })
}

/// One line: built from which source tree, by what.
fn built_from_text(p: &Provenance) -> String {
    let tools: Vec<String> = p
        .builder_version
        .iter()
        .map(|(tool, version)| format!("{tool} {version}"))
        .collect();
    format!(
        "built from source {} ({}) with {} by {}",
        p.source_path,
        p.source_digest,
        p.dockerfile,
        tools.join(", ")
    )
}
